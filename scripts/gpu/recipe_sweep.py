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
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(
    0, str(REPO / "src")
)  # the summary imports carspotter; the GPU host may not have it installed
CLI = [sys.executable, "-c", "from carspotter.cli import main; main()"]
T2 = "seed-t2-resnet50-finetune"
STRONG = "strong-efficientnet-lite0-finetune"

# name -> (preset, img_size, extra train args). Each lever is measured on its own against `strong`.
RECIPES: dict[str, tuple[str, int, list[str]]] = {
    "t2": (T2, 128, []),
    "strong": (STRONG, 128, []),
    "strong+ema": (STRONG, 128, ["--set", "train.ema_decay=0.998"]),
    "strong+rrc": (
        STRONG,
        128,
        [
            "--set",
            "data.aug.random_crop=false",
            "--set",
            "data.aug.random_resized_crop=true",
            "--set",
            "data.aug.rrc_scale_min=0.35",
        ],
    ),
    "strong+lr2e-3": (STRONG, 128, ["--lr", "0.002"]),
    "strong@160x6ep": (STRONG, 160, ["--epochs", "6"]),
    "strong@176x5ep": (STRONG, 176, ["--epochs", "5"]),
    "strong@192x4ep": (STRONG, 192, ["--epochs", "4"]),
    "strong@160x6ep+ema": (STRONG, 160, ["--epochs", "6", "--set", "train.ema_decay=0.995"]),
    "t2@224": (T2, 224, []),
    "strong@224": (STRONG, 224, []),
}


def relative_costs(weights: str, sizes: set[int], n_train: int, n_val: int) -> dict[int, float]:
    """Forward FLOPs per image of Lite0 at each size (train = 3x forward), for the cost column."""
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
    return {s: f * (3 * n_train + n_val) for s, f in out.items()}


def job_cmds(name: str, seed: int, args: argparse.Namespace, run: Path) -> list[list[str]]:
    preset, size, extra = RECIPES[name]
    train = [
        *CLI,
        "train",
        "--preset",
        preset,
        "--data",
        args.data,
        "--out",
        str(run),
        "--backbone",
        "tf_efficientnet_lite0",
        "--weights",
        args.weights,
        "--img-size",
        str(size),
        "--seed",
        str(seed),
        "--num-workers",
        str(args.workers),
        "--device",
        args.device,
        "--set",
        "train.amp=false",
        "--no-progress",
        "--overwrite",
        *extra,
    ]
    if args.smoke:
        train += ["--epochs", "1", "--img-size", "64"]
    evaluate = [*CLI, "evaluate", str(run), "--split", "test", "--device", args.device]
    return [train, evaluate]


def epochs_of(name: str, smoke: bool) -> int:
    extra = RECIPES[name][2]
    if smoke:
        return 1
    return int(extra[extra.index("--epochs") + 1]) if "--epochs" in extra else 10


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--weights", required=True)
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
        "PYTHONPATH": str(REPO / "src"),
        "OMP_NUM_THREADS": "1",
        "NVIDIA_TF32_OVERRIDE": "0",
        "PYTHONUNBUFFERED": "1",
    }
    queue = [
        (n, s) for s in seeds for n in names
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
            mfile = run / "metrics_test.json"  # carspotter.rundir.metrics_name("test")
            if not mfile.exists():
                mfile = run / "metrics.json"  # written before split-named results
            if p.returncode == 0 and mfile.exists():
                m = json.loads(mfile.read_text())
                row["test_top1"] = m.get("accuracy")
                try:
                    rows = list(csv.DictReader((run / "metrics.csv").read_text().splitlines()))
                    row["best_val"] = max(float(r.get("val_accuracy") or 0) for r in rows)
                except (OSError, ValueError):
                    pass
            with results.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    n_train = n_val = 0
    for r in csv.DictReader((Path(args.data) / "manifest.csv").read_text().splitlines()):
        n_train += r["split"] == "train"
        n_val += r["split"] == "val"
    sizes = {64} if args.smoke else {RECIPES[n][1] for n in names}
    per_img = relative_costs(args.weights, sizes, n_train, n_val)
    base = per_img[64 if args.smoke else 128] * epochs_of("t2", args.smoke)
    lines = [
        "| recipe | px | epochs | CPU work vs T2 | test top-1 mean ± sd | seeds (per-seed %) | best val mean |",
        "|---|---|---|---|---|---|---|",
    ]
    summary = {}
    for n in names:
        accs = [r["test_top1"] for r in rows if r["recipe"] == n and r.get("test_top1") is not None]
        vals = [r["best_val"] for r in rows if r["recipe"] == n and r.get("best_val") is not None]
        size = 64 if args.smoke else RECIPES[n][1]
        cost = per_img[size] * epochs_of(n, args.smoke) / base
        if not accs:
            lines.append(
                f"| {n} | {size} | {epochs_of(n, args.smoke)} | {cost:.2f}x | (no finished run) | | |"
            )
            continue
        mean = statistics.mean(accs)
        sd = statistics.stdev(accs) if len(accs) > 1 else float("nan")
        summary[n] = {"mean": mean, "sd": sd, "n": len(accs), "per_seed": accs, "cost_vs_t2": cost}
        val = f"{100 * statistics.mean(vals):.1f}" if vals else ""
        per_seed = ", ".join(f"{100 * a:.1f}" for a in accs)
        lines.append(
            f"| {n} | {size} | {epochs_of(n, args.smoke)} | {cost:.2f}x | {100 * mean:.1f} ± {100 * sd:.1f} "
            f"| {len(accs)} ({per_seed}) | {val} |"
        )
    (args.out / "summary.md").write_text("\n".join(lines) + "\n")
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print("\n".join(lines))
    print(f"total {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
