"""`carspotter demo`: the whole study end to end, scaled down to minutes on a laptop CPU.

It runs the real presets — the three transfer-learning, three kNN and three from-scratch experiments of the
reference study plus a strong recipe — through the real `fit` / `evaluate_run` / `evaluate_knn_run` /
`build_index_from_run` / `build_report`, only with config overrides that make them small (image size,
epochs, batch). The kNN experiments reuse the fine-tuned transfer networks, as in the reference study.
Epochs are scaled to a time budget, measured as the demo goes.
"""

from __future__ import annotations

import copy
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from carspotter.config import ExperimentConfig, apply_overrides, to_dict
from carspotter.utils import atomic_write_json, prepare_out_dir

MARKER = "demo.json"
# Strong recipes run after the nine reference experiments: one from scratch, one metric-learning.
STRONG = ("strong-cnn-scratch", "strong-proxyanchor-efficientnet-lite0")
Echo = Callable[[str], None]


@dataclass(frozen=True)
class Scale:
    """How small the demo makes everything (all applied as config overrides on the presets)."""

    synth: dict[str, Any]  # make_synthetic arguments
    img_size: int | None  # None: the preset's own
    batch_size: int | None
    epochs: dict[str, int]  # per experiment family; missing: the preset's own
    budget_reserve_s: float  # kept for index + report


SCALES: dict[str, Scale] = {
    "default": Scale(
        synth={"classes": 24, "per_class": 40, "size": 64, "seed": 0},
        img_size=48,
        batch_size=32,
        epochs={"frozen": 8, "finetune": 4, "progressive": 5, "scratch": 12, "strong": 10, "metric": 3},
        budget_reserve_s=25.0,
    ),
    "tiny": Scale(
        synth={"classes": 6, "per_class": 8, "size": 40, "seed": 0},
        img_size=32,
        batch_size=16,
        epochs={"frozen": 1, "finetune": 1, "progressive": 1, "scratch": 1, "strong": 1, "metric": 1},
        budget_reserve_s=5.0,
    ),
    "full": Scale(
        synth={"classes": 24, "per_class": 40, "size": 96, "seed": 0},
        img_size=None,
        batch_size=None,
        epochs={},
        budget_reserve_s=60.0,
    ),
}
# Relative cost of one epoch per family (fine-tuning the small backbone = 1) and of a step's fixed part
# (model set-up, test evaluation; the frozen run embeds the photos once); seconds per unit are measured.
# Measured at the default scale (1 thread): ~5 s per unit under heavy load.
REL_COST = {
    "frozen": 0.08, "finetune": 1.0, "progressive": 0.75, "scratch": 0.35, "strong": 0.6, "metric": 1.2,
    "knn": 0.3,
}  # fmt: skip
FIXED_COST = {"frozen": 0.5, "knn": 0.0}
PRIOR_SPU, PRIOR_UNITS = 5.0, 3.0
FIXED_DEFAULT = 0.4


def step_units(family: str, epochs: int) -> float:
    return FIXED_COST.get(family, FIXED_DEFAULT) + (
        epochs * REL_COST[family] if family != "knn" else REL_COST["knn"]
    )


# Extra channel-width cut for the strong from-scratch recipe at demo scale (its 5 wide blocks cost ~4× the
# small backbone at 64 px); an override on the preset, recorded in demo.json like every other.
STRONG_DEMO_CHANNELS = [32, 64, 128, 192, 256]


@dataclass
class Step:
    name: str  # run dir name (= preset name)
    preset: str
    kind: str  # train | knn
    family: str  # frozen | finetune | progressive | scratch | strong | knn
    overrides: dict[str, Any] = field(default_factory=dict)
    network_from: str | None = None  # kNN: the transfer run whose network embeds the photos
    result: dict[str, Any] = field(default_factory=dict)


def find_preset(prefix: str) -> str:
    """The preset whose name starts with `prefix` (`seed-t1` → `seed-t1-resnet50-frozen`)."""
    from carspotter.presets import list_presets

    names = [n for n in list_presets() if n == prefix or n.startswith(prefix + "-")]
    if not names:
        raise FileNotFoundError(f"no preset named {prefix}-… (known: {', '.join(list_presets())})")
    return names[0]


