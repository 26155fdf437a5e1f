"""Fine-tuning recipe ablation on one GPU: every recipe x every seed, several runs at once, test top-1 mean ± sd.

One prepared script for a session that is lent a GPU for a few minutes. Each job is the plain CLI
(`carspotter train` then `carspotter evaluate --split test`), so a row here is exactly what a user gets from
that command; the GPU only makes the ~40 runs fit in minutes. Runs are fp32 (`train.amp=false`, and
NVIDIA_TF32_OVERRIDE=0 so cuDNN/cuBLAS do not round to TF32), as the CPU default is. Results are appended to
OUT/results.jsonl as each job ends, so a run cut short by its time budget still reports what finished.

The "cost" column is the CPU work a recipe asks for, relative to T2: training FLOPs (forward + backward ≈ 3x
forward, counted with FlopCounterMode at the recipe's resolution) x epochs x train photos, plus the per-epoch
val pass. It is a proxy; RESULTS.md gives the measured CPU seconds (`/usr/bin/time`) of the chosen recipe.

    python scripts/gpu/recipe_sweep.py --data DIR --weights W.safetensors --out OUT [--parallel 8] [--budget-s 360]
    python scripts/gpu/recipe_sweep.py --data DIR --weights W --out OUT --smoke   # CPU, 2 tiny jobs
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(
    0, str(REPO / "src")
)  # the summary imports carspotter; the GPU host may not have it installed
CLI = [sys.executable, "-c", "from carspotter.cli import main; main()"]
T2 = "seed-t2-resnet50-finetune"
STRONG = "strong-efficientnet-lite0-finetune"
RRC = ["--set", "data.aug.random_crop=false", "--set", "data.aug.random_resized_crop=true"]
RRC += ["--set", "data.aug.rrc_scale_min=0.35"]
LLRD = ["--set", "optim.layer_decay=0.8"]
# progressive resizing, evaluated at 160 px (FixRes: train below the test size): 4 ep 112, 4 ep 128, 2 ep 144
PROG = ["--img-size", "160", "--set", "data.progressive={0: 112, 4: 128, 8: 144}"]
PROG_SIZES = [112] * 4 + [128] * 4 + [144] * 2
MIX = ["--set", "train.mixup_alpha=0.2", "--set", "train.cutmix_alpha=1.0", "--set", "train.mix_prob=0.5"]
SCRATCH = ["--img-size", "64", "--epochs", "40"]
CNN40 = ["--set", "schedule.warmup_epochs=1", "--set", "train.ema_decay=0.99"]
TTA = ["--tta", "flip"]
ZOOM = ["--zoom"]


@dataclass
class Recipe:
    """One row of the ablation: a preset plus overrides, on which data, and which extra evaluations."""

    preset: str
    size: int = 128  # the size the model is evaluated at (data.img_size)
    extra: list[str] = field(default_factory=list)
    train_sizes: list[int] | None = None  # per-epoch training sizes when they differ from `size`
    epochs: int = 10
    lite0: bool = True  # takes --backbone tf_efficientnet_lite0 --weights
    data: str = "cls"  # cls | retrieval (classes 1-98 only; evaluated on all 196 of cls: open set)
    evals: list[list[str]] = field(default_factory=list)  # extra `evaluate RUN ...` calls
    seeds: int = 3  # run at most this many of --seeds


# Each lever is measured on its own against its base; the last rows combine them.
RECIPES: dict[str, Recipe] = {
    "t2": Recipe(T2, evals=[TTA]),
    "strong": Recipe(STRONG),
    "strong+ema": Recipe(STRONG, extra=["--set", "train.ema_decay=0.998"]),
    "strong+rrc": Recipe(STRONG, extra=RRC, evals=[TTA, ZOOM]),
    "strong+lr2e-3": Recipe(STRONG, extra=["--lr", "0.002"]),
    "strong@160x6ep": Recipe(STRONG, 160, ["--epochs", "6"], epochs=6),
    "strong@176x5ep": Recipe(STRONG, 176, ["--epochs", "5"], epochs=5),
    "strong@192x4ep": Recipe(STRONG, 192, ["--epochs", "4"], epochs=4),
    "strong@160x6ep+ema": Recipe(STRONG, 160, ["--epochs", "6", "--set", "train.ema_decay=0.995"], epochs=6),
    "t2@224": Recipe(T2, 224),
    "strong@224": Recipe(STRONG, 224),
    "strong+rrc+llrd": Recipe(STRONG, extra=RRC + LLRD, evals=[TTA]),
    "strong+rrc+mix": Recipe(STRONG, extra=RRC + MIX, evals=[TTA]),
    "strong+rrc+prog": Recipe(STRONG, 160, RRC + PROG, PROG_SIZES, evals=[TTA]),
    "strong+rrc+prog+llrd": Recipe(STRONG, 160, RRC + PROG + LLRD, PROG_SIZES, evals=[TTA, ZOOM]),
    "strong+rrc+bs16": Recipe(STRONG, extra=[*RRC, "--batch-size", "16"], evals=[TTA]),
    "strong+rrc+warmup1": Recipe(STRONG, extra=[*RRC, "--set", "schedule.warmup_epochs=1"], evals=[TTA]),
    "strong+rrc+head3x": Recipe(
        STRONG, extra=[*RRC, "--lr", "0.003", "--set", "model.backbone_lr_mult=0.333"], evals=[TTA]
    ),
    "s1": Recipe("seed-s1-cnn-basic", 64, SCRATCH, epochs=40, lite0=False),
    "s2": Recipe("seed-s2-cnn-bn-dropout", 64, SCRATCH, epochs=40, lite0=False),
    "s3": Recipe("seed-s3-cnn-aug", 64, SCRATCH, epochs=40, lite0=False),
    # as scripts/results/strong-cnn.sh: warm-up and EMA scaled from the preset's 150 epochs to 40
    "strong-cnn": Recipe("strong-cnn-scratch", 64, SCRATCH + CNN40, epochs=40, lite0=False),
    "openset-t1@224": Recipe("seed-t1-resnet50-frozen", 224, data="retrieval", seeds=1),
    "openset-strong+rrc": Recipe(STRONG, extra=RRC, data="retrieval", seeds=1),
}


def mean_sd(xs: list[float]) -> tuple[float, float] | None:
    if not xs:
        return None
    return statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else float("nan")


def fmt(xs: list[float]) -> str:
    m = mean_sd(xs)
    return "" if m is None else f"{100 * m[0]:.1f} ± {100 * m[1]:.1f}"


KEEP = ("combine_alternatives", "gain_ci95")  # besides every scalar


def collect(run: Path) -> dict:
    """Test top-1, best val, last eval-mode train accuracy, and the headline keys of every metrics_*.json."""
    row: dict = {}
    for f in sorted(run.glob("metrics*.json")):
        m = json.loads(f.read_text())
        row[f.stem] = {k: v for k, v in m.items() if k in KEEP or isinstance(v, int | float | str | None)}
    own = row.get("metrics_test") or next((v for k, v in row.items() if k.startswith("metrics_test@")), None)
    if own:
        row["test_top1"] = own.get("accuracy")
    if "metrics_test_tta-flip" in row:
        row["tta_flip_top1"] = row["metrics_test_tta-flip"].get("accuracy")
    try:
        hist = list(csv.DictReader((run / "metrics.csv").read_text().splitlines()))
        row["best_val"] = max(float(r.get("val_accuracy") or 0) for r in hist)
        row["last_train_eval_accuracy"] = float(hist[-1].get("train_eval_accuracy") or "nan")
    except (OSError, ValueError, IndexError):
        pass
    return row


def relative_costs(weights: str, sizes: set[int]) -> dict[int, float]:
    """Forward FLOPs per image of Lite0 at each size, for the cost column."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from carspotter.config import ModelConfig
    from carspotter.models.factory import create_model

    model = create_model(ModelConfig(arch="tf_efficientnet_lite0", pretrained=False), 196, 128).eval()
    out = {}
    for s in sorted(sizes):
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            model(torch.zeros(1, 3, s, s))
        out[s] = float(fc.get_total_flops())
    return out


