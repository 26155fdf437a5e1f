"""Retrieval core: FAISS paths against slow obvious loops, index round-trips, and the CLI end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from carspotter.retrieval.index import GalleryIndex, GalleryIndexError
from carspotter.retrieval.knn import brute_force_search, faiss_search, knn_classify
from carspotter.retrieval.metrics import brute_force_retrieval_metrics, retrieval_metrics
from carspotter.utils import OutputExistsError
from conftest import make_tiny_run


def _clustered(n: int = 150, d: int = 16, c: int = 7, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    centres = rng.normal(size=(c, d))
    return (rng.normal(size=(n, d)) + 0.8 * centres[y]).astype(np.float32), y


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_faiss_search_matches_brute_force(metric: str) -> None:
    x, _ = _clustered()
    d1, i1 = faiss_search(x[:100], x[100:], 5, metric)
    d2, i2 = brute_force_search(x[:100], x[100:], 5, metric)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(d1, d2, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("weighting", ["majority", "distance"])
def test_knn_classify_matches_brute_force(metric: str, weighting: str) -> None:
    x, y = _clustered()
    p_fast, scores = knn_classify(x[:100], y[:100], x[100:], 7, metric, weighting)
    p_slow, _ = knn_classify(x[:100], y[:100], x[100:], 7, metric, weighting, search=brute_force_search)
    np.testing.assert_array_equal(p_fast, p_slow)
    np.testing.assert_allclose(scores.sum(1), 1.0, rtol=1e-6)
    assert (p_fast == y[100:]).mean() > 1 / 7  # clustered data: far above chance


def test_majority_tie_goes_to_nearest_class() -> None:
    gallery = np.array([[0.0], [1.0], [10.0], [11.0]], dtype=np.float32)
    labels = np.array([1, 0, 0, 1])
    # query at 0.1: neighbours 0 (label 1), 1 (label 0) — a 1:1 tie at k=2 → the nearest, label 1
    pred, _ = knn_classify(gallery, labels, np.array([[0.1]], dtype=np.float32), 2)
    assert pred.tolist() == [1]


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_retrieval_metrics_match_brute_force(metric: str) -> None:
    x, y = _clustered(n=90)
    fast = retrieval_metrics(x, y, metric)
    slow = brute_force_retrieval_metrics(x, y, metric)
    for k, v in slow.items():
        assert fast[k] == pytest.approx(v, abs=1e-9), k


def test_retrieval_metrics_agree_with_pytorch_metric_learning() -> None:
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    x, y = _clustered(n=120)
    ours = retrieval_metrics(x, y, "euclidean")
    calc = AccuracyCalculator(include=("precision_at_1", "mean_average_precision_at_r"), device=None)
    pml = calc.get_accuracy(x, y, x, y, ref_includes_query=True)
    assert ours["recall_at_1"] == pytest.approx(pml["precision_at_1"], abs=1e-6)
    assert ours["map_at_r"] == pytest.approx(pml["mean_average_precision_at_r"], abs=1e-6)


def test_perfect_and_singleton_edge_cases() -> None:
    x = np.array([[0.0, 0], [0.1, 0], [5, 5], [5.1, 5], [20, 20]], dtype=np.float32)
    y = np.array([0, 0, 1, 1, 2])  # class 2 has no other photo: counts as a miss, excluded from MAP@R
    m = retrieval_metrics(x, y, ks=(1, 2))
    assert m["recall_at_1"] == pytest.approx(4 / 5)
    assert m["map_at_r"] == pytest.approx(1.0)
    assert m["n_queries_with_positives"] == 4


def _meta(y: np.ndarray) -> list[dict]:
    return [
        {"path": f"images/{i}.jpg", "label": int(v), "class_name": f"C{v}", "split": "train"}
        for i, v in enumerate(y)
    ]


@pytest.mark.parametrize("index_type", ["Flat", "HNSW32", "IVF8,Flat", "IVF8,PQ4"])
def test_index_roundtrip(tmp_path: Path, index_type: str) -> None:
    x, y = _clustered(n=400, d=16)
    idx = GalleryIndex.build(x, _meta(y), metric="cosine", index_type=index_type, nprobe=8, ef_search=32)
    d1, i1 = idx.search(x[:10], 5)
    idx.save(tmp_path / "ix")
    back = GalleryIndex.load(tmp_path / "ix")
    d2, i2 = back.search(x[:10], 5)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(d1, d2)
    assert back.meta[3]["class_name"] == f"C{y[3]}" and back.info["nprobe"] == 8
    if index_type in ("Flat", "HNSW32", "IVF8,Flat"):  # exact-enough: each vector finds itself first
        assert (i2[:, 0] == np.arange(10)).all()


def test_index_refuses_overwrite_and_bad_queries(tmp_path: Path) -> None:
    x, y = _clustered(n=30)
    idx = GalleryIndex.build(x, _meta(y))
    idx.save(tmp_path / "ix")
    with pytest.raises(OutputExistsError):
        idx.save(tmp_path / "ix")
    idx.save(tmp_path / "ix", overwrite=True)
    with pytest.raises(GalleryIndexError, match="16-d"):
        idx.search(np.zeros((1, 3), np.float32), 2)
    with pytest.raises(ValueError, match="index_factory"):
        GalleryIndex.build(x, _meta(y), index_type="NotAnIndex")
    with pytest.raises(GalleryIndexError, match="not an index directory"):
        GalleryIndex.load(tmp_path)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "carspotter", *args], capture_output=True, text=True, timeout=120
    )


def test_cli_index_search_evaluate(tmp_path: Path, tiny_prepared: Path) -> None:
    run = make_tiny_run(tmp_path / "run")
    r = _cli("index", str(run), "--data", str(tiny_prepared), "--metric", "cosine", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    ix = run / "index-train"
    assert (ix / "index.faiss").is_file() and json.loads((ix / "index.json").read_text())["n"] == 16
    r = _cli("search", str(ix), str(tiny_prepared / "images" / "c1_000.jpg"), "--k", "3")
    assert r.returncode == 0, r.stderr
    assert "Class 1" in r.stdout  # the query photo itself is in the gallery: distance 0, its own class
    r = _cli("evaluate", str(ix))
    assert r.returncode == 0, r.stderr
    m = json.loads((ix / "metrics.json").read_text())
    assert set(m) >= {"recall_at_1", "recall_at_2", "recall_at_4", "recall_at_8", "map_at_r"}
    r = _cli("index", str(run), "--data", str(tiny_prepared), "--device", "cpu")
    assert r.returncode == 2 and "already exists" in r.stderr  # never clobbers
    r = _cli("evaluate", str(run), "--knn", "3", "--data", str(tiny_prepared), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    knn = json.loads((run / "metrics_test_knn3_euclidean.json").read_text())
    assert knn["n_images"] == 8 and 0.0 <= knn["accuracy"] <= 1.0 and knn["predict_time_s"] > 0


def test_bare_backbone_index(tmp_path: Path, tiny_prepared: Path) -> None:
    from safetensors.torch import save_file

    from carspotter.config import ModelConfig
    from carspotter.models.factory import create_model

    r = _cli("index", "--backbone", "scratch_cnn", "--data", str(tiny_prepared), "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "--weights" in r.stderr  # random weights would make an unreproducible index
    backbone = create_model(ModelConfig(arch="scratch_cnn"), 0, 32).backbone
    save_file(backbone.state_dict(), str(tmp_path / "w.safetensors"))
    r = _cli(
        "index",
        "--backbone",
        "scratch_cnn",
        "--weights",
        str(tmp_path / "w.safetensors"),
        "--data",
        str(tiny_prepared),
        "--img-size",
        "32",
        "--out",
        str(tmp_path / "ix"),
        "--device",
        "cpu",
    )
    assert r.returncode == 0, r.stderr
    info = json.loads((tmp_path / "ix" / "index.json").read_text())
    assert info["backbone"] == "scratch_cnn" and info["preprocess"]["img_size"] == 32


def test_knn_against_saved_index_equals_slow_path(tmp_path: Path, tiny_prepared: Path) -> None:
    """`evaluate INDEX --knn K --data D`: frozen-feature kNN with no run, equal to embedding both sides by hand
    and voting over a brute-force search."""
    from safetensors.torch import save_file

    from carspotter.config import ModelConfig
    from carspotter.data.dataset import splits_dataset
    from carspotter.models.factory import create_model
    from carspotter.retrieval.build import backbone_model, build_index_from_run
    from carspotter.retrieval.embed import embed_dataset
    from carspotter.retrieval.knn import evaluate_knn, evaluate_knn_index

    backbone = create_model(ModelConfig(arch="scratch_cnn"), 0, 32).backbone
    save_file(backbone.state_dict(), str(tmp_path / "w.safetensors"))
    weights = str(tmp_path / "w.safetensors")
    model = backbone_model("scratch_cnn", weights, 32)
    info = {"backbone": "scratch_cnn", "weights": weights}
    build_index_from_run(
        model, tiny_prepared, "train+val", "cosine", out_dir=tmp_path / "ix", device="cpu", model_info=info
    )
    got = evaluate_knn_index(tmp_path / "ix", tiny_prepared, 3, "test", device="cpu")
    got.save()
    assert (tmp_path / "ix" / "metrics_test_knn3.json").is_file()
    assert got["gallery_split"] == "train+val" and got["metric"] == "cosine"

    tf = model.preprocess.transform()
    gallery = splits_dataset(tiny_prepared, "train+val", tf)
    queries = splits_dataset(tiny_prepared, "test", tf)
    slow = evaluate_knn(
        embed_dataset(model, gallery),
        np.asarray(gallery.labels),
        embed_dataset(model, queries),
        np.asarray(queries.labels),
        3,
        "cosine",
        num_classes=len(gallery.class_names),
        search=brute_force_search,
    )
    assert got["n_images"] == slow["n_images"] == len(queries)
    for key in ("accuracy", "f1_macro", "precision_macro", "recall_macro"):
        assert got[key] == pytest.approx(slow[key]), key

    r = _cli("evaluate", str(tmp_path / "ix"), "--knn", "1", "--data", str(tiny_prepared), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "ix" / "metrics_test_knn1.json").read_text())["k"] == 1
    r = _cli("evaluate", str(tmp_path / "ix"), "--knn", "1")
    assert r.returncode != 0 and "--data" in r.stderr


def test_pq_indexes_skip_polysemous_training() -> None:
    """Polysemous training only serves Hamming-filtered search and made PQ training 30x slower."""
    import faiss

    x, y = _clustered(n=400, d=16)
    for kind in ("IVF4,PQ4", "PQ4"):
        idx = GalleryIndex.build(x, _meta(y), index_type=kind).index
        inner = faiss.try_extract_index_ivf(idx) or idx
        assert faiss.downcast_index(inner).do_polysemous_training is False, kind
