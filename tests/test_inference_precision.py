"""One precision and one TTA per run: evaluate, predict, serve and index agree; kNN embedding options."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from tests.conftest import make_tiny_run

from carspotter.config import ConfigError, ExperimentConfig, apply_overrides, load_config
from carspotter.data.dataset import PreparedDataset
from carspotter.engine.checkpoint import load_run, read_model_info
from carspotter.engine.evaluate import evaluate_run, predict_images
from carspotter.models.inference import autocast_dtype, with_tta
from carspotter.rundir import knn_metrics_name, predictions_name


def _tiny_run(root: Path, data: Path) -> Path:
    """make_tiny_run plus the config.yaml `evaluate` reads (batch size, data root)."""
    from safetensors.torch import load_file, save_file

    from carspotter.config import dump_config

    run = make_tiny_run(root)
    sd = load_file(str(run / "best.safetensors"))
    sd["classifier.weight"] = (
        sd["classifier.weight"] * 60
    )  # larger logits: bf16 vs fp32 moves top-1 probs ~8e-4
    save_file(sd, str(run / "best.safetensors"))
    cfg = apply_overrides(ExperimentConfig(), {"data.root": str(data), "batch_size": 4})
    dump_config(cfg, run / "config.yaml")
    return run


def _set_model_json(run: Path, **fields: object) -> None:
    p = run / "model.json"
    d = json.loads(p.read_text())
    d.update(fields)
    p.write_text(json.dumps(d))


def _eval_top1(run: Path, split: str) -> dict[str, int]:
    return {p: c for p, (c, _) in _eval_preds(run, split).items()}


def _eval_preds(run: Path, split: str) -> dict[str, tuple[int, float]]:
    with open(run / predictions_name(split)) as f:
        return {r["path"]: (int(r["pred"]), float(r["confidence"])) for r in csv.DictReader(f)}


def test_amp_field_validates_and_reads_old_boolean_configs(tmp_path: Path) -> None:
    assert ExperimentConfig().train.amp == "auto"
    for old, new in ((True, "auto"), (False, "none"), ("bf16", "bf16"), ("FP16", "fp16")):
        p = tmp_path / "c.yaml"
        p.write_text(yaml.safe_dump({"train": {"amp": old}}))
        assert load_config(p).train.amp == new
    with pytest.raises(ConfigError, match=r"train\.amp.*int8"):
        apply_overrides(ExperimentConfig(), {"train.amp": "int8"})
    with pytest.raises(ConfigError, match=r"eval\.tta"):
        apply_overrides(ExperimentConfig(), {"tta": "five-crop"})


def test_auto_is_fp32_on_every_cpu_and_bf16_is_an_explicit_opt_in() -> None:
    cpu = torch.device("cpu")
    assert autocast_dtype("auto", cpu) is None  # whatever the CPU supports natively
    assert autocast_dtype("none", cpu) is None
    assert autocast_dtype("bf16", cpu) == torch.bfloat16


@pytest.mark.parametrize(("amp", "tta"), [("auto", "none"), ("bf16", "none"), ("none", "flip")])
def test_evaluate_predict_and_serve_give_the_same_top1_for_every_photo(
    tmp_path: Path, tiny_prepared: Path, amp: str, tta: str
) -> None:
    from carspotter.serve.inference import Predictor

    run = _tiny_run(tmp_path / "run", tiny_prepared)
    _set_model_json(run, amp=amp, tta=tta)
    for split in ("train", "test"):
        m = evaluate_run(run, tiny_prepared, split=split, device="cpu")
        m.save()
        assert m["autocast"] == ("bfloat16" if amp == "bf16" else "off") and m["tta"] == tta
        by_eval = _eval_top1(run, split)
        paths = [str(tiny_prepared / p) for p in by_eval]
        by_predict = predict_images(run, paths, k=1)
        assert [r["top"][0]["label"] for r in by_predict] == list(by_eval.values())
        # same precision, not just the same argmax: bf16 against fp32 differs by ~1e-3 here
        conf = [c for _, c in _eval_preds(run, split).values()]
        assert [r["top"][0]["prob"] for r in by_predict] == pytest.approx(conf, abs=2e-5)
        predictor = Predictor(run)
        try:
            images = [PreparedDataset(tiny_prepared, split).load_image(i) for i in range(len(paths))]
            served = predictor.classify_batch(images, [1] * len(images))
        finally:
            predictor.close()
        assert [r["class_id"] for r in served] == list(by_eval.values())
        # the `carspotter predict` path (files → answers, CAM box from the same forward) agrees too
        from functools import partial

        from carspotter.engine.batch_predict import predict_files
        from carspotter.explain.zoom import Looker
        from carspotter.models.inference import autocast_dtype as amp_dtype

        looker = partial(Looker, device="cpu", autocast=amp_dtype(amp, "cpu"), tta=tta)
        rows = predict_files(run, [Path(p) for p in paths], k=1, looker=looker)
        assert [r["class_id"] for r in rows] == list(by_eval.values())
        assert all(len(r["box"]) == 4 for r in rows)


def test_flip_tta_logits_are_the_mean_of_the_two_passes(tmp_path: Path, tiny_prepared: Path) -> None:
    run = _tiny_run(tmp_path / "run", tiny_prepared)
    model, _ = load_run(run)
    ds = PreparedDataset(tiny_prepared, "test", model.preprocess.transform())
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    with torch.no_grad():
        by_hand = (model(x) + model(torch.flip(x, dims=(3,)))) / 2
        assert torch.allclose(with_tta(model, "flip")(x), by_hand, atol=1e-6)
        assert not torch.allclose(model(x), by_hand, atol=1e-4)  # the flip changes something here
    # evaluate --tta flip: its probabilities are the softmax of those mean logits, in a file of its own
    evaluate_run(run, tiny_prepared, split="test", device="cpu", tta="flip").save()
    with open(run / predictions_name("test_tta-flip")) as f:
        rows = list(csv.DictReader(f))
    probs = by_hand.softmax(dim=1)
    for i, r in enumerate(rows):
        assert int(r["pred"]) == int(probs[i].argmax())
        assert float(r["confidence"]) == pytest.approx(float(probs[i].max()), abs=1e-5)
    # the run's stored default is used when no --tta is given
    _set_model_json(run, tta="flip")
    assert read_model_info(run).tta == "flip"
    assert evaluate_run(run, tiny_prepared, split="test", device="cpu")["tta"] == "flip"


def test_trained_run_records_its_precision_and_tta(tmp_path: Path, tiny_prepared: Path) -> None:
    from tests.conftest import TINY_OVERRIDES

    from carspotter.engine.train import fit

    cfg = apply_overrides(ExperimentConfig(), {**TINY_OVERRIDES, "epochs": 1, "tta": "flip"})
    fit(cfg, tiny_prepared, tmp_path / "run", progress=False)
    info = read_model_info(tmp_path / "run")
    assert (info.amp, info.tta) == ("none", "flip")
    with open(tmp_path / "run" / "metrics.csv") as f:
        row = next(csv.DictReader(f))
    assert 0.0 <= float(row["train_eval_accuracy"]) <= 1.0 and float(row["train_eval_loss"]) > 0


# ---- kNN embedding options -------------------------------------------------------------------------------


def test_embedding_sources_and_flip_averaging_match_the_obvious_computation(
    tmp_path: Path, tiny_prepared: Path
) -> None:
    from carspotter.retrieval.embed import embed_dataset

    run = _tiny_run(tmp_path / "run", tiny_prepared)
    model, _ = load_run(run)
    ds = PreparedDataset(tiny_prepared, "train", model.preprocess.transform())
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    with torch.no_grad():
        feats, logits = model.forward_features(x), model(x)
        feats_flip = (feats + model.forward_features(torch.flip(x, dims=(3,)))) / 2
    np.testing.assert_allclose(embed_dataset(model, ds, source="features"), feats.numpy(), atol=1e-5)
    np.testing.assert_allclose(embed_dataset(model, ds, source="logits"), logits.numpy(), atol=1e-5)
    got = embed_dataset(model, ds, source="features", tta="flip")
    np.testing.assert_allclose(got, feats_flip.numpy(), atol=1e-5)


def test_l2_normalised_euclidean_ranks_like_cosine_and_distance_vote_matches_a_loop() -> None:
    from carspotter.retrieval.knn import brute_force_search, faiss_search, knn_classify, l2_normalize

    rng = np.random.default_rng(0)
    g, q = rng.normal(size=(60, 8)).astype(np.float32), rng.normal(size=(15, 8)).astype(np.float32)
    labels = rng.integers(0, 5, size=60)
    _, ids_cos = brute_force_search(g, q, 7, "cosine")
    _, ids_l2 = faiss_search(l2_normalize(g), l2_normalize(q), 7, "euclidean")
    np.testing.assert_array_equal(ids_cos, ids_l2)
    np.testing.assert_allclose(np.linalg.norm(l2_normalize(g), axis=1), 1.0, atol=1e-6)
    pred, _ = knn_classify(l2_normalize(g), labels, l2_normalize(q), 7, "euclidean", "distance", 5)
    for i, qi in enumerate(l2_normalize(q)):  # the slow obvious loop
        d = np.sqrt(((l2_normalize(g).astype(np.float64) - qi) ** 2).sum(1))
        order = np.argsort(d, kind="stable")[:7]
        score = np.zeros(5)
        for j in order:
            score[labels[j]] += 1.0 / (d[j] + 1e-8)
        assert pred[i] == int(score.argmax())


def test_knn_run_options_are_recorded_and_keep_earlier_result_files(
    tmp_path: Path, tiny_prepared: Path
) -> None:
    from carspotter.retrieval.knn import evaluate_knn_run

    run = _tiny_run(tmp_path / "run", tiny_prepared)
    plain = evaluate_knn_run(run, tiny_prepared, 3, "cosine", gallery_split="train+val")
    tuned = evaluate_knn_run(
        run,
        tiny_prepared,
        3,
        "euclidean",
        gallery_split="train+val",
        weighting="distance",
        source="features",
        tta="flip",
        normalize=True,
    )
    assert (plain["source"], plain["tta"], plain["normalize"]) == ("auto", "none", False)
    assert (tuned["source"], tuned["tta"], tuned["normalize"], tuned["n_gallery"]) == (
        "features",
        "flip",
        True,
        24,
    )
    plain.save()
    tuned.save()
    assert (run / knn_metrics_name("test", 3, "cosine", "majority", "train+val")).is_file()
    name = knn_metrics_name("test", 3, "euclidean", "distance", "train+val", "", ("features", "flip", "l2"))
    assert name == "metrics_test_knn3_euclidean_distance_gtrain-val_features_flip_l2.json"
    assert (run / name).is_file()


def test_index_records_the_runs_precision_and_queries_use_it(tmp_path: Path, tiny_prepared: Path) -> None:
    import copy

    from carspotter.retrieval.build import build_index_from_run
    from carspotter.retrieval.query import embed_queries

    run = _tiny_run(tmp_path / "run", tiny_prepared)
    _set_model_json(run, amp="bf16")
    index = build_index_from_run(run, tiny_prepared, "test", "cosine", out_dir=tmp_path / "ix", device="cpu")
    assert index.info["amp"] == "bf16"
    model, _ = load_run(run)
    ds = PreparedDataset(tiny_prepared, "test")
    photos = [ds.load_image(i) for i in range(len(ds))]
    fp32_index = copy.copy(index)
    fp32_index.info = {**index.info, "amp": "none"}

    gallery = np.asarray(
        index.vectors()
    )  # asarray: faiss.contrib.torch_utils (loaded by PML) returns tensors

    def gap(idx: object) -> float:  # largest distance between a query's unit vector and its gallery vector
        q = embed_queries(idx, model, photos)  # type: ignore[arg-type]
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
        return float(np.abs(q - gallery).max())

    assert gap(index) < 0.25 * gap(fp32_index)  # queries embedded like the gallery: bf16 both sides
