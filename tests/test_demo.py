"""`carspotter demo` end to end at a tiny scale: every run dir, the index and a report with numbers."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from carspotter.config import apply_overrides
from carspotter.demo import SCALES, plan_steps, scale_overrides
from carspotter.presets import load_preset


def test_plan_covers_the_nine_reference_experiments_and_a_strong_recipe() -> None:
    steps = plan_steps()
    prefixes = [s.name.split("-")[0] + "-" + s.name.split("-")[1] for s in steps]
    assert prefixes[:9] == [f"seed-{g}{i}" for g in "trs" for i in (1, 2, 3)]
    assert steps[-1].name.startswith("strong-")
    knn = {s.name[:7]: s.network_from for s in steps if s.kind == "knn"}
    assert knn["seed-r1"].startswith("seed-t2") and knn["seed-r2"].startswith("seed-t2")
    assert knn["seed-r3"].startswith("seed-t3")


def test_scaling_keeps_the_recipe_shape() -> None:
    cfg = load_preset(next(s.preset for s in plan_steps() if s.name.startswith("seed-t3")))
    o = scale_overrides(cfg, "progressive", 3, SCALES["default"], {"mode": "random"}, "resnet10t", 10)
    scaled = apply_overrides(cfg, o)
    assert scaled.train.epochs == 3 and scaled.data.img_size == SCALES["default"].img_size
    sched = scaled.model.unfreeze_schedule
    assert sched[0] == 0 and max(sched) <= 2 and sched[max(sched)] == -1  # still head → … → all
    assert list(sched.values()) == sorted(sched.values(), key=lambda n: 99 if n < 0 else n)
    assert scaled.schedule.step_size < cfg.schedule.step_size
    assert scaled.model.arch == "resnet10t" and scaled.model.pretrained is False
    o = scale_overrides(
        cfg, "progressive", 3, SCALES["default"], {"mode": "file", "path": "/w.safetensors"}, "x", 10
    )
    assert o["model.weights"] == "/w.safetensors"


@pytest.mark.slow
def test_demo_tiny_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from carspotter.demo import run_demo

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as on an offline machine: no download is even tried

    lines: list[str] = []
    out = tmp_path / "demo"
    doc = run_demo(out, scale="tiny", budget_s=60, echo=lines.append)
    text = "\n".join(lines)
    steps = plan_steps()
    for s in steps:
        run = out / "runs" / s.name
        assert (run / "config.yaml").is_file() and (run / "model.json").is_file(), s.name
        if s.kind == "train":
            assert (run / "metrics_test.json").is_file(), s.name
            assert (run / "predictions_test.csv").is_file() or s.family == "metric", s.name
        else:
            assert list(run.glob("metrics_test_knn*.json")), s.name
        assert re.search(rf"{re.escape(s.name)}\s.*test (acc|R@1)\s+\d+\.\d %\s+\d+\.\d s", text), s.name
    assert (out / "index" / "index.faiss").is_file() and (out / "index" / "metrics.json").is_file()
    plan = json.loads((out / "demo.json").read_text())
    assert plan == json.loads(json.dumps(doc)) and len(plan["steps"]) == len(steps)
    assert all(st["overrides"] for st in plan["steps"] if st["kind"] == "train")
    html = (out / "report" / "report.html").read_text()
    tables = {}
    metric_title = "Metric learning / retrieval quality"
    for title in ("Transfer learning", "Retrieval (kNN)", "From scratch", metric_title, "Hyperparameters"):
        table = re.search(rf"<h[23]>{re.escape(title)}</h[23]>\s*<table>(.*?)</table>", html, re.S)
        assert table, title
        tables[title] = table.group(1)
    for title in ("Transfer learning", "Retrieval (kNN)", "From scratch"):  # every row has a test accuracy
        rows = re.findall(r"<tr>(.*?)</tr>", tables[title], re.S)[1:]
        assert rows and all(re.search(r">\d+\.\d %<", r) for r in rows), title
    assert re.search(r">\d+\.\d %<", tables[metric_title])
    assert f'<td class="num">{SCALES["tiny"].img_size}</td>' in tables["Hyperparameters"]
    assert "data:image/png;base64," in html and "retrieval_index.png" not in html
    assert "RANDOM" in text and "random weights" in html.lower()  # offline: said plainly in both places
    serve = plan["serve_command"]
    assert serve.startswith("carspotter serve ") and "--index" in serve and serve in text
    with pytest.raises(FileExistsError):
        run_demo(out, scale="tiny", echo=lines.append)


def test_budget_scales_only_the_epochs_that_fit() -> None:
    import time

    from carspotter.demo import Budget

    b = Budget(budget_s=100, reserve_s=10, t0=time.perf_counter())
    assert b.factor(10) == 1.0  # nothing measured yet: run as planned
    b.record(units=2, secs=20)  # 10 s per unit
    # 100 - 10 reserve - 20 fixed (2 units) = 70 s left for 8 scalable units (80 s) → 7/8.
    assert abs(b.factor(10, fixed_units=2) - 0.875) < 0.01
    assert b.factor(1) == 1.0 and b.factor(100, 99) == 0.0
    # A prior damps the first (start-up heavy) measurement: 2 units at 10 s + 2 prior units at 5 s.
    p = Budget(budget_s=100, reserve_s=10, t0=time.perf_counter(), prior_spu=5.0, prior_units=2.0)
    assert p.factor(1000) == 1.0  # still nothing measured
    p.record(units=2, secs=20)
    assert abs(p.sec_per_unit() - 7.5) < 1e-9


def test_knn_config_reuses_the_network_and_keeps_the_knn_identity() -> None:
    from carspotter.demo import config_diff, knn_config

    steps = {s.name[:7]: s for s in plan_steps()}
    knn = load_preset(steps["seed-r3"].preset)
    net = apply_overrides(load_preset(steps["seed-t3"].preset), {"arch": "resnet10t", "epochs": 2})
    cfg = knn_config(knn, net)
    assert (cfg.name, cfg.task, cfg.reference, cfg.retrieval) == (
        knn.name,
        "knn",
        knn.reference,
        knn.retrieval,
    )
    assert cfg.model == net.model and cfg.train.epochs == 2
    diff = config_diff(knn, cfg)
    assert diff["model.arch"] == "resnet10t" and "retrieval.k" not in diff and "name" not in diff