def _family(cfg: ExperimentConfig, strong: bool) -> str:
    if cfg.task in ("knn", "metric"):
        return cfg.task
    if cfg.model.arch == "scratch_cnn":
        return "strong" if strong else "scratch"
    if cfg.model.unfreeze_schedule:
        return "progressive"
    return "frozen" if cfg.model.freeze == "backbone" else "finetune"


def plan_steps(strong: tuple[str, ...] = STRONG) -> list[Step]:
    """The nine reference experiments (+ strong recipes) in the reference order; kNN after its network."""
    from carspotter.presets import load_preset

    steps: list[Step] = []
    for p in [
        "seed-t1",
        "seed-t2",
        "seed-t3",
        "seed-r1",
        "seed-r2",
        "seed-r3",
        "seed-s1",
        "seed-s2",
        "seed-s3",
        *strong,
    ]:
        name = find_preset(p)
        cfg = load_preset(name)
        fam = _family(cfg, p.startswith("strong"))
        src = None
        if fam == "knn":  # the reference study embedded with its fine-tuned T2 (R1, R2) and T3 (R3) networks
            src = find_preset("seed-t3" if p == "seed-r3" else "seed-t2")
        steps.append(Step(name, name, "knn" if fam == "knn" else "train", fam, network_from=src))
    return steps


def _scaled_epoch(e: int, old: int, new: int) -> int:
    return min(new - 1, round(e * new / max(old, 1))) if new > 1 else 0


def scale_overrides(
    cfg: ExperimentConfig,
    family: str,
    epochs: int | None,
    scale: Scale,
    weights: dict[str, Any],
    backbone: str,
    steps_per_epoch: int,
    cpu: bool = True,
) -> dict[str, Any]:
    """Overrides that shrink one preset to demo size while keeping its recipe (schedule shapes scale too)."""
    o: dict[str, Any] = {}
    if scale.img_size:
        o["data.img_size"] = scale.img_size
        o["data.resize_size"] = None
    if scale.batch_size:
        o["data.batch_size"] = scale.batch_size
    old = cfg.train.epochs
    new = epochs or old
    if new != old:
        o["train.epochs"] = new
        if cfg.schedule.name == "step":
            o["schedule.step_size"] = max(1, round(cfg.schedule.step_size * new / old))
        if cfg.schedule.warmup_epochs:
            o["schedule.warmup_epochs"] = min(
                cfg.schedule.warmup_epochs, round(cfg.schedule.warmup_epochs * new / old)
            )
        if cfg.model.unfreeze_schedule:
            sched: dict[int, int] = {}
            for e, n in sorted(cfg.model.unfreeze_schedule.items()):
                sched[_scaled_epoch(e, old, new)] = n  # later stages win a collision: still progressive
            o["model.unfreeze_schedule"] = sched
        if cfg.train.warmup_head_epochs:
            o["train.warmup_head_epochs"] = _scaled_epoch(cfg.train.warmup_head_epochs, old, new)
        if cfg.train.early_stop_patience:
            o["train.early_stop_patience"] = None
        if cfg.train.ema_decay:  # keep the EMA horizon a quarter of the (much shorter) run
            o["train.ema_decay"] = round(min(cfg.train.ema_decay, 1 - 4 / max(new * steps_per_epoch, 8)), 4)
    if (
        family == "strong"
        and scale.img_size
        and cfg.model.arch == "scratch_cnn"
        and len(cfg.model.channels) == 5
    ):
        o["model.channels"] = STRONG_DEMO_CHANNELS
    if cfg.model.arch != "scratch_cnn":
        o["model.arch"] = backbone
        o["model.pretrained"] = weights["mode"] == "download"
        o["model.weights"] = weights.get("path")
        if scale.img_size and cfg.train.amp in ("bf16", "fp16") and cpu:
            o["train.amp"] = (
                "none"  # bf16 autocast measured ~2× slower than fp32 for the backbone at ≤ 64 px on CPU
            )
    return o