def job_cmds(name: str, seed: int, args: argparse.Namespace, run: Path) -> list[list[str]]:
    r = RECIPES[name]
    data = args.retrieval_data if r.data == "retrieval" else args.data
    train = [*CLI, "train", "--preset", r.preset, "--data", data, "--out", str(run)]
    if r.lite0:
        train += ["--backbone", "tf_efficientnet_lite0", "--weights", args.weights]
    train += ["--img-size", str(r.size), "--seed", str(seed), "--num-workers", str(args.workers)]
    train += ["--device", args.device, "--set", "train.amp=false", "--no-progress", "--overwrite", *r.extra]
    if args.smoke:
        train += ["--epochs", "1", "--img-size", "64", "--set", "data.progressive={}"]
    ev = [*CLI, "evaluate", str(run), "--split", "test", "--device", args.device]
    if r.data == "retrieval":  # the run knows classes 1-98; the photos of 99-196 are its unknowns
        ev += ["--data", args.data]
    return [train, ev] + [ev + extra for extra in r.evals]


def epoch_sizes(name: str, smoke: bool) -> list[int]:
    r = RECIPES[name]
    if smoke:
        return [64]
    return r.train_sizes or [r.size] * r.epochs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--weights", required=True)
    ap.add_argument("--retrieval-data", default="", help="prepared retrieval-protocol data (open-set rows)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--only", default="", help="comma-separated recipe names (default: all)")
    ap.add_argument("--parallel", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers per job")
    ap.add_argument("--budget-s", type=float, default=360.0, help="start no job after this long")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument(
        "--summarize", type=Path, nargs="*", help="only tabulate these results.jsonl files into --out"
    )
    args = ap.parse_args()
    names = [n for n in (args.only.split(",") if args.only else RECIPES) if n]
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        ap.error(f"--only: unknown recipe(s) {unknown}; known: {list(RECIPES)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO / "src"), os.environ.get("PYTHONPATH", "")) if p),
        "OMP_NUM_THREADS": "1",
        "NVIDIA_TF32_OVERRIDE": "0",
        "PYTHONUNBUFFERED": "1",
    }
    queue = [
        (n, s) for i, s in enumerate(seeds) for n in names if i < RECIPES[n].seeds
    ]  # every recipe's seed 0 first: a cut run still compares all
    t0 = time.perf_counter()
    running: list[tuple[str, int, subprocess.Popen, float, list[list[str]], Path]] = []
    results = args.out / "results.jsonl"
    if args.summarize is not None:
        queue = []
        results.write_text("".join(p.read_text() for p in args.summarize))
    while queue or running:
        while queue and len(running) < args.parallel and time.perf_counter() - t0 < args.budget_s:
            name, seed = queue.pop(0)
            run = args.out / "runs" / f"{name.replace('@', '_at').replace('+', '_')}-s{seed}"
            cmds = job_cmds(name, seed, args, run)
            log = open(args.out / f"{run.name}.log", "w")  # noqa: SIM115
            shell = " && ".join(" ".join(f"'{c}'" for c in cmd) for cmd in cmds)
            p = subprocess.Popen(["bash", "-c", shell], env=env, stdout=log, stderr=subprocess.STDOUT)
            running.append((name, seed, p, time.perf_counter(), cmds, run))
        if not queue or time.perf_counter() - t0 >= args.budget_s:
            queue = [] if time.perf_counter() - t0 >= args.budget_s else queue
        time.sleep(1.0)
        for item in list(running):
            name, seed, p, started, _, run = item
            if p.poll() is None:
                continue
            running.remove(item)
            row = {
                "recipe": name,
                "seed": seed,
                "rc": p.returncode,
                "wall_s": round(time.perf_counter() - started, 1),
            }
            if p.returncode == 0:
                row.update(collect(run))
            with results.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    n_train = n_val = 0
    for r in csv.DictReader((Path(args.data) / "manifest.csv").read_text().splitlines()):
        n_train += r["split"] == "train"
        n_val += r["split"] == "val"
    lite0 = [n for n in names if RECIPES[n].lite0 and RECIPES[n].data == "cls"]
    sizes = {s for n in lite0 for s in (*epoch_sizes(n, args.smoke), 64 if args.smoke else RECIPES[n].size)}
    flops = relative_costs(args.weights, sizes | {64 if args.smoke else 128})

    def cost(n: str) -> float:  # training FLOPs (3x forward per train photo) + the per-epoch val pass
        ev = 64 if args.smoke else RECIPES[n].size
        return sum(3 * n_train * flops[s] + n_val * flops[ev] for s in epoch_sizes(n, args.smoke))

    lines = [
        "| recipe | px (train → test) | epochs | CPU work vs T2 | test top-1 mean ± sd | per seed | + flip TTA "
        "| best val mean |",
        "|---|---|---|---|---|---|---|---|",
    ]
    summary = {}
    for n in names:
        mine = [r for r in rows if r["recipe"] == n and r.get("test_top1") is not None]
        accs = [r["test_top1"] for r in mine]
        vals = [r["best_val"] for r in mine if r.get("best_val") is not None]
        tta = [r["tta_flip_top1"] for r in mine if r.get("tta_flip_top1") is not None]
        sz = sorted(set(epoch_sizes(n, args.smoke)))
        px = f"{'/'.join(map(str, sz))} → {64 if args.smoke else RECIPES[n].size}"
        c = f"{cost(n) / cost('t2'):.2f}x" if n in lite0 and "t2" in RECIPES else "—"
        if not accs:
            lines.append(
                f"| {n} | {px} | {len(epoch_sizes(n, args.smoke))} | {c} | (no finished run) | | | |"
            )
            continue
        summary[n] = {"mean": mean_sd(accs), "per_seed": accs, "cost_vs_t2": c, "tta_flip": mean_sd(tta)}
        summary[n]["runs"] = mine
        per_seed = ", ".join(f"{100 * a:.1f}" for a in accs)
        lines.append(
            f"| {n} | {px} | {len(epoch_sizes(n, args.smoke))} | {c} | {fmt(accs)} | {per_seed} | {fmt(tta)} "
            f"| {fmt(vals)} |"
        )
    (args.out / "summary.md").write_text("\n".join(lines) + "\n")
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print("\n".join(lines))
    print(f"total {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
