"""Retrieval metrics on hand-worked examples, exact ties, and approximate indexes scored like exact ones."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from carspotter.retrieval import evaluate_index
from carspotter.retrieval.index import GalleryIndex
from carspotter.retrieval.knn import brute_force_search, knn_classify
from carspotter.retrieval.metrics import brute_force_retrieval_metrics, retrieval_metrics
from conftest import make_tiny_run


def test_recall_and_map_at_r_on_a_hand_worked_line() -> None:
    # class 0 at 0, 1.1, 3; class 1 at 2, 10 (no distance ties). Per query, the others by distance:
    #   0   → 1.1(0) 2(1) 3(0)    R=2: hit, miss        AP = (1/1)/2        = 0.5
    #   1.1 → 2(1) 0(0) 3(0)      R=2: miss, hit        AP = (1/2)/2        = 0.25
    #   3   → 2(1) 1.1(0) 0(0)    R=2: miss, hit        AP = 0.25
    #   2   → 1.1(0) 3(0) 0(0) 10 R=1: miss             AP = 0
    #   10  → 3(0) 2(1) ...       R=1: miss             AP = 0
    x = np.array([[0.0], [1.1], [3.0], [2.0], [10.0]], dtype=np.float32)
    y = np.array([0, 0, 0, 1, 1])
    m = retrieval_metrics(x, y, ks=(1, 2, 4, 8))
    assert m["recall_at_1"] == pytest.approx(1 / 5)
    assert m["recall_at_2"] == pytest.approx(4 / 5)  # only the query at 2 has no class-1 photo in its top 2
    assert m["recall_at_4"] == pytest.approx(1.0) and m["recall_at_8"] == pytest.approx(1.0)  # K > n - 1
    assert m["map_at_r"] == pytest.approx((0.5 + 0.25 + 0.25) / 5)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_exact_duplicates_within_a_class_do_not_confuse_self_exclusion(metric: str) -> None:
    # every photo twice (distance 0 to its twin: FAISS may list the twin before the query itself), one
    # class with 12 identical photos (more tied neighbours than Recall@8 looks at)
    rng = np.random.default_rng(3)
    base = rng.normal(size=(30, 8)).astype(np.float32)
    y_base = rng.integers(0, 5, 30)
    x = np.concatenate([base, base, np.repeat(rng.normal(size=(1, 8)), 12, axis=0).astype(np.float32)])
    y = np.concatenate([y_base, y_base, np.full(12, 5)])
    fast = retrieval_metrics(x, y, metric)
    slow = brute_force_retrieval_metrics(x, y, metric)
    for k, v in slow.items():
        assert fast[k] == pytest.approx(v, abs=1e-9), k
    assert fast["recall_at_1"] == pytest.approx(1.0)  # each photo's twin is its nearest other photo


def test_knn_k1_with_the_query_in_the_gallery_returns_its_own_label() -> None:
    rng = np.random.default_rng(0)
    g = rng.normal(size=(50, 6)).astype(np.float32)
    gy = rng.integers(0, 4, 50)
    for weighting in ("majority", "distance"):  # distance weighting must survive a zero distance
        pred, scores = knn_classify(g, gy, g, 1, "euclidean", weighting)
        np.testing.assert_array_equal(pred, gy)
        assert np.isfinite(scores).all()


def test_brute_force_search_orders_ties_stably() -> None:
    g = np.array([[1.0, 0], [1.0, 0], [0, 1.0]], dtype=np.float32)
    d, ids = brute_force_search(g, np.array([[1.0, 0]], dtype=np.float32), 3, "cosine")
    assert ids.tolist() == [[0, 1, 2]] and d[0, 0] == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize(("index_type", "nprobe"), [("IVF4,Flat", 4), ("HNSW32", 16)])
def test_evaluate_index_on_an_exhaustive_approximate_index_equals_flat(
    tmp_path: Path, index_type: str, nprobe: int
) -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 6, 300)
    x = (rng.normal(size=(300, 12)) + 1.5 * rng.normal(size=(6, 12))[y]).astype(np.float32)
    meta = [
        {"path": f"{i}.jpg", "label": int(v), "class_name": f"C{v}", "split": "test"} for i, v in enumerate(y)
    ]
    scores = {}
    for name in ("Flat", index_type):
        # nprobe = nlist visits every list; HNSW at efSearch 256 on 300 points is exhaustive in practice
        GalleryIndex.build(x, meta, "cosine", name, nprobe=nprobe, ef_search=256).save(tmp_path / name)
        scores[name] = evaluate_index(tmp_path / name)
        scores[name].save()
        assert (tmp_path / name / "metrics.json").is_file()
    flat, approx = scores["Flat"], scores[index_type]
    assert approx["index_type"] == index_type and approx["dim"] == 12 and approx["n"] == 300
    for k in ("recall_at_1", "recall_at_2", "recall_at_4", "recall_at_8", "map_at_r"):
        assert approx[k] == pytest.approx(flat[k], abs=1e-9), k
    assert flat["recall_at_1"] == pytest.approx(retrieval_metrics(x, y, "cosine")["recall_at_1"])


def test_knn_run_gallery_can_join_train_and_val(tmp_path: Path, tiny_prepared: Path) -> None:
    import json

    from carspotter.retrieval.knn import evaluate_knn_run

    run = make_tiny_run(tmp_path / "run")
    # tiny_prepared: 4 classes × (4 train, 2 val, 2 test)
    one = evaluate_knn_run(run, tiny_prepared, 1, "cosine", gallery_split="train")
    both = evaluate_knn_run(run, tiny_prepared, 1, "cosine", gallery_split="train+val")
    assert (one["n_gallery"], both["n_gallery"], both["n_images"]) == (16, 24, 8)
    one.save(), both.save()  # different galleries: different files, neither overwrites the other
    assert json.loads((run / "metrics_test_knn1_cosine.json").read_text())["gallery_split"] == "train"
    saved = json.loads((run / "metrics_test_knn1_cosine_gtrain-val.json").read_text())
    assert saved["gallery_split"] == "train+val" and set(saved) >= {
        "accuracy",
        "f1_macro",
        "predict_time_s",
        "k",
    }
    # the query photos themselves as the gallery: k=1 finds each photo at distance 0 → its own label
    assert evaluate_knn_run(run, tiny_prepared, 1, "cosine", gallery_split="test")["accuracy"] == 1.0
