"""The report renders from hand-made run dirs (documented file formats only); missing pieces show "—"."""

from __future__ import annotations

import base64
import csv
import html as htmllib
import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from carspotter.config import ExperimentConfig, apply_overrides, dump_config
from carspotter.report import build_report
from carspotter.report.load import load_run_record
from carspotter.report.plots import confusion, most_confused_pairs
from carspotter.report.tables import pct
from carspotter.utils import OutputExistsError

CLASSES = ["Audi A4 2012", "Audi A5 2012", "BMW M3 2010", "Ford F-150 2007"]


def make_run(
    root: Path,
    name: str,
    *,
    task: str = "classification",
    arch: str = "tf_efficientnet_lite0",
    reference: dict | None = None,
    metrics: dict | None = None,
    epochs: int = 3,
    preds: list[tuple[int, int]] | None = None,
    knn: dict | None = None,
    overrides: dict | None = None,
) -> Path:
    run = root / name
    run.mkdir(parents=True)
    cfg = apply_overrides(
        ExperimentConfig(name=name, description=f"{name} description", task=task),
        {"model.arch": arch, "epochs": epochs, **(overrides or {})},
    )
    cfg.reference = reference or {}
    dump_config(cfg, run / "config.yaml")
    (run / "model.json").write_text(
        json.dumps(
            {
                "model": {"arch": arch},
                "num_classes": len(CLASSES),
                "class_names": CLASSES,
                "preprocess": {"img_size": 64, "mean": [0.5] * 3, "std": [0.5] * 3},
                "resize_size": None,
            }
        )
    )
    with (run / "metrics.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "epoch",
                "lr",
                "train_loss",
                "train_accuracy",
                "val_loss",
                "val_accuracy",
                "val_f1_macro",
                "epoch_time_s",
            ]
        )
        for e in range(1, epochs + 1):
            w.writerow([e, 0.001, 2.0 / e, 0.2 * e, 2.2 / e, 0.18 * e, 0.15 * e, 1.5])
    if metrics is not None:
        (run / "metrics.json").write_text(json.dumps(metrics))
    if preds is not None:
        with (run / "predictions.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "label", "pred", "confidence", "top5_labels", "top5_probs"])
            for i, (y, p) in enumerate(preds):
                w.writerow([f"images/{i}.jpg", y, p, 0.9, f"{p};{y}", "0.9;0.1"])
    if knn is not None:
        (run / "metrics_knn_k5_euclidean.json").write_text(json.dumps(knn))
    return run


def _metrics(acc: float, loss: float = 0.8771, t: float = 2.5) -> dict:
    return {
        "loss": loss,
        "accuracy": acc,
        "top5_accuracy": 0.99,
        "f1_macro": acc - 0.01,
        "precision_macro": acc - 0.02,
        "recall_macro": acc - 0.03,
        "predict_time_s": t,
        "images_per_s": 40 / t,
        "n_images": 40,
        "split": "test",
    }


# (true, pred): class 0 is mistaken for class 1 three times, class 2 for class 3 once.
PREDS = [(0, 0)] * 7 + [(0, 1)] * 3 + [(1, 1)] * 10 + [(2, 2)] * 9 + [(2, 3)] + [(3, 3)] * 10


@pytest.fixture()
def runs(tmp_path: Path) -> list[Path]:
    return [
        make_run(
            tmp_path,
            "seed-t2",
            reference={"accuracy": 73.8},
            metrics=_metrics(0.6123),
            preds=PREDS,
            knn=_metrics(0.5432, loss=1.5, t=0.75) | {"k": 5, "metric": "euclidean"},
            overrides={"pretrained": False},
        ),
        make_run(
            tmp_path,
            "seed-r3",
            task="knn",
            reference={"accuracy": 0.734},
            metrics=_metrics(0.4444),
            overrides={"retrieval.k": 7, "retrieval.metric": "cosine"},
        ),
        make_run(
            tmp_path, "seed-s3", arch="scratch_cnn", reference={"accuracy": 72.3}, metrics=_metrics(0.3217)
        ),
        make_run(
            tmp_path, "seed-s1", arch="scratch_cnn", reference={"accuracy": 8.9}, metrics=None, epochs=2
        ),
        make_run(
            tmp_path,
            "strong-metric",
            task="metric",
            overrides={"train.loss": "proxy_anchor"},
            metrics={
                "recall_at_1": 0.8111,
                "recall_at_2": 0.85,
                "recall_at_4": 0.9,
                "recall_at_8": 0.95,
                "map_at_r": 0.4321,
            },
        ),
    ]


def _tables(html: str) -> dict[str, str]:
    """h3 title → the table html that follows it."""
    return {
        htmllib.unescape(m.group(1)): m.group(2)
        for m in re.finditer(r"<h[23]>([^<]*)</h[23]>\s*<table>(.*?)</table>", html, re.S)
    }


def test_report_html_holds_every_table_number_and_image(runs: list[Path], tmp_path: Path) -> None:
    out = build_report(runs, tmp_path / "report")
    html = out.read_text()
    tables = _tables(html)
    for title in [
        "Transfer learning",
        "Retrieval (kNN)",
        "From scratch",
        "Metric learning / retrieval quality",
        "Hyperparameters",
        "Most-confused class pairs (seed-t2)",
    ]:
        assert title in tables, title
    header = (
        "Experiment",
        "Model Description",
        "Loss",
        "Accuracy",
        "F1 Score",
        "Precision",
        "Recall",
        "Predict Time",
        "Reference accuracy",
    )
    for title in ["Transfer learning", "Retrieval (kNN)", "From scratch"]:
        ths = re.findall(r"<th>(.*?)</th>", tables[title])
        assert tuple(ths) == header
    tl = tables["Transfer learning"]
    assert all(
        s in tl for s in ["seed-t2", "0.877", "61.2 %", "60.2 %", "59.2 %", "58.2 %", "2.50 s", "73.8 %"]
    )
    knn = tables["Retrieval (kNN)"]
    assert "seed-t2 + kNN (k=5, euclidean)" in knn and "54.3 %" in knn and "1.500" in knn
    assert "seed-r3" in knn and "44.4 %" in knn and "73.4 %" in knn  # fraction reference shown as percent
    fs = tables["From scratch"]
    assert "32.2 %" in fs and "72.3 %" in fs and "seed-s1" in fs and "8.9 %" in fs
    assert "seed-t2" not in fs and "seed-s3" not in tl  # grouped by task and arch
    assert "81.1 %" in tables["Metric learning / retrieval quality"]
    assert "43.2 %" in tables["Metric learning / retrieval quality"]
    hp = tables["Hyperparameters"]
    assert "scratch CNN" in hp and "k=7, cosine, majority" in hp and "random init" in hp
    pairs = tables["Most-confused class pairs (seed-t2)"]
    first = re.findall(r"<tr>(.*?)</tr>", pairs, re.S)[1]  # row after the header
    assert "Audi A4 2012" in first and "Audi A5 2012" in first and ">3<" in first and "30.0 %" in first
    # Images are embedded (no external assets) and are real PNGs; the same PNGs lie beside the report.
    uris = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(uris) >= 5  # curves for 5 runs... (kNN run has curves too) + confusion
    assert all(base64.b64decode(u)[:8] == b"\x89PNG\r\n\x1a\n" for u in uris)
    assert not re.search(r'(src|href)="(?!data:)', html)
    pngs = sorted(p.name for p in out.parent.glob("*.png"))
    assert "confusion_seed-t2.png" in pngs and "curves_seed-s3.png" in pngs
    md = (out.parent / "report.md").read_text()
    assert "| seed-t2 |" in md and "![" in md and "61.2 %" in md


def test_missing_files_show_dash_and_a_note(runs: list[Path], tmp_path: Path) -> None:
    bare = tmp_path / "bare-run"
    bare.mkdir()  # no files at all
    out = build_report([*runs, bare], tmp_path / "report")
    html = out.read_text()
    fs = _tables(html)["From scratch"]
    row = next(r for r in re.findall(r"<tr>(.*?)</tr>", fs, re.S) if "seed-s1" in r)
    assert row.count('class="missing">—<') == 6  # loss, acc, f1, precision, recall, time
    assert "seed-s1: no metrics_test.json" in html
    assert "bare-run: no config.yaml" in html or "bare-run" in html
    assert "random weights" in html.lower()


def test_report_of_nothing_still_renders(tmp_path: Path) -> None:
    out = build_report([], tmp_path / "r")
    html = out.read_text()
    assert "No transfer-learning run was given." in html and "From scratch" in html


def test_refuses_to_overwrite_without_flag(runs: list[Path], tmp_path: Path) -> None:
    build_report(runs[:1], tmp_path / "r")
    with pytest.raises(OutputExistsError):
        build_report(runs[:1], tmp_path / "r")
    build_report(runs[:2], tmp_path / "r", overwrite=True)
    assert "seed-r3" in (tmp_path / "r" / "report.html").read_text()
    other = tmp_path / "not-a-report"
    other.mkdir()
    (other / "precious.txt").write_text("keep")
    with pytest.raises(OutputExistsError):
        build_report(runs[:1], other, overwrite=True)
    assert (other / "precious.txt").read_text() == "keep"


def test_malformed_metrics_json_is_a_note_not_a_crash(runs: list[Path], tmp_path: Path) -> None:
    (runs[2] / "metrics.json").write_text("{not json")
    rec = load_run_record(runs[2])
    assert rec.metrics is None and any("unreadable" in n for n in rec.notes)
    html = build_report(runs, tmp_path / "r").read_text()
    assert "unreadable" in html


def test_confused_pairs_match_a_plain_count() -> None:
    y = [0, 0, 1, 1, 2, 2, 2, 0]
    p = [1, 1, 1, 0, 2, 0, 0, 0]
    cm = confusion(y, p, 3)
    pairs = most_confused_pairs(cm, ["a", "b", "c"])
    counts: dict[tuple[int, int], int] = {}
    for t, q in zip(y, p, strict=True):
        if t != q:
            counts[(t, q)] = counts.get((t, q), 0) + 1
    assert {(t, q): n for t, q, n, _ in pairs} == {("abc"[a], "abc"[b]): n for (a, b), n in counts.items()}
    assert pairs[0][2] == 2


def test_pct_formats_fractions_and_percentages() -> None:
    assert pct(0.738) == "73.8 %" and pct(73.8) == "73.8 %" and pct(None) == "—" and pct(float("nan")) == "—"


def test_cli_report_writes_and_refuses_clobber(runs: list[Path], tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from carspotter.cli import build_app

    app, out = build_app(), tmp_path / "cli-report"
    args = ["report", *map(str, runs[:3]), "--out", str(out)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert (out / "report.html").is_file() and "report.html" in res.output
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2 and "--overwrite" in res.output
    res = CliRunner().invoke(app, ["report", str(tmp_path / "nope"), "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "nope" in res.output


@pytest.fixture()
def one_thread() -> Iterator[None]:
    """Tiny models on a shared 2-core box: one torch thread is several times faster than two fighting."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_report_from_a_real_run_and_index(tiny_prepared: Path, tmp_path: Path, one_thread: None) -> None:
    """Real fit → evaluate → index → report: the retrieval grid embeds held-out photos with the run's net."""
    from carspotter.engine.evaluate import evaluate_run
    from carspotter.engine.train import fit
    from carspotter.retrieval import evaluate_index
    from carspotter.retrieval.build import build_index_from_run

    cfg = apply_overrides(
        ExperimentConfig(name="tiny-cnn", description="tiny scratch CNN"),
        {"arch": "scratch_cnn", "model.channels": [8, 16], "model.hidden_dim": 16, "img_size": 32,
         "batch_size": 8, "epochs": 2, "device": "cpu", "pretrained": False},
    )  # fmt: skip
    run = tmp_path / "run"
    fit(cfg, tiny_prepared, run, progress=False)
    evaluate_run(run, tiny_prepared, device="cpu").save()
    index_dir = tmp_path / "index"
    build_index_from_run(run, tiny_prepared, split="train", out_dir=index_dir, device="cpu")
    evaluate_index(index_dir).save()
    html = build_report([run], tmp_path / "report", index_dirs=[index_dir]).read_text()
    assert "held-out test photos embedded by run" in html
    assert (tmp_path / "report" / "retrieval_index.png").is_file()
    tables = _tables(html)
    assert "<td>index/</td>" in tables["Metric learning / retrieval quality"]
    assert "tiny-cnn" in tables["From scratch"] and "Confusion matrix" in html
    # Without the run on disk, the grid falls back to gallery photos as queries (no crash, no model).
    import shutil

    shutil.rmtree(run)
    html = build_report([], tmp_path / "report2", index_dirs=[index_dir]).read_text()
    assert "gallery photos as queries" in html and "retrieval_index.png" not in html
    assert (tmp_path / "report2" / "retrieval_index.png").is_file()
