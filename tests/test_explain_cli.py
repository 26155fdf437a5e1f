"""`carspotter explain` and `predict --explain`: files written, evidence checked against a brute-force search
over the real FAISS index, nothing overwritten without --overwrite."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from carspotter.cli import build_app
from carspotter.cli.explain_cmds import load_explainer
from carspotter.data.images import open_rgb
from carspotter.explain.evidence import evidence
from carspotter.retrieval.index import GalleryIndex, GalleryIndexError
from carspotter.retrieval.query import embed_queries, embedder_for_index
from conftest import make_tiny_prepared, make_tiny_run


@pytest.fixture(scope="module")
def run_and_index(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("explain")
    data = make_tiny_prepared(root / "data", n_classes=4, per_class=8)
    run = make_tiny_run(root / "run", n_classes=4)
    r = CliRunner().invoke(
        build_app(), ["index", str(run), "--data", str(data), "--split", "train", "--out", str(root / "idx")]
    )
    assert r.exit_code == 0, r.output
    return {"data": data, "run": run, "index": root / "idx", "root": root}


def test_evidence_is_the_nearest_of_each_class(run_and_index: dict[str, Path]) -> None:
    index = GalleryIndex.load(run_and_index["index"])
    model = embedder_for_index(index)
    photo = open_rgb(run_and_index["data"] / "images" / "c2_007.jpg")
    q = embed_queries(index, model, [photo])[0]
    ev = evidence(index, q, top1=1, runner_up=3, k=3)
    vecs, labels = np.array(index.vectors(), dtype=np.float32), index.labels()
    dist = np.linalg.norm(vecs - q, axis=1)  # the slow obvious search
    for group, c, k in ((ev[0], 1, 3), (ev[1], 3, 1)):
        assert group["class_id"] == c and len(group["hits"]) == k
        mine = np.flatnonzero(labels == c)
        want = mine[np.argsort(dist[mine], kind="stable")][:k]
        assert [h["id"] for h in group["hits"]] == want.tolist()
        np.testing.assert_allclose([h["distance"] for h in group["hits"]], dist[want], rtol=1e-4, atol=1e-5)
        assert all(h["class_id"] == c for h in group["hits"])
    # a class with fewer gallery photos than asked gives what there is (4 train photos per class here)
    assert len(evidence(index, q, top1=0, runner_up=None, k=10)[0]["hits"]) == 4


def test_shared_pass_query_equals_the_gallery_path(run_and_index: dict[str, Path]) -> None:
    """The query vector taken from the Grad-CAM pass is the one retrieval.query would compute."""
    from carspotter.explain.photo import PhotoExplainer

    px = PhotoExplainer.from_run(run_and_index["run"], run_and_index["index"])
    assert px._shares_pass()
    photos = [open_rgb(run_and_index["data"] / "images" / n) for n in ("c0_006.jpg", "c2_007.jpg")]
    x = torch.stack([px.transform(p) for p in photos])
    _, _, feats, _ = px._explain(x, None)
    want = embed_queries(px.index, embedder_for_index(px.index), photos)
    np.testing.assert_allclose(px._queries(photos, feats), want, rtol=1e-4, atol=1e-4)


def assert_box(box: object) -> None:
    """A CAM box: normalised (x1, y1, x2, y2) inside the photo, not empty."""
    assert isinstance(box, list) and len(box) == 4, box
    x1, y1, x2, y2 = box
    assert all(0.0 <= v <= 1.0 for v in box), box
    assert x1 < x2 and y1 < y2, box


def test_explain_box_is_the_classify_box(run_and_index: dict[str, Path]) -> None:
    """The box in explain.json is the CAM box `predict`/classify give for the same photo (explain/box.py),
    whether it reuses the explanation's pass or not."""
    from carspotter.explain.zoom import Looker
    from carspotter.models.loading import load_run

    px = load_explainer(run_and_index["run"], None, "gradcam++", "cpu")
    photos = [open_rgb(run_and_index["data"] / "images" / n) for n in ("c0_006.jpg", "c2_007.jpg")]
    expls = px.explain(photos)
    model, info = load_run(run_and_index["run"])
    want = Looker(model, info)(photos).boxes
    for e, w in zip(expls, want, strict=True):
        assert_box(e.to_json()["box"])
        np.testing.assert_allclose(e.box, w, atol=0.05)


