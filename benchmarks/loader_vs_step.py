"""Is training input-bound? The data loader's images/s alone vs the model's pure train-step images/s.

loader: the training input pipeline exactly as `carspotter train` builds it (PreparedDataset over the
        prepared JPEG cache + the preset's train augmentations, SeededItems, EpochSampler, make_loader),
        iterated without a model, with num_workers 0, 1 and 2 (steady state: the first batch is not timed).
step:   forward + loss + backward + optimizer step on random tensors already in memory, with the preset's
        model, optimiser, channels_last and autocast settings.

Goal: the loader delivers >= 1.2x the step rate, so the model never waits for data. On a 2-core machine the
two compete for the same cores, so `--e2e` also times the real combination (loader feeding steps).

    python benchmarks/loader_vs_step.py                              # generated data
    python benchmarks/loader_vs_step.py --data /work/prepared/cars-small --e2e
    python benchmarks/loader_vs_step.py --smoke
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchutil import load_str, machine_line, synthetic_prepared

from carspotter.config import ExperimentConfig
from carspotter.data.dataset import PreparedDataset
from carspotter.data.manifest import read_manifest
from carspotter.engine.evaluate import autocast_dtype
from carspotter.engine.loader import SeededItems, make_loader, train_sampler
from carspotter.engine.optim import build_optimizer
from carspotter.models.factory import CarModel, create_model
from carspotter.presets import load_preset

GOAL = 1.2
DEFAULT_PRESETS = (
    "seed-s1-cnn-basic,seed-s2-cnn-bn-dropout,seed-s3-cnn-aug,strong-cnn-scratch,"
    "strong-efficientnet-lite0-finetune@128"
)


def preset_cfg(spec: str, batch_size: int | None) -> ExperimentConfig:
    name, _, size = spec.partition("@")
    cfg = load_preset(name.strip())
    if size:
        cfg.data.img_size, cfg.data.resize_size = int(size), None
    if batch_size:
        cfg.data.batch_size = batch_size
    cfg.model.pretrained, cfg.model.weights = False, None  # speed does not depend on the weights' values
    return cfg


def build_model(cfg: ExperimentConfig, n_classes: int) -> CarModel:
    torch.manual_seed(0)
    model = create_model(cfg.model, n_classes, cfg.data.img_size)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model.train()


def loader_for(cfg: ExperimentConfig, root: Path, model: CarModel, num_workers: int):
    tf = model.preprocess.with_data(cfg.data).train_transform(cfg.data.aug)
    ds = PreparedDataset(root, cfg.data.train_split, tf, cfg.data.crop_bbox)
    ds.one_thread_transforms = num_workers == 0  # as the training loop sets it
    if len(ds) == 0:
        raise SystemExit(f"error: {root}: no images in split {cfg.data.train_split!r}")
    seed = cfg.train.seed
    return make_loader(
        SeededItems(ds, seed),
        train_sampler(len(ds), seed),
        cfg.data.batch_size,
        num_workers,
        seed,
        persistent=False,
    )


def loader_rate(loader, max_batches: int) -> float:
    """Steady-state images/s: the clock starts when the first batch has arrived (worker start-up excluded)."""
    n, t0 = 0, None
    for i, (x, _, _) in enumerate(loader):
        if i == 0:
            t0 = time.perf_counter()
        else:
            n += x.shape[0]
        if i >= max_batches:
            break
    if t0 is None or n == 0:
        raise SystemExit(
            "error: the loader gave fewer than 2 batches; use more images or a smaller --batch-size"
        )
    return n / (time.perf_counter() - t0)


class Stepper:
    """One optimiser step of the training loop (forward, loss, backward, step), as engine/train.py runs it."""

    def __init__(self, cfg: ExperimentConfig, model: CarModel) -> None:
        self.model, self.cfg = model, cfg
        self.opt = build_optimizer(cfg, model)
        self.loss = nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing)
        self.amp = autocast_dtype(cfg.train.amp, torch.device("cpu"))

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> float:
        if self.cfg.train.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=self.amp or torch.bfloat16, enabled=self.amp is not None):
            out = self.model(x)  # (B, C)
        loss = self.loss(out.float(), y)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())


def step_rate(step: Stepper, cfg: ExperimentConfig, n_classes: int, steps: int) -> float:
    bs, s = cfg.data.batch_size, cfg.data.img_size
    x, y = torch.randn(bs, 3, s, s), torch.randint(0, n_classes, (bs,))
    step(x, y)  # warm-up
    rates = []
    for _ in range(steps):
        t = time.perf_counter()
        loss = step(x, y)
        rates.append(bs / (time.perf_counter() - t))
    if loss != loss:  # NaN
        raise SystemExit("error: train step produced a NaN loss")
    return max(rates)


def e2e_rate(step: Stepper, loader, max_batches: int) -> float:
    n, t0 = 0, None
    for i, (x, y, _) in enumerate(loader):
        step(x, y)
        if i == 0:
            t0 = time.perf_counter()  # after one step: start-up and warm-up excluded
        else:
            n += x.shape[0]
        if i >= max_batches:
            break
    assert t0 is not None
    return n / (time.perf_counter() - t0)


def guard_ablation(cfg: ExperimentConfig, root: Path, model: CarModel, args: argparse.Namespace) -> None:
    """What PreparedDataset's one-thread transforms buy in the main process (num_workers=0): the same
    loader with the guard replaced by a no-op, the two taking turns so both see the same load."""
    import carspotter.data.dataset as dataset_mod

    guard = dataset_mod.single_thread
    variants = {
        "one thread (guard)": guard,
        f"{torch.get_num_threads()} threads (no guard)": contextlib.nullcontext,
    }
    rates: dict[str, list[float]] = {name: [] for name in variants}
    try:
        for _ in range(args.reps):
            for name, ctx in variants.items():
                dataset_mod.single_thread = ctx  # type: ignore[assignment]
                rates[name].append(loader_rate(loader_for(cfg, root, model, 0), args.batches))
    finally:
        dataset_mod.single_thread = guard  # type: ignore[assignment]
    for name, r in rates.items():
        med = statistics.median(r)
        print(f"loader num_workers=0, transforms on {name:<22} {max(r):8.1f} img/s (median {med:.1f})")
    ra, rb = rates.values()
    print(
        f"RATIO guard: one-thread / multi-thread transforms = {max(ra) / max(rb):.2f}x "
        f"({statistics.median(ra) / statistics.median(rb):.2f}x median)"
    )


def run_preset(spec: str, root: Path, n_classes: int, args: argparse.Namespace) -> None:
    cfg = preset_cfg(spec, args.batch_size)
    model = build_model(cfg, n_classes)
    aug = {k: v for k, v in vars(cfg.data.aug).items() if v and k != "rrc_scale_min"}
    print(
        f"\n== {spec}: {cfg.model.arch} {cfg.model.channels if cfg.model.arch == 'scratch_cnn' else ''} "
        f"{cfg.data.img_size}px, batch {cfg.data.batch_size}, amp={cfg.train.amp}, "
        f"channels_last={cfg.train.channels_last}, aug {aug or 'none'}; {load_str()}"
    )
    step = Stepper(cfg, model)
    s_rate = step_rate(step, cfg, n_classes, args.steps)
    print(f"train step (random tensors)     {s_rate:8.1f} img/s")
    rates = {}
    for nw in args.workers:
        r = [loader_rate(loader_for(cfg, root, model, nw), args.batches) for _ in range(args.reps)]
        rates[nw] = max(r)
        med = statistics.median(r)
        x_step = max(r) / s_rate
        print(f"loader num_workers={nw:<13} {max(r):8.1f} img/s (median {med:.1f}) = {x_step:5.2f}x step")
    best_nw = max(rates, key=lambda k: rates[k])
    ratio = rates[best_nw] / s_rate
    verdict = "met" if ratio >= GOAL else "NOT met"
    with0 = f"; {rates[0] / s_rate:.2f}x with 0" if 0 in rates else ""
    print(f"RATIO {spec}: loader/step = {ratio:.2f}x (workers={best_nw}{with0}) -> goal {GOAL}x {verdict}")
    if args.guard_ablation:
        guard_ablation(cfg, root, model, args)
    if args.e2e:
        for nw in args.workers:
            r = e2e_rate(step, loader_for(cfg, root, model, nw), args.batches)
            print(
                f"e2e (loader feeding steps) num_workers={nw}: {r:8.1f} img/s = {r / s_rate:.2f}x pure step"
            )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, help="a prepared dataset (default: generate a synthetic one)")
    ap.add_argument("--presets", default=DEFAULT_PRESETS, help="NAME[@IMG_SIZE],... (comma-separated)")
    ap.add_argument("--batch-size", type=int, help="override the presets' batch size")
    ap.add_argument("--steps", type=int, default=3, help="timed train steps (best is reported)")
    ap.add_argument("--batches", type=int, default=8, help="timed loader batches per pass")
    ap.add_argument("--reps", type=int, default=2, help="loader passes per num_workers (best is reported)")
    ap.add_argument("--workers", default="0,1,2", help="num_workers values to time")
    ap.add_argument("--e2e", action="store_true", help="also time loader + steps together")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's choice)")
    ap.add_argument(
        "--guard-ablation",
        action="store_true",
        help="num_workers=0 loader with and without PreparedDataset's one-thread transforms, interleaved",
    )
    ap.add_argument("--smoke", action="store_true", help="tiny and fast: proves the script works")
    args = ap.parse_args(argv)
    if args.smoke:
        args.presets, args.batch_size, args.steps, args.batches, args.reps = (
            "seed-s1-cnn-basic@32",
            4,
            1,
            2,
            1,
        )
        args.workers = "0,1"
    args.workers = [int(w) for w in str(args.workers).split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine_line())
    with contextlib.ExitStack() as stack:
        root = args.data
        if root is None:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cs-loader-bench-")))
            root = synthetic_prepared(tmp / "synth", 24 if args.smoke else 600, size=128)
        n_classes = len({r.label for r in read_manifest(root)})
        print(f"data: {root} ({n_classes} classes)")
        for spec in args.presets.split(","):
            run_preset(spec.strip(), Path(root), n_classes, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
