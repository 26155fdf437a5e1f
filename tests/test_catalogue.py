"""The open catalogue: enrolment into real FAISS indexes, atomic swaps under kill -9, few-shot arithmetic
checked against slow loops, and classification over trained + enrolled classes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from carspotter.retrieval import catalogue as cat
from carspotter.retrieval.fewshot import (
    GalleryClassifier,
    cl2n,
    combine,
    mean_ci95,
    nearest_centroid,
    one_nn,
    run_episodes,
    sample_episode,
)
from carspotter.retrieval.index import GalleryIndex
from conftest import make_tiny_prepared, make_tiny_run

SRC = str(Path(__file__).resolve().parents[1] / "src")


# ------------------------------------------------------------------------- few-shot arithmetic vs loops
def slow_cl2n(x: np.ndarray, mean: np.ndarray) -> np.ndarray:
    out = []
    for v in np.asarray(x, np.float64):
        v = v / np.linalg.norm(v) - mean
        out.append(v / np.linalg.norm(v))
    return np.asarray(out)


def slow_nearest_centroid(sup, sup_y, qry):
    mean = np.mean([v / np.linalg.norm(v) for v in np.asarray(sup, np.float64)], axis=0)
    s, q = slow_cl2n(sup, mean), slow_cl2n(qry, mean)
    preds = []
    for v in q:
        best, best_d = None, np.inf
        for c in sorted(set(sup_y.tolist())):
            cen = s[sup_y == c].mean(0)
            d = float(((v - cen) ** 2).sum())
            if d < best_d:
                best, best_d = c, d
        preds.append(best)
    return np.asarray(preds)


def slow_one_nn(sup, sup_y, qry):
    mean = np.mean([v / np.linalg.norm(v) for v in np.asarray(sup, np.float64)], axis=0)
    s, q = slow_cl2n(sup, mean), slow_cl2n(qry, mean)
    return np.asarray([sup_y[int(np.argmin([((v - w) ** 2).sum() for w in s]))] for v in q])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nearest_centroid_and_1nn_match_slow_loops(seed: int) -> None:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(7, 24)) * 2
    sup_y = np.repeat(np.arange(7), 3)
    sup = centres[sup_y] + rng.normal(size=(21, 24)) * 4 + 5  # an offset the centring must remove
    qry = centres[rng.integers(0, 7, 60)] + rng.normal(size=(60, 24)) * 4 + 5
    nc = nearest_centroid(sup, sup_y, qry)
    nn = one_nn(sup, sup_y, qry)
    assert (nc == slow_nearest_centroid(sup, sup_y, qry)).all()
    assert (nn == slow_one_nn(sup, sup_y, qry)).all()
    assert (nc != nn).any()  # the two rules really differ on this noisy data
    mean = np.mean(sup / np.linalg.norm(sup, axis=1, keepdims=True), 0)
    np.testing.assert_allclose(cl2n(qry, mean), slow_cl2n(qry, mean), atol=1e-5)


def test_episodes_disjoint_and_ci() -> None:
    labels = np.repeat(np.arange(5), [3, 4, 6, 2, 8])
    sup, qry = sample_episode(labels, 2, np.random.default_rng(0))
    assert not set(sup) & set(qry) and len(sup) + len(qry) == len(labels) - 2  # class 3 (2 photos) skipped
    assert np.bincount(labels[sup], minlength=5).tolist() == [2, 2, 2, 0, 2]
    mu, ci = mean_ci95([0.5, 0.7, 0.6, 0.8])
    assert mu == pytest.approx(0.65) and ci == pytest.approx(1.96 * np.std([0.5, 0.7, 0.6, 0.8], ddof=1) / 2)
    # well separated classes: both rules perfect; a shuffled-label control is near chance
    rng = np.random.default_rng(1)
    y = np.repeat(np.arange(10), 8)
    x = np.eye(10, 32)[y] * 5 + rng.normal(size=(80, 32)) * 0.3
    res = run_episodes(x, y, [1, 3], episodes=4)
    assert res["3"]["nearest_centroid"]["accuracy"] == 1.0 and res["1"]["1nn"]["accuracy"] == 1.0
    bad = run_episodes(x, rng.permutation(y), [3], episodes=4)
    assert bad["3"]["nearest_centroid"]["accuracy"] < 0.4


def test_combine_unions_classes_and_sums_to_one() -> None:
    clf = np.array([[0.7, 0.3], [0.1, 0.9]])
    gal = np.array([[0.2, 0.0, 0.8], [0.5, 0.5, 0.0]])
    names, p = combine(clf, ["A", "B"], gal, ["B", "A", "New"], gallery_weight=0.5)
    assert names == ["A", "B", "New"]
    np.testing.assert_allclose(p, [[0.35, 0.25, 0.4], [0.3, 0.7, 0.0]], atol=1e-6)
    names, p = combine(None, [], gal, ["B", "A", "New"])
    assert names == ["B", "A", "New"] and np.allclose(p, gal)
    g = GalleryClassifier.from_vectors(np.eye(3, 4), np.array([0, 1, 2]), {0: "a", 1: "b", 2: "c"})
    pr = g.probs(np.eye(3, 4))
    assert pr.argmax(1).tolist() == [0, 1, 2] and np.allclose(pr.sum(1), 1)


# ----------------------------------------------------------------------------- enrolment on real FAISS
@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cat")
    data = make_tiny_prepared(root / "data", n_classes=6, per_class=8)
    run = make_tiny_run(root / "run", n_classes=4)
    return {"root": root, "data": data, "run": run}


def build(tiny: dict[str, Path], out: Path, index_type: str = "Flat", metric: str = "euclidean") -> Path:
    from carspotter.retrieval.build import build_index_from_run

    build_index_from_run(tiny["run"], tiny["data"], "train", metric, index_type, out, device="cpu")
    return out


def new_photos(tiny: dict[str, Path], cls: int, ids: range, name: str) -> list[cat.Photo]:
    imgs = tiny["data"] / "images"
    return [cat.Photo(name, f"c{cls}_{i:03d}", (imgs / f"c{cls}_{i:03d}.jpg").read_bytes()) for i in ids]


def snapshot(index_dir: Path) -> tuple[list, np.ndarray, str]:
    idx = GalleryIndex.load(index_dir)
    q = np.random.default_rng(0).normal(size=(5, int(idx.info["dim"]))).astype(np.float32)
    return idx.meta, idx.search(q, 3)[1], (index_dir / "index.faiss").read_bytes().hex()[:4000]


@pytest.mark.parametrize(
    ("index_type", "metric"), [("Flat", "euclidean"), ("HNSW8", "cosine"), ("IVF2,Flat", "euclidean")]
)
def test_enrol_appends_and_unenrol_restores(tiny, tmp_path: Path, index_type: str, metric: str) -> None:
    import faiss

    idx_dir = build(tiny, tmp_path / "idx", index_type, metric)
    before = GalleryIndex.load(idx_dir)
    n0, vec0 = before.index.ntotal, cat.remove_rows(before, np.ones(before.index.ntotal, bool)).vectors()
    ivf0 = faiss.try_extract_index_ivf(before.index)
    cent0 = ivf0.quantizer.reconstruct_n(0, ivf0.nlist) if ivf0 is not None else None

    # class 5's test photos (not in the train gallery) enrolled as a brand-new name
    res, _after = cat.enrol(idx_dir, new_photos(tiny, 5, range(6, 8), "Tesla Model 3 2024"))
    assert res.added == {"Tesla Model 3 2024": 2} and res.new_classes == ["Tesla Model 3 2024"]
    loaded = GalleryIndex.load(idx_dir)
    assert loaded.index.ntotal == n0 + 2 and len(loaded.meta) == n0 + 2
    ivf1 = faiss.try_extract_index_ivf(loaded.index)
    if ivf1 is not None:  # appended to the trained lists, not retrained
        np.testing.assert_array_equal(ivf1.quantizer.reconstruct_n(0, ivf1.nlist), cent0)
    new = loaded.meta[-1]
    assert new["root"] == "index" and new["split"] == "enrolled" and int(new["label"]) == 6  # 6 dataset names
    thumb = cat.photo_path(idx_dir, loaded, n0 + 1)
    assert thumb.is_file() and thumb.is_relative_to(idx_dir.resolve()) and Image.open(thumb).size[0] <= 512
    # the enrolled vector is the photo's own embedding: it is its own nearest neighbour
    from carspotter.data.images import open_rgb
    from carspotter.retrieval.query import embed_queries, embedder_for_index

    model = embedder_for_index(loaded)
    q = embed_queries(loaded, model, [open_rgb(tiny["data"] / "images" / "c5_007.jpg")])
    d, ids = loaded.search(q, 1)
    assert ids[0, 0] == n0 + 1 and d[0, 0] < 1e-3
    rows = {r["name"]: r for r in cat.list_classes(idx_dir)}
    assert rows["Tesla Model 3 2024"]["origin"] == "enrolled" and rows["Tesla Model 3 2024"]["photos"] == 2
    assert rows["Class 0"]["origin"] == "trained" and rows["Class 5"]["origin"] == "indexed"

    removed, _ = cat.unenrol(idx_dir, "Tesla Model 3 2024")
    assert removed == 2
    back = GalleryIndex.load(idx_dir)
    assert [m["path"] for m in back.meta] == [m["path"] for m in before.meta]
    got = cat.remove_rows(back, np.ones(back.index.ntotal, bool)).vectors()
    np.testing.assert_allclose(got, vec0, atol=1e-6)
    assert not list((idx_dir / "enrolled").glob("*.jpg"))
    assert "Tesla Model 3 2024" not in cat.read_catalogue(idx_dir)["enrolled"]
    assert not list(idx_dir.parent.glob(".idx.stage-*")) and not list(idx_dir.parent.glob(".idx.old-*"))


def test_duplicates_existing_names_and_bad_input(tiny, tmp_path: Path) -> None:
    idx_dir = build(tiny, tmp_path / "idx")
    n0 = len(GalleryIndex.load(idx_dir).meta)
    with pytest.raises(cat.CatalogueError, match="already in the gallery as 'Class 1'"):
        cat.enrol(idx_dir, new_photos(tiny, 1, range(0, 2), "Copy"))  # the gallery's own train photos
    with pytest.raises(cat.CatalogueError, match="--add-to-existing"):
        cat.enrol(idx_dir, new_photos(tiny, 1, range(6, 7), "Class 1"))
    assert len(GalleryIndex.load(idx_dir).meta) == n0  # refused requests change nothing
    twice = new_photos(tiny, 1, range(6, 8), "Class 1") + new_photos(tiny, 1, range(6, 7), "Class 1")
    res, idx = cat.enrol(idx_dir, twice, add_to_existing=True)
    assert res.added == {"Class 1": 2} and len(res.duplicates) == 1 and "c1_006" in res.duplicates[0]
    assert int(idx.meta[-1]["label"]) == 1 and res.new_classes == []
    with pytest.raises(cat.CatalogueError, match="came with the index"):
        cat.unenrol(idx_dir, "Class 2")
    with pytest.raises(cat.CatalogueError, match="no class 'Nope'"):
        cat.unenrol(idx_dir, "Nope")
    with pytest.raises(cat.CatalogueError, match="empty"):
        cat.enrol(idx_dir, [cat.Photo("  ", "x", b"123")])
    # a folder of class folders enrols several classes
    for c, name in ((4, "Alpha"), (5, "Beta")):
        d = tmp_path / "new" / name
        d.mkdir(parents=True)
        for i in (6, 7):
            (d / f"{i}.jpg").write_bytes((tiny["data"] / "images" / f"c{c}_{i:03d}.jpg").read_bytes())
    res, _ = cat.enrol(idx_dir, cat.photos_from_paths(None, [tmp_path / "new"]))
    assert res.added == {"Alpha": 2, "Beta": 2}


# The writer, run as a real process that stops right before the swap (its worst moment) and waits there.
WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from carspotter.retrieval import catalogue as cat
    data, idx = Path(sys.argv[1]), Path(sys.argv[2])
    photos = [cat.Photo("Killed", str(p), p.read_bytes()) for p in sorted((data / "images").glob("c5_00[67].jpg"))]
    def hang():
        print("READY", flush=True)
        time.sleep(120)
    cat.enrol(idx, photos, before_swap=hang if sys.argv[3] == "hang" else None)
    print("DONE", flush=True)
    """
)


