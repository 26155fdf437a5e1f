"""Embedding throughput on CPU: carspotter's index path vs a naive loop, and how close it gets to the peak.

carspotter path: `carspotter.retrieval.embed.embed_dataset(model, PreparedDataset(...))` on a prepared
directory (small JPEGs written by `carspotter data prepare`), as `carspotter index build` runs it.
naive loop:      PIL-decode every image in the main process, torchvision classic transforms, NCHW fp32
                 eager under no_grad, batch 32, no workers.

Both embed the same images with the same preprocessing (the script checks that the vectors agree).
It prints img/s for both and their ratio (goal >= 1.4x), and the achieved GFLOP/s (model FLOPs counted once
with FlopCounterMode) against a measured fp32 matmul peak (torch.matmul 2048^3, best of a few): the
roofline fraction (goal: ResNet-50 >= 75 %). `--ablation` measures each speed knob on its own.

    python benchmarks/embed_throughput.py                      # generated data, 256 images
    python benchmarks/embed_throughput.py --data /work/prepared/cars-small --n 512 --ablation
    python benchmarks/embed_throughput.py --smoke              # a few seconds: proves the script runs
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchutil import (
    bf16_native,
    conv1x1_peak_gflops,
    goal,
    load_str,
    machine_line,
    matmul_peak_gflops,
    model_flops,
    rate_summary,
    synthetic_prepared,
)

from carspotter.config import DataConfig, ModelConfig
from carspotter.data.dataset import PreparedDataset
from carspotter.data.manifest import read_manifest, split_records
from carspotter.data.transforms import build_transform, resize_size_for
from carspotter.models.factory import CarModel, create_model
from carspotter.models.fuse import CPU_CHUNK, fold_batchnorm, forward_chunked

RATIO_GOAL = 1.4
ROOFLINE_GOAL = 0.75


def naive_embed(model: CarModel, root: Path, paths: list[str], img_size: int, batch: int = 32) -> np.ndarray:
    """What a first script does: decode + transform image by image, stack, NCHW fp32 forward."""
    from PIL import Image
    from torchvision import transforms as T

    p = model.preprocess
    tf = T.Compose(
        [
            T.Resize(round(img_size / 0.875)),
            T.CenterCrop(img_size),
            T.ToTensor(),
            T.Normalize(p.mean, p.std),
        ]
    )
    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(paths), batch):
            x = torch.stack(
                [tf(Image.open(root / q).convert("RGB")) for q in paths[i : i + batch]]
            )  # (B,3,S,S)
            out.append(model.embed(x).numpy())
    return np.concatenate(out)


def carspotter_embed(
    model: CarModel, ds: Dataset, batch_size: int, num_workers: int, **knobs: Any
) -> np.ndarray:
    """`embed_dataset` as `carspotter index` calls it; `knobs` (fold_bn, cpu_chunk) only for the ablation."""
    from carspotter.retrieval.embed import embed_dataset

    return embed_dataset(model, ds, batch_size=batch_size, device="cpu", num_workers=num_workers, **knobs)


def compare(args: argparse.Namespace, arch: str, size: int, root: Path, records: list, peaks: dict) -> None:
    torch.manual_seed(0)
    base = create_model(ModelConfig(arch=arch, pretrained=False), 0, img_size=size).eval()
    paths = [r.path for r in records]
    data_cfg = DataConfig(img_size=size)
    tf = build_transform(data_cfg, base.preprocess.mean, base.preprocess.std, train=False)
    full = PreparedDataset(root, args.split, tf)
    ds = Subset(full, range(len(records)))  # the same first n images the naive loop reads
    naive_m, fast_m = copy.deepcopy(base), copy.deepcopy(base)
    x1 = torch.randn(1, 3, size, size)
    with torch.no_grad():
        flops = model_flops(base.embed, x1)
    folded, n_folded = fold_batchnorm(base, torch.randn(2, 3, size, size), lambda m, t: m.embed(t))
    n = len(paths)
    naive_r, fast_r, fold_r = [], [], []
    e_naive = e_fast = None
    for rep in range(args.reps + 1):  # rep 0 warms up (allocator, oneDNN primitive caches, page cache)
        t = time.perf_counter()
        e_naive = naive_embed(naive_m, root, paths, size)
        t_naive = time.perf_counter() - t
        t = time.perf_counter()
        e_fast = carspotter_embed(fast_m, ds, args.batch_size, args.num_workers)
        t_fast = time.perf_counter() - t
        t = time.perf_counter()
        carspotter_embed(folded, ds, args.batch_size, args.num_workers)
        t_fold = time.perf_counter() - t
        if rep:
            naive_r.append(n / t_naive)
            fast_r.append(n / t_fast)
            fold_r.append(n / t_fold)
        if not args.smoke:  # the peaks too are taken at their least disturbed moment
            peaks["fp32"] = max(peaks["fp32"], matmul_peak_gflops(2048, torch.float32, reps=1))
            peaks["fp32_conv"] = max(peaks["fp32_conv"], conv1x1_peak_gflops(2048, reps=1))
    assert e_naive is not None and e_fast is not None
    if e_naive.shape != e_fast.shape:
        raise SystemExit(
            f"error: embeddings differ in shape: naive {e_naive.shape}, carspotter {e_fast.shape}"
        )
    cos = np.sum(e_naive * e_fast, 1) / (
        np.linalg.norm(e_naive, axis=1) * np.linalg.norm(e_fast, axis=1) + 1e-12
    )
    diff = float(np.abs(e_naive - e_fast).max())
    ratio_best = max(fast_r) / max(naive_r)
    ratio_med = statistics.median(fast_r) / statistics.median(naive_r)
    achieved = max(fast_r) * flops / 1e9
    frac32 = achieved / peaks["fp32"]
    name = f"{arch}@{size}"
    print(
        f"\n== {name}: {n} images, {flops / 1e9:.3f} GFLOP/image, carspotter batch {args.batch_size}, "
        f"workers {args.num_workers}; {load_str()}"
    )
    print(f"naive loop  img/s: {rate_summary(naive_r)}")
    print(f"carspotter  img/s: {rate_summary(fast_r)}")
    fold_frac = max(fold_r) * flops / 1e9 / peaks["fp32"]
    print(
        f"carspotter, model folded beforehand ({n_folded} BN; embed_dataset folds too) img/s: {rate_summary(fold_r)} "
        f"= {max(fold_r) / max(naive_r):.2f}x naive, {fold_frac:.0%} of fp32 peak"
    )
    print(f"agreement: max abs diff {diff:.2e}, min cosine {cos.min():.6f}")
    print(
        f"RATIO {name}: carspotter/naive = {ratio_best:.2f}x best-vs-best ({ratio_med:.2f}x median) "
        f"-> goal >= {RATIO_GOAL}x {goal(ratio_best >= RATIO_GOAL)}"
    )
    roof = f"ROOFLINE {name}: {achieved:.1f} GFLOP/s = {frac32:.0%} of fp32 matmul peak {peaks['fp32']:.1f}"
    roof += f" ({achieved / peaks['fp32_conv']:.0%} of fp32 1x1-conv peak {peaks['fp32_conv']:.1f}"
    if "bf16" in peaks:
        roof += f", {achieved / peaks['bf16']:.0%} of bf16 matmul peak {peaks['bf16']:.1f}"
    roof += ")"
    if arch == "resnet50":
        roof += f" -> goal >= {100 * ROOFLINE_GOAL:.0f}% {goal(frac32 >= ROOFLINE_GOAL)}"
    print(roof)
    if args.ablation:
        ablation(base, ds, size, flops, args)


def _interleaved(variants: dict[str, tuple], reps: int) -> dict[str, list[float]]:
    """img/s per variant; variants take turns within each repetition so load drift hits them alike."""
    for fn, _ in variants.values():
        fn()  # warm-up
    rates: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(reps):
        for k, (fn, n_img) in variants.items():
            t = time.perf_counter()
            fn()
            rates[k].append(n_img / (time.perf_counter() - t))
    return rates


def ablation(base: CarModel, ds: Dataset, size: int, flops: float, args: argparse.Namespace) -> None:
    """Each knob alone: model-only on random tensors, the loader alone, then whole embed_dataset variants."""
    from torch.utils.data import DataLoader

    bs, reps = args.batch_size, args.reps
    x = torch.randn(bs, 3, size, size)
    xcl = x.contiguous(memory_format=torch.channels_last)
    nchw = copy.deepcopy(base)
    cl = copy.deepcopy(base).to(memory_format=torch.channels_last)
    folded, n_folded = fold_batchnorm(cl, xcl[:2], lambda m, t: m.embed(t))
    bf16 = bf16_native()

    def call(m, inp, grad=False, amp=False, threads=None):
        def f():
            prev = torch.get_num_threads()
            if threads:
                torch.set_num_threads(threads)
            try:
                ctx = torch.inference_mode() if not grad else torch.no_grad()
                with ctx, torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                    return m.embed(inp)
            finally:
                torch.set_num_threads(prev)

        return f

    def chunked(m, inp):
        def f():
            with torch.inference_mode():
                return forward_chunked(m.embed, inp, CPU_CHUNK)

        return f

    def xb(b: int) -> torch.Tensor:
        return torch.randn(b, 3, size, size).contiguous(memory_format=torch.channels_last)

    v: dict[str, tuple] = {
        "NCHW fp32, no_grad (naive)": (call(nchw, x, grad=True), bs),
        "NCHW fp32, inference_mode": (call(nchw, x), bs),
        "channels_last": (call(cl, xcl), bs),
        "channels_last, 1 thread": (call(cl, xcl, threads=1), bs),
        f"channels_last + BN fold ({n_folded} BN)": (call(folded, xcl), bs),
        "channels_last + BN fold, 1 thread": (call(folded, xcl, threads=1), bs),
        "channels_last + BN fold, batch 32": (call(folded, xb(32)), 32),
        "channels_last + BN fold, batch 128": (call(folded, xb(128)), 128),
        "channels_last + BN fold, batch 16": (call(folded, xb(16)), 16),
        "channels_last + BN fold, batch 8": (call(folded, xb(8)), 8),
        f"+ BN fold, {bs} in chunks of {CPU_CHUNK} (embed_dataset)": (chunked(folded, xcl), bs),
    }
    if bf16:
        v["channels_last bf16 autocast"] = (call(cl, xcl, amp=True), bs)
        v["channels_last + BN fold, bf16 autocast"] = (call(folded, xcl, amp=True), bs)
    if args.compile:
        t = time.perf_counter()
        comp = torch.compile(copy.deepcopy(folded))
        with torch.inference_mode():
            comp.embed(xcl)
        print(f"   (torch.compile took {time.perf_counter() - t:.0f} s)")
        v["channels_last + BN fold, torch.compile"] = (call(comp, xcl), bs)
    print(f"-- ablation, model only (random tensors, {reps} interleaved reps; img/s best / median, GFLOP/s):")
    for name, r in _interleaved(v, reps).items():
        print(f"   {name:<50} {max(r):8.1f} / {statistics.median(r):8.1f}   {max(r) * flops / 1e9:7.1f}")
    if bf16:
        with torch.inference_mode():
            a = folded.embed(xcl)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                b = folded.embed(xcl).float()
        cos = torch.nn.functional.cosine_similarity(a, b, dim=1)
        print(
            f"   bf16 vs fp32 embeddings: min cosine {float(cos.min()):.5f}, "
            f"max abs diff {float((a - b).abs().max()):.3g} (max |value| {float(a.abs().max()):.3g})"
        )

    n = len(ds)

    def load(nw: int) -> None:
        for _ in DataLoader(ds, batch_size=bs, num_workers=nw):
            pass

    loads = {f"num_workers={nw}": ((lambda nw=nw: load(nw)), n) for nw in (0, 1, 2)}
    print(f"-- ablation, loader only (decode + resize + crop + normalise, batch {bs}; img/s best / median):")
    for name, r in _interleaved(loads, max(1, reps - 1)).items():
        print(f"   {name:<50} {max(r):8.1f} / {statistics.median(r):8.1f}")

    def one_thread(fn):
        def f():
            prev = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                return fn()
            finally:
                torch.set_num_threads(prev)

        return f

    plain = {"fold_bn": False, "cpu_chunk": None}
    e2e = {
        f"embed_dataset, no BN fold, no chunks (batch {bs})": (
            lambda: carspotter_embed(cl, ds, bs, 0, **plain),
            n,
        ),
        "+ BN fold": (lambda: carspotter_embed(cl, ds, bs, 0, cpu_chunk=None), n),
        f"+ BN fold + chunks of {CPU_CHUNK} (default)": (lambda: carspotter_embed(cl, ds, bs, 0), n),
        "default, 1 worker": (lambda: carspotter_embed(cl, ds, bs, 1), n),
        "default, 1 thread": (one_thread(lambda: carspotter_embed(cl, ds, bs, 0)), n),
        "default, 1 thread, 1 worker": (one_thread(lambda: carspotter_embed(cl, ds, bs, 1)), n),
    }
    print(f"-- ablation, whole path ({n} images; img/s best / median, GFLOP/s):")
    for name, r in _interleaved(e2e, max(1, reps - 1)).items():
        print(f"   {name:<50} {max(r):8.1f} / {statistics.median(r):8.1f}   {max(r) * flops / 1e9:7.1f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, help="a prepared dataset (default: generate a synthetic one)")
    ap.add_argument("--split", default="all", help="which split's images to embed (default: all)")
    ap.add_argument("--n", type=int, default=256, help="number of images")
    ap.add_argument("--models", default="resnet50@224,tf_efficientnet_lite0@128", help="ARCH@SIZE,...")
    ap.add_argument("--batch-size", type=int, default=64, help="carspotter path batch size")
    ap.add_argument("--num-workers", type=int, default=0, help="carspotter path DataLoader workers")
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions (after one warm-up)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    ap.add_argument("--ablation", action="store_true", help="also time each speed knob on its own")
    ap.add_argument("--compile", action="store_true", help="ablation: include torch.compile (slow to build)")
    ap.add_argument("--smoke", action="store_true", help="tiny and fast: proves the script works")
    args = ap.parse_args(argv)
    if args.smoke:
        args.n, args.reps, args.models, args.batch_size = 12, 1, "test_efficientnet@32", 8
    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine_line())
    with contextlib.ExitStack() as stack:
        root = args.data
        if root is None:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cs-embed-bench-")))
            root = synthetic_prepared(tmp / "synth", args.n, size=128)
            print(f"data: generated synthetic set in {root}")
        records = split_records(read_manifest(root), args.split)[: args.n]
        if not records:
            raise SystemExit(f"error: {root}: no images in split {args.split!r}")
        print(f"data: {root} ({len(records)} images, split {args.split})")
        peak_n = 256 if args.smoke else 2048
        peaks = {"fp32": matmul_peak_gflops(peak_n, torch.float32, reps=2 if args.smoke else 5)}
        peaks["fp32_conv"] = conv1x1_peak_gflops(peak_n, reps=2 if args.smoke else 5)
        if bf16_native():
            peaks["bf16"] = matmul_peak_gflops(peak_n, torch.bfloat16, reps=2 if args.smoke else 5)
        print(
            f"peak (n={peak_n}, best-of-N): fp32 torch.matmul {peaks['fp32']:.1f}, fp32 1x1 conv (oneDNN) "
            f"{peaks['fp32_conv']:.1f}, bf16 torch.matmul {peaks.get('bf16', float('nan')):.1f} GFLOP/s"
        )
        for spec in args.models.split(","):
            arch, _, size = spec.partition("@")
            compare(args, arch.strip(), int(size or 224), Path(root), records, peaks)
    _ = resize_size_for  # the naive loop's round(size / 0.875) is the same rule
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