def resolve_weights(weights: Path | None, echo: Echo) -> dict[str, Any]:
    """Where the transfer backbone's ImageNet weights come from: a file, a download, or nowhere (random)."""
    if weights is not None:
        if not Path(weights).is_file():
            raise FileNotFoundError(f"--weights {weights}: file not found")
        return {"mode": "file", "path": str(Path(weights).resolve())}
    from carspotter.utils import hub_reachable

    if hub_reachable():
        return {"mode": "download", "path": None}
    echo(
        "WARNING: no ImageNet weights — offline and no --weights file. The transfer-learning and kNN "
        "experiments start from RANDOM weights, so their numbers say nothing about transfer learning. "
        "Pass --weights PATH (e.g. tf_efficientnet_lite0 .safetensors) for the real thing."
    )
    return {"mode": "random", "path": None}


class Budget:
    """Scales planned epochs so the remaining steps fit the time left, from the seconds measured so far.

    The first step also pays one-off start-up costs, so measurements are blended with a prior worth
    `prior_units` of work at `prior_spu` seconds per unit until enough has been measured.
    """

    def __init__(
        self, budget_s: float, reserve_s: float, t0: float, prior_spu: float = 0.0, prior_units: float = 0.0
    ) -> None:
        self.budget_s, self.reserve_s, self.t0 = budget_s, reserve_s, t0
        self.units_done, self.secs_done = prior_units, prior_spu * prior_units
        self.measured = False

    def record(self, units: float, secs: float) -> None:
        self.units_done += units
        self.secs_done += secs
        self.measured = True

    def sec_per_unit(self) -> float | None:
        return self.secs_done / self.units_done if self.measured and self.units_done > 0 else None

    def factor(self, remaining_units: float, fixed_units: float = 0.0) -> float:
        """Share of the planned epochs that fits; the fixed part of each step cannot be scaled away."""
        spu = self.sec_per_unit()
        scalable = remaining_units - fixed_units
        if spu is None or scalable <= 0:
            return 1.0
        left = self.budget_s - self.reserve_s - (time.perf_counter() - self.t0) - spu * fixed_units
        return max(0.0, min(1.0, left / (spu * scalable)))