def test_cli_explain_writes_overlay_panel_json(run_and_index: dict[str, Path], tmp_path: Path) -> None:
    photo = run_and_index["data"] / "images" / "c1_006.jpg"
    out = tmp_path / "ex"
    args = [
        "explain",
        str(run_and_index["run"]),
        str(photo),
        "--index",
        str(run_and_index["index"]),
        "--out",
        str(out),
    ]
    r = CliRunner().invoke(build_app(), args)
    assert r.exit_code == 0, r.output
    doc = json.loads((out / "explain.json").read_text())
    assert doc["target_layer"] == "backbone.blocks.1" and doc["method"] == "gradcam++"
    assert doc["prediction"]["class_id"] == doc["top"][0]["class_id"] == doc["explained_class"]
    top1, runner = doc["evidence"]
    assert (
        top1["role"] == "top1"
        and top1["class_id"] == doc["prediction"]["class_id"]
        and len(top1["hits"]) == 3
    )
    assert runner["role"] == "runner-up" and runner["class_id"] == doc["runner_up"]["class_id"]
    d = [h["distance"] for h in top1["hits"]]
    assert d == sorted(d)
    assert_box(doc["box"])
    ov = Image.open(out / "overlay.png")
    assert ov.size == Image.open(photo).size and ov.mode == "RGB"
    assert not np.array_equal(np.asarray(ov), np.asarray(open_rgb(photo)))  # the heat-map is on it
    assert Image.open(out / "panel.png").width > 3 * 150  # photo, heat-map, evidence tiles
    before = (out / "explain.json").read_bytes()
    again = CliRunner().invoke(build_app(), args)
    assert again.exit_code == 2 and "--overwrite" in again.output
    assert (out / "explain.json").read_bytes() == before  # the earlier result is kept
    assert CliRunner().invoke(build_app(), [*args, "--overwrite"]).exit_code == 0


def test_cli_explain_bad_input(run_and_index: dict[str, Path], tmp_path: Path) -> None:
    run = str(run_and_index["run"])
    r = CliRunner().invoke(
        build_app(), ["explain", run, str(tmp_path / "nope.jpg"), "--out", str(tmp_path / "o")]
    )
    assert r.exit_code == 2 and "nope.jpg" in r.output
    other = make_tiny_prepared(tmp_path / "other", n_classes=3, per_class=4)
    r = CliRunner().invoke(
        build_app(), ["index", run, "--data", str(other), "--out", str(tmp_path / "idx3")]
    )  # an index over another label set
    with pytest.raises(GalleryIndexError, match="differ"):
        from carspotter.explain.photo import PhotoExplainer

        PhotoExplainer.from_run(run, tmp_path / "idx3")


def test_predict_explain_batch(run_and_index: dict[str, Path], tmp_path: Path) -> None:
    photos = [str(run_and_index["data"] / "images" / n) for n in ("c0_006.jpg", "c3_007.jpg")]
    out = tmp_path / "why"
    args = [
        "predict",
        str(run_and_index["run"]),
        *photos,
        "--explain",
        str(out),
        "--index",
        str(run_and_index["index"]),
    ]
    r = CliRunner().invoke(build_app(), args)
    assert r.exit_code == 0, r.output
    doc = json.loads((out / "explanations.json").read_text())
    assert [it["photo"] for it in doc["items"]] == photos
    for it in doc["items"]:
        sub = out / it["dir"]
        assert {p.name for p in sub.iterdir()} == {"overlay.png", "panel.png", "explain.json"}
        assert json.loads((sub / "explain.json").read_text())["prediction"] == it["prediction"]
    assert CliRunner().invoke(build_app(), args).exit_code == 2  # no silent overwrite
