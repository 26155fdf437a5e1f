"""Answers people can trust: calibration (checked against netcal), the make → model → year hierarchy,
open-set "unknown", evaluate across class lists, and batch predict."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from carspotter.cli import build_app
from carspotter.config import ExperimentConfig, apply_overrides
from carspotter.data.manifest import read_manifest, write_manifest
from carspotter.engine.answer import Hierarchy, answer_lines, build_answers, hierarchy_metrics
from carspotter.engine.calibration import (
    CALIBRATION,
    Calibration,
    ece,
    fit_calibration,
    fit_temperature,
    load_calibration,
    reliability,
)
from carspotter.engine.evaluate import evaluate_run
from carspotter.engine.train import fit
from carspotter.engine.trust import open_set_metrics
from conftest import TINY_OVERRIDES, make_tiny_prepared


def overconfident(n: int = 800, c: int = 10, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    z = rng.normal(0, 1, (n, c))
    z[np.arange(n), y] += 1.5
    return torch.tensor(z * 4.0), y  # scaled up: far too confident for its ~60 % accuracy


# ---------------------------------------------------------------- calibration maths vs netcal
def test_ece_matches_netcal() -> None:
    from netcal.metrics import ECE

    for seed in range(3):
        logits, y = overconfident(seed=seed)
        p = torch.softmax(logits, 1).numpy()
        assert ece(p, y) == pytest.approx(ECE(15).measure(p, y), abs=1e-9)
        assert ece(p, y, 10) == pytest.approx(ECE(10).measure(p, y), abs=1e-9)
    conf, acc, count = reliability(p, y)
    assert count.sum() == len(y) and np.nanmax(conf) <= 1 and np.nanmax(acc) <= 1


def test_temperature_matches_netcal_and_lowers_nll_and_ece() -> None:
    from netcal.scaling import TemperatureScaling

    logits, y = overconfident()
    t = fit_temperature(logits, torch.as_tensor(y))
    ts = TemperatureScaling()
    ts.fit(torch.softmax(logits, 1).numpy(), y)
    ours = torch.softmax(logits / t, 1).numpy()
    assert np.abs(ours - ts.transform(torch.softmax(logits, 1).numpy())).max() < 2e-3
    assert t > 2  # overconfident logits need softening
    cal = fit_calibration(logits, y)
    m = cal.fit_metrics
    assert m["nll"] < m["nll_uncalibrated"] and m["ece"] < m["ece_uncalibrated"] / 2
    # the open-set threshold lets 95 % of these known photos through
    assert np.mean(cal.scores(logits).numpy() >= cal.threshold) == pytest.approx(0.95, abs=0.01)


def test_open_set_metrics_against_a_slow_count() -> None:
    rng = np.random.default_rng(1)
    known, unknown = rng.normal(1, 1, 200), rng.normal(0, 1, 150)
    m = open_set_metrics(known, unknown)
    pairs = [(1.0 if k > u else 0.5 if k == u else 0.0) for k in known for u in unknown]
    assert m["auroc"] == pytest.approx(np.mean(pairs), abs=1e-12)
    t = np.sort(known)[int(np.floor(0.05 * (len(known) - 1)))]
    assert m["fpr_at_95tpr"] == pytest.approx(np.mean(unknown >= t))


# ---------------------------------------------------------------- hierarchy
NAMES = [
    "Audi TTS Coupe 2012",
    "Audi TT RS Coupe 2012",
    "Audi S4 Sedan 2012",
    "Audi S4 Sedan 2007",
    "BMW M3 Coupe 2012",
    "Chevrolet Silverado 1500 Extended Cab 2012",
]


def answer_for(probs: list[float], cal: Calibration | None = None) -> dict:
    logits = torch.log(torch.tensor([probs], dtype=torch.float64)).float()
    return build_answers(logits, NAMES, cal or Calibration(), k=5)[0]


def test_hierarchy_sums_and_the_answer_line() -> None:
    a = answer_for([0.74, 0.12, 0.06, 0.05, 0.02, 0.01])
    assert a["make"] == {"name": "Audi", "probability": pytest.approx(0.97)}
    assert a["model"]["name"] == "TTS" and a["model"]["probability"] == pytest.approx(0.74)
    assert a["body"] == {"name": "Coupe", "probability": pytest.approx(0.88)}
    assert a["class_name"] == "Audi TTS Coupe 2012" and a["year"]["value"] == 2012
    assert answer_lines(a) == ["Audi 97 % → TTS Coupe 2012 74 % (TT RS Coupe 2012 12 %)"]
    assert [p["class_name"] for p in a["predictions"]][:2] == NAMES[:2] and len(a["predictions"]) == 5
    # the make decides first: BMW's single class beats each Audi class, but Audi as a whole is likelier
    b = answer_for([0.2, 0.2, 0.1, 0.1, 0.35, 0.05])
    assert b["make"]["name"] == "Audi" and b["predictions"][0]["class_name"] == "BMW M3 Coupe 2012"
    # when the classes of the model disagree on the year, the line says which years are likely
    c = answer_for([0.02, 0.02, 0.5, 0.4, 0.03, 0.03])
    assert c["model"]["name"] == "S4" and c["year"]["likely"] == [2007, 2012]
    assert answer_lines(c)[-1] == "year 2012 (2007–2012 likely)"


def test_hierarchy_metrics() -> None:
    h = Hierarchy.from_names(NAMES)
    probs = np.eye(6)[[1, 3, 4, 5]] * 0.9 + 0.1 / 6  # predicted classes 1, 3, 4, 5
    labels = np.array([0, 2, 4, 0])  # true: TTS (→ TT RS: same make), S4 2012 (→ S4 2007), M3, TTS (→ truck)
    m = hierarchy_metrics(h, probs, labels)
    assert m["make_accuracy"] == pytest.approx(3 / 4)
    assert m["model_accuracy"] == pytest.approx(2 / 4)  # S4 and M3
    assert m["body_accuracy"] == pytest.approx(3 / 4)  # coupe for coupe, sedan for sedan, M3
    assert m["year_within_1_accuracy"] == pytest.approx(3 / 4)  # 2007 for 2012 is off by 5


def test_unknown_answer_keeps_the_guesses() -> None:
    cal = Calibration(thresholds={"msp": 0.9})
    a = answer_for([0.4, 0.3, 0.1, 0.1, 0.05, 0.05], cal)
    assert a["unknown"] and a["open_set"]["threshold"] == 0.9 and a["class_name"] == "Audi TTS Coupe 2012"
    assert answer_lines(a)[0].startswith("not sure")
    assert not answer_for([0.95, 0.01, 0.01, 0.01, 0.01, 0.01], cal)["unknown"]


# ---------------------------------------------------------------- end to end on a tiny run
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("trust")
    data4 = make_tiny_prepared(root / "data4", n_classes=4, per_class=8)
    cfg = apply_overrides(ExperimentConfig(), {**TINY_OVERRIDES, "epochs": 3})
    fit(cfg, data4, root / "run", progress=False)
    return {"root": root, "data4": data4, "run": root / "run"}


def test_training_writes_calibration_and_evaluate_uses_it(tiny_run: dict[str, Path]) -> None:
    run = tiny_run["run"]
    cal = load_calibration(run)
    assert (run / CALIBRATION).is_file() and cal.temperature > 0 and cal.threshold is not None
    assert cal.n_fit == 8 and cal.fitted_on.endswith(":val")
    m = evaluate_run(run, device="cpu")
    for key in ("make_accuracy", "model_accuracy", "body_accuracy", "year_within_1_accuracy"):
        assert 0 <= m[key] <= 1
    assert {"ece", "ece_uncalibrated", "nll"} <= m.keys() and m["n_unknown"] == 0
    assert "open_set_auroc" not in m
    # calibrate again from the CLI: same file, same temperature (deterministic)
    res = CliRunner().invoke(build_app(), ["calibrate", str(run), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert load_calibration(run).temperature == pytest.approx(cal.temperature, rel=1e-6)
    bad = CliRunner().invoke(build_app(), ["calibrate", str(run), "--split", "test"])
    assert bad.exit_code == 2 and "leak" in bad.output


def test_evaluate_other_dataset_matches_names_and_scores_unknowns(tiny_run: dict[str, Path]) -> None:
    root, run = tiny_run["root"], tiny_run["run"]
    data6 = make_tiny_prepared(root / "data6", n_classes=6, per_class=8)
    # another re-pack: classes in reverse label order; classes 0-3 are the run's, 4-5 are new
    write_manifest(data6, [dataclasses.replace(r, label=5 - r.label) for r in read_manifest(data6)])
    m = evaluate_run(run, data6, split="test", device="cpu")
    written = m.save()
    assert [w.name for w in written] == ["metrics_test@data6.json", "predictions_test@data6.csv"]
    with open(written[1]) as f:
        rows = list(csv.DictReader(f))
    assert sum(r["label"] == "-1" for r in rows) == 4 and {"unknown"} <= rows[0].keys()
    same = evaluate_run(run, tiny_run["data4"], split="test", device="cpu")
    assert m["n_unknown"] == 4 and m["n_known"] == 8 and m["unknown_classes"] == ["Class 4", "Class 5"]
    assert m["accuracy"] == pytest.approx(same["accuracy"])  # the known photos score exactly as before
    assert 0 <= m["open_set_auroc"] <= 1 and 0 <= m["open_set_fpr_at_95tpr"] <= 1
    assert "open_set_auroc_energy" in m


def test_batch_predict_folder_with_broken_files(tiny_run: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    run, data = tiny_run["run"], tiny_run["data4"]
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    imgs = sorted((data / "images").glob("*.jpg"))
    for i, p in enumerate(imgs[:10]):
        shutil.copy(p, folder / ("sub" if i % 2 else "") / p.name)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (folder / "sub" / "empty.png").write_bytes(b"")
    out = tmp_path / "p.csv"
    app = build_app()
    res = CliRunner().invoke(app, ["predict", str(run), str(folder), "--out", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12 and "wrote 12 rows" in res.output
    errors = {Path(r["path"]).name: r["error"] for r in rows if r["error"]}
    assert errors == {"broken.jpg": "truncated image", "empty.png": "empty file"} or set(errors) == {
        "broken.jpg",
        "empty.png",
    }
    good = [r for r in rows if not r["error"]]
    assert all(r["make"] == "Class" and r["class"].startswith("Class ") for r in good)
    assert all(len(r["top5_classes"].split(";")) == 4 for r in good)  # 4 classes in this run
    # never overwrite without --overwrite
    before = out.read_text()
    again = CliRunner().invoke(app, ["predict", str(run), str(folder), "--out", str(out)])
    assert again.exit_code == 2 and "--overwrite" in again.output and out.read_text() == before
    ok = CliRunner().invoke(app, ["predict", str(run), str(folder), "--out", str(out), "--overwrite"])
    assert ok.exit_code == 0
    # --json: the structure /api/classify returns, one object per photo
    js = CliRunner().invoke(app, ["predict", str(run), str(imgs[0]), "--json"])
    assert js.exit_code == 0, js.output
    [a] = json.loads(js.output)
    assert {
        "make",
        "model",
        "body",
        "year",
        "class_name",
        "probability",
        "unknown",
        "predictions",
    } <= a.keys()
    human = CliRunner().invoke(app, ["predict", str(run), str(imgs[0])], terminal_width=200)
    assert human.exit_code == 0 and "→" in human.output and "%" in human.output


def test_report_make_table_and_confusions_against_a_plain_count() -> None:
    from carspotter.report.trust import make_confusions, make_table, reliability_png

    y = np.array([0, 0, 1, 2, 3, 4, 4, 5])
    p = np.array([1, 4, 1, 3, 2, 4, 0, 5])  # TTS→TT RS (same make), TTS→BMW, S4s swap years, M3→TTS
    t = make_table(NAMES, y, p, "x")
    rows = {r[0]: r for r in t.rows}
    assert rows["Audi"][1:] == ["4", "5", "20.0 %", "80.0 %"]  # 1 of 5 exact; 4 of 5 keep the make
    assert rows["BMW"][1:] == ["1", "2", "50.0 %", "50.0 %"]
    pairs = make_confusions(NAMES, y, p).rows
    assert sorted(tuple(r[:3]) for r in pairs) == [("Audi", "BMW", "1"), ("BMW", "Audi", "1")]
    png = reliability_png(np.array([0.9, 0.6, 0.3]), np.array([True, False, True]), "t")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_retrieval_protocol_run_masks_its_untrained_classes(tmp_path: Path) -> None:
    """Trained on classes 0-3 of a 6-class manifest (4-5 only in test, as the Cars196 protocol does): the run
    has 6 outputs, but 4-5 are never named, and their photos count as unknown on the same data."""
    data = make_tiny_prepared(tmp_path / "data", n_classes=6, per_class=8)
    recs = [dataclasses.replace(r, split="test") if r.label >= 4 else r for r in read_manifest(data)]
    write_manifest(data, recs)
    cfg = apply_overrides(ExperimentConfig(), {**TINY_OVERRIDES, "epochs": 1})
    fit(cfg, data, tmp_path / "run", progress=False)
    cal = load_calibration(tmp_path / "run")
    assert cal.known_labels == [0, 1, 2, 3]
    p = cal.probs(torch.zeros(2, 6))
    assert torch.all(p[:, 4:] == 0) and torch.allclose(p[:, :4], torch.full((2, 4), 0.25))
    m = evaluate_run(tmp_path / "run", data, split="test", device="cpu")
    assert m["n_unknown"] == 16 and m["n_known"] == 8 and m["unknown_classes"] == ["Class 4", "Class 5"]
    assert 0 <= m["open_set_auroc"] <= 1
    # splits joined by "+": val (known photos the run never trained on) + test, with no combined manifest
    j = evaluate_run(tmp_path / "run", data, split="val+test", device="cpu")
    assert j["n_known"] == 8 + 8 and j["n_unknown"] == 16 and j["n_images"] == 32
    assert [p.name for p in j.save()] == ["metrics_val-test.json", "predictions_val-test.csv"]