def test_kill_9_mid_enrolment_leaves_the_previous_index(tiny, tmp_path: Path) -> None:
    idx_dir = build(tiny, tmp_path / "idx")
    meta0, ids0, bytes0 = snapshot(idx_dir)
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", WRITER, str(tiny["data"]), str(idx_dir)]
    proc = subprocess.Popen([*cmd, "hang"], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "READY"
        assert list(tmp_path.glob(".idx.stage-*"))  # the new version is fully written beside the index
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    meta1, ids1, bytes1 = snapshot(idx_dir)  # loads and searches exactly as before
    assert meta1 == meta0 and (ids1 == ids0).all() and bytes1 == bytes0
    assert not (idx_dir / "catalogue.json").exists() and not (idx_dir / "enrolled").exists()
    # the next writer cleans up the leftover and succeeds
    done = subprocess.run([*cmd, "go"], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0 and "DONE" in done.stdout, done.stderr
    assert not list(tmp_path.glob(".idx.stage-*"))
    assert len(GalleryIndex.load(idx_dir).meta) == len(meta0) + 2


def test_open_classification_names_enrolled_classes(tiny, tmp_path: Path) -> None:
    from carspotter.engine.batch_predict import predict_with_index

    four = make_tiny_prepared(tmp_path / "four", n_classes=4, per_class=8)  # classes 0-3 of `tiny`, as is
    idx_dir = build({**tiny, "data": four}, tmp_path / "idx")
    # neither the 4-class run nor its gallery has seen classes 4 and 5; enrol 2 photos of each, new names
    cat.enrol(
        idx_dir, new_photos(tiny, 4, range(4, 6), "New Four") + new_photos(tiny, 5, range(4, 6), "New Five")
    )
    imgs = tiny["data"] / "images"
    paths = [imgs / "c4_007.jpg", imgs / "c5_007.jpg"]
    # the gallery's own answer (w = 1) names the enrolled classes for other photos of them
    out = predict_with_index(tiny["run"], idx_dir, paths, k=3, gallery_weight=1.0)
    assert [o["top"][0]["class_name"] for o in out] == ["New Four", "New Five"]
    # `carspotter predict RUN --index` answers the same, as the hierarchical answer of every other photo
    from carspotter.engine.batch_predict import predict_files

    rows = predict_files(tiny["run"], paths, k=3, index_dir=idx_dir, gallery_weight=1.0)
    assert [r["class_name"] for r in rows] == ["New Four", "New Five"]
    assert [r["predictions"][0]["probability"] for r in rows] == pytest.approx(
        [o["top"][0]["prob"] for o in out], abs=1e-5
    )
    assert all({"make", "model", "year", "unknown"} <= set(r) for r in rows)
    # the mixture answers over the union (4 trained + 2 enrolled): a distribution over all 6
    out = predict_with_index(tiny["run"], idx_dir, paths, k=10, gallery_weight=0.5)
    assert all(len(o["top"]) == 6 and abs(sum(t["prob"] for t in o["top"]) - 1) < 1e-4 for o in out)
    assert {t["class_name"] for t in out[0]["top"]} == {
        "Class 0",
        "Class 1",
        "Class 2",
        "Class 3",
        "New Four",
        "New Five",
    }


def test_cli_enrol_classes_fewshot(tiny, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from carspotter.cli import build_app

    idx_dir = build(tiny, tmp_path / "idx")
    app, r = build_app(), CliRunner()
    res = r.invoke(
        app, ["enrol", str(idx_dir), "--class", "Cli Car", str(tiny["data"] / "images" / "c5_007.jpg")]
    )
    assert res.exit_code == 0 and "enrolled 1 photo(s) as 'Cli Car' (new class)" in res.output, res.output
    res = r.invoke(
        app, ["enrol", str(idx_dir), "--class", "Cli Car", str(tiny["data"] / "images" / "c5_006.jpg")]
    )
    assert res.exit_code == 2 and "--add-to-existing" in res.output
    res = r.invoke(app, ["classes", str(idx_dir), "--json"])
    rows = {x["name"]: x for x in json.loads(res.output)}
    assert rows["Cli Car"]["origin"] == "enrolled" and rows["Cli Car"]["date"]
    out = tmp_path / "fs.json"
    res = r.invoke(app, ["fewshot", str(idx_dir), "--data", str(tiny["data"]), "--split", "all",
                         "--shots", "1,3", "--episodes", "3", "--out", str(out)])  # fmt: skip
    assert res.exit_code == 0, res.output
    got = json.loads(out.read_text())["shots"]
    assert set(got) == {"1", "3"} and got["3"]["classes"] == 6 and len(got["3"]["1nn"]["per_episode"]) == 3
    res = r.invoke(app, ["fewshot", str(idx_dir), "--data", str(tiny["data"]), "--out", str(out)])
    assert res.exit_code == 2 and "already exists" in res.output  # an earlier result is never overwritten