def _steps_per_epoch(data_dir: Path, cfg: ExperimentConfig, batch: int | None) -> int:
    from carspotter.data.manifest import read_manifest, split_records

    n = len(split_records(read_manifest(data_dir), cfg.data.train_split))
    return max(1, -(-n // (batch or cfg.data.batch_size)))


def knn_config(knn: ExperimentConfig, network: ExperimentConfig) -> ExperimentConfig:
    """The kNN preset's identity and retrieval settings on the network (model, data, training) it reuses."""
    out = copy.deepcopy(network)
    out.name, out.task, out.reference = knn.name, knn.task, dict(knn.reference)
    out.description = f"{knn.description} [network: {network.name}, fine-tuned in this demo, reused]"
    out.retrieval = copy.deepcopy(knn.retrieval)
    return out


def config_diff(a: ExperimentConfig, b: ExperimentConfig) -> dict[str, Any]:
    """Dotted keys whose values differ from `a` to `b` (what demo.json records as overrides)."""

    def flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            if isinstance(v, dict) and k not in ("reference", "unfreeze_schedule"):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[prefix + k] = v
        return out

    fa, fb = flat(to_dict(a)), flat(to_dict(b))
    return {k: v for k, v in fb.items() if fa.get(k) != v and k not in ("description", "data.root")}


def _make_knn_run(cfg: ExperimentConfig, source: Path, run_dir: Path) -> None:
    """A kNN experiment's run dir: its own config.yaml, the network of the transfer run it reuses."""
    run_dir.mkdir(parents=True)
    from carspotter.rundir import BEST, MODEL_JSON

    for f in (MODEL_JSON, BEST):
        src = source / f
        if not src.is_file():
            continue
        try:
            os.link(src, run_dir / f)  # same bytes, no copy
        except OSError:
            shutil.copy2(src, run_dir / f)
    from carspotter.config import dump_config

    dump_config(cfg, run_dir / "config.yaml")


def _acc(m: dict[str, Any] | None) -> str:
    """ "test acc  35.9 %" (classification, kNN) or "test R@1  21.7 %" (metric learning)."""
    m = m or {}
    for key, label in (("accuracy", "test acc"), ("recall_at_1", "test R@1")):
        if isinstance(m.get(key), int | float):
            return f"{label} {100 * m[key]:5.1f} %"
    return "test acc    —  "


def process_age() -> float:
    """Seconds since this process started (Linux /proc; 0 elsewhere)."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


def _threads(requested: int) -> int:
    """Intra-op threads: on a CPU other processes already use, 2 OpenMP threads that keep waiting for each
    other measured 4–15× slower than 1 thread here, so "auto" leaves busy cores alone."""
    import torch

    if requested > 0:
        return requested
    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    free = (os.cpu_count() or 1) - busy
    return max(1, min(torch.get_num_threads(), int(free + 0.5)))


def run_demo(
    out: str | Path,
    *,
    data: str | Path | None = None,
    weights: str | Path | None = None,
    backbone: str = "tf_efficientnet_lite0",
    overwrite: bool = False,
    budget_s: float = 180.0,
    scale: str = "default",
    strong: tuple[str, ...] = STRONG,
    threads: int = 0,
    started_at: float | None = None,
    echo: Echo = print,
    progress: bool = False,
) -> dict[str, Any]:
    """Run everything into OUT (data/, runs/<preset>/, index/, report/, demo.json); return demo.json.

    `started_at` (a `time.perf_counter()` value) starts the budget clock earlier, e.g. at process start.
    """
    import torch

    t0 = time.perf_counter() if started_at is None else started_at
    if scale not in SCALES:
        raise ValueError(f"--scale {scale!r}: expected one of {', '.join(SCALES)}")
    out = Path(out)
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{out}: already exists and is not empty; pass --overwrite or choose another --out"
        )
    steps = plan_steps(strong)  # a missing preset fails here, before anything is written
    out = prepare_out_dir(out, overwrite=overwrite, marker=MARKER).resolve()
    before = torch.get_num_threads()
    n_threads = _threads(threads)
    torch.set_num_threads(n_threads)
    try:
        demo = _Demo(out, SCALES[scale], steps, backbone, budget_s, echo, progress, t0)
        demo.doc.update(scale=scale, threads=n_threads)
        demo.doc["weights"] = demo.weights = resolve_weights(Path(weights) if weights else None, echo)
        echo(f"demo: {len(steps)} experiments, budget {budget_s:.0f} s, {n_threads} CPU thread(s) → {out}")
        demo.prepare_data(Path(data) if data else None)
        for i, s in enumerate(steps):
            demo.run_step(i, s)
        return demo.finish()
    finally:
        torch.set_num_threads(before)


class _Demo:
    """The demo's state while it runs; every step rewrites OUT/demo.json so a killed demo still says how far
    it got."""

    def __init__(
        self, out: Path, sc: Scale, steps: list[Step], backbone: str, budget_s: float, echo: Echo,
        progress: bool, t0: float,
    ) -> None:  # fmt: skip
        from carspotter.presets import load_preset
        from carspotter.utils import resolve_device

        self.out, self.sc, self.steps, self.backbone, self.echo, self.progress, self.t0 = (
            out, sc, steps, backbone, echo, progress, t0,
        )  # fmt: skip
        self.runs = out / "runs"
        self.cpu = resolve_device("auto") == "cpu"
        self.weights: dict[str, Any] = {}
        self.data_dir = out / "data"
        self.budget = Budget(budget_s, sc.budget_reserve_s, t0, PRIOR_SPU, PRIOR_UNITS)
        self.planned = {s.name: sc.epochs.get(s.family) or load_preset(s.preset).train.epochs for s in steps}
        self.units = {s.name: step_units(s.family, self.planned[s.name]) for s in steps}
        self.doc: dict[str, Any] = {
            "created": time.strftime("%Y-%m-%d %H:%M:%S"),
            "budget_s": budget_s,
            "backbone": backbone,
            "data": {},
            "steps": [],
        }

    def save(self) -> None:
        keys = ("name", "preset", "kind", "family", "overrides", "network_from", "result")
        self.doc["steps"] = [{k: getattr(s, k) for k in keys} for s in self.steps]
        self.doc["elapsed_s"] = round(time.perf_counter() - self.t0, 1)
        atomic_write_json(self.out / MARKER, self.doc)

    def prepare_data(self, data: Path | None) -> None:
        t = time.perf_counter()
        if data is None:
            from carspotter.data.synth import make_synthetic

            summary = make_synthetic(self.data_dir, **self.sc.synth)
            self.doc["data"] = {"dir": str(self.data_dir), "synthetic": True, "options": self.sc.synth,
                                "counts": summary.get("counts")}  # fmt: skip
            self.echo(
                f"data: synthetic, {self.sc.synth['classes']} classes × {self.sc.synth['per_class']} photos "
                f"{summary.get('counts')} → {self.data_dir} ({time.perf_counter() - t:.1f} s)"
            )
        else:
            from carspotter.data.manifest import read_manifest

            self.data_dir = data.resolve()
            n = len(read_manifest(self.data_dir))  # a clear error now, not after the first experiment
            self.doc["data"] = {"dir": str(self.data_dir), "synthetic": False, "n_images": n}
            self.echo(f"data: {self.data_dir} ({n} photos)")
        self.save()

    def run_step(self, i: int, s: Step) -> None:
        from carspotter.presets import load_preset

        cfg = load_preset(s.preset)
        rest = self.steps[i:]
        fixed = sum(step_units(x.family, 0) for x in rest)  # kNN steps are all fixed cost
        f = self.budget.factor(sum(self.units[x.name] for x in rest), fixed)
        t = time.perf_counter()
        if s.kind == "train":
            want = self.planned[s.name]
            ep = max(1, round(want * f)) if f < 1 else want
            metrics, desc = self._train(s, cfg, ep), f"{ep} epoch{'s' if ep > 1 else ''}"
            self.units[s.name] = step_units(s.family, ep)
        else:
            metrics, desc = self._knn(s, cfg)
        secs = time.perf_counter() - t
        self.budget.record(self.units[s.name], secs)
        s.result["seconds"] = round(secs, 1)
        self.echo(f"[{i + 1:2d}/{len(self.steps)}] {s.name:<38} {desc:<16} {_acc(metrics)}  {secs:6.1f} s")
        self.save()

    def _train(self, s: Step, cfg: ExperimentConfig, epochs: int) -> dict[str, Any]:
        from carspotter.engine.evaluate import evaluate_run
        from carspotter.engine.train import fit

        spe = _steps_per_epoch(self.data_dir, cfg, self.sc.batch_size)
        s.overrides = scale_overrides(
            cfg, s.family, epochs, self.sc, self.weights, self.backbone, spe, self.cpu
        )
        summary = fit(
            apply_overrides(cfg, s.overrides), self.data_dir, self.runs / s.name, progress=self.progress
        )
        metrics = evaluate_run(self.runs / s.name, self.data_dir)
        metrics.save()
        s.result = {"epochs": summary.get("epochs_completed"), "best_epoch": summary.get("best_epoch"),
                    "val": summary.get("best_value"), "test": _pick(metrics)}  # fmt: skip
        return metrics

    def _knn(self, s: Step, cfg: ExperimentConfig) -> tuple[dict[str, Any], str]:
        from carspotter.rundir import read_run_config

        source = self.runs / str(s.network_from)
        scaled = knn_config(cfg, read_run_config(source))
        s.overrides = config_diff(cfg, scaled)
        _make_knn_run(scaled, source, self.runs / s.name)
        metrics = _evaluate_knn(self.runs / s.name, self.data_dir, scaled)
        s.result = {"test": _pick(metrics), "network_from": s.network_from}
        return metrics, f"k={scaled.retrieval.k} {scaled.retrieval.metric}"

    def _notes(self) -> list[str]:
        data = self.doc["data"]
        if data.get("synthetic"):
            split = " / ".join(f"{v} {k}" for k, v in (data.get("counts") or {}).items())
            what = f"a synthetic fine-grained set ({data['options']['classes']} classes; {split} photos)"
        else:
            what = f"the prepared dataset {data['dir']}"
        src = {
            "file": f"ImageNet weights from {self.weights.get('path')}",
            "download": "downloaded ImageNet weights",
            "random": "RANDOM weights (no ImageNet weights could be had)",
        }[self.weights["mode"]]
        return [
            f"`carspotter demo` ran the real presets scaled down to minutes on {what}: image size, epochs "
            "and batch are overridden (see Hyperparameters and demo.json), so the Model Description column "
            "is the preset's full recipe while the numbers come from the short version. The transfer and kNN "
            f"backbone is {self.backbone} with {src}; the kNN rows reuse the fine-tuned transfer networks."
        ]

    def finish(self) -> dict[str, Any]:
        from carspotter.report import build_report

        best = _best_run(self.steps, self.runs)
        t = time.perf_counter()
        index_dir = self.out / "index"
        _build_index(best, self.data_dir, index_dir)
        self.doc["index"] = {
            "dir": str(index_dir),
            "run": str(best),
            "seconds": round(time.perf_counter() - t, 1),
        }
        self.echo(
            f"index: {index_dir} (train split embedded by {best.name}, {time.perf_counter() - t:.1f} s)"
        )
        t = time.perf_counter()
        runs = [self.runs / s.name for s in self.steps]
        title = "carspotter demo report"
        html = build_report(
            runs, self.out / "report", index_dirs=[index_dir], title=title, notes=self._notes()
        )
        serve = f"carspotter serve {best} --index {index_dir}"
        self.doc.update(report=str(html), serve_command=serve)
        self.save()
        self.echo(f"report: {html} ({time.perf_counter() - t:.1f} s)")
        if self.weights.get("mode") == "random":
            self.echo("note: the transfer and kNN runs used RANDOM weights (no ImageNet weights available); "
                      "the report says so too.")  # fmt: skip
        total = time.perf_counter() - self.t0
        self.echo(f"total: {total:.1f} s (budget {self.budget.budget_s:.0f} s)")
        self.echo(f"serve the best model ({best.name}) with its gallery:\n  {serve}")
        sys.stdout.flush()
        return self.doc


def _pick(m: dict[str, Any] | None) -> dict[str, Any]:
    keys = ("accuracy", "f1_macro", "loss", "predict_time_s", "recall_at_1", "map_at_r")
    return {k: m[k] for k in keys if m and isinstance(m.get(k), int | float)}


def _best_run(steps: list[Step], runs: Path) -> Path:
    """The trained classification run with the highest test accuracy (ties: the earlier one)."""
    cands = [s for s in steps if s.kind == "train" and "accuracy" in s.result.get("test", {})]
    if not cands:
        raise RuntimeError("no experiment produced a test accuracy; nothing to index or serve")
    return runs / max(cands, key=lambda s: s.result["test"]["accuracy"]).name


def _evaluate_knn(run_dir: Path, data_dir: Path, cfg: ExperimentConfig) -> dict[str, Any]:
    from carspotter.retrieval.knn import evaluate_knn_run
    from carspotter.utils import resolve_device

    r = cfg.retrieval
    result = evaluate_knn_run(
        run_dir,
        data_dir,
        k=r.k,
        metric=r.metric,
        split=r.query_split,
        gallery_split=r.gallery_split,
        device=resolve_device(cfg.train.device),
        weighting=r.weighting,
        batch_size=r.batch_size,
    )
    result.save()
    return result


def _build_index(run_dir: Path, data_dir: Path, index_dir: Path) -> None:
    from carspotter.retrieval import evaluate_index
    from carspotter.retrieval.build import build_index_from_run
    from carspotter.rundir import read_run_config

    cfg = read_run_config(run_dir)
    build_index_from_run(
        run_dir, data_dir, split="train", metric=cfg.retrieval.metric, index_type="Flat", out_dir=index_dir
    )
    evaluate_index(index_dir).save()


__all__ = ["SCALES", "Step", "plan_steps", "run_demo", "scale_overrides"]
