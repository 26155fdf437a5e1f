"""fp32 vs bf16 autocast on this CPU, side by side: speed (inference and training step) and accuracy.

`train.amp` defaults to "auto" = fp32 on every CPU (bf16 only on CUDA), so the same command gives the same
numbers on any CPU; `--amp bf16` is the opt-in this script prices. Speed: images/s of a forward (inference
mode) and of a training step, best and median of `--reps`. Accuracy: with `--run RUN --data PREPARED`, the
run's top-1 on `--split` in fp32 and in bf16 (and how many photos change their top-1); without, the top-1
agreement and the largest logit difference of the two precisions on random input. CPUs without native bf16
(no avx512_bf16/amx) emulate it, slowly: bf16 is skipped there unless `--force`.

    .venv/bin/python benchmarks/amp_cpu.py                                   # S2 CNN @64 + Lite0 @128
    .venv/bin/python benchmarks/amp_cpu.py --run RUN --data /work/prepared/cars-small --split test --force
    .venv/bin/python benchmarks/amp_cpu.py --smoke
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchutil import machine_line, timeit

from carspotter.config import ModelConfig
from carspotter.models.factory import create_model
from carspotter.models.inference import autocast


def native_bf16() -> bool:
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def models(smoke: bool) -> list[tuple[str, nn.Module, int, int]]:
    """(name, model, img_size, batch)."""
    s2 = ModelConfig(
        arch="scratch_cnn",
        pretrained=False,
        channels=[8, 16] if smoke else [32, 64, 128, 256],
        batchnorm=True,
        hidden_bn=True,
        hidden_dim=16 if smoke else 256,
        dropout=0.5,
    )
    out = [("S2 scratch CNN", create_model(s2, 196, 64), 32 if smoke else 64, 8 if smoke else 64)]
    if not smoke:
        lite0 = ModelConfig(arch="tf_efficientnet_lite0", pretrained=False)
        out.append(("EfficientNet-Lite0", create_model(lite0, 196, 128), 128, 32))
    return out


def speed(model: nn.Module, size: int, batch: int, amp: str, reps: int) -> tuple[float, float, float, float]:
    """(forward img/s best, median, train-step img/s best, median)."""
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 196, (batch,))
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    def fwd() -> None:
        model.eval()
        with torch.inference_mode(), autocast(amp, "cpu"):
            model(x)

    def step() -> None:
        model.train()
        with autocast(amp, "cpu"):
            out = model(x)
        loss = nn.functional.cross_entropy(out.float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    fwd()
    step()  # warm-up
    f, s = timeit(fwd, reps), timeit(step, reps)
    return batch / min(f), batch / statistics.median(f), batch / min(s), batch / statistics.median(s)


def run_accuracy(run: Path, data: Path, split: str) -> dict[str, float]:
    """The run's top-1 on a split in fp32 and in bf16, and the share of photos whose top-1 differs."""
    from carspotter.data.dataset import PreparedDataset
    from carspotter.models.inference import run_model
    from carspotter.models.loading import load_run

    model, _ = load_run(run)
    ds = PreparedDataset(data, split, model.preprocess.transform())
    loader = torch.utils.data.DataLoader(ds, batch_size=64)
    preds: dict[str, list[torch.Tensor]] = {"none": [], "bf16": []}
    labels = []
    for x, yb in loader:
        labels.append(yb)
        for amp in preds:
            preds[amp].append(run_model(model, x, amp).argmax(1))
    y = torch.cat(labels)
    p32, p16 = torch.cat(preds["none"]), torch.cat(preds["bf16"])
    return {
        "top1_fp32": (p32 == y).float().mean().item(),
        "top1_bf16": (p16 == y).float().mean().item(),
        "changed": (p32 != p16).float().mean().item(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--force", action="store_true", help="run bf16 even without native CPU support")
    ap.add_argument("--run", type=Path, help="a run directory: measure its top-1 in both precisions")
    ap.add_argument("--data", type=Path, help="prepared dataset for --run")
    ap.add_argument("--split", default="test")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, seconds")
    args = ap.parse_args()
    if args.smoke:
        args.reps, args.force = 2, True
    print(machine_line())
    native = native_bf16()
    print(f"native CPU bf16 (oneDNN): {native}")
    if not native and not args.force:
        print("bf16 skipped: this CPU has no native bf16 (pass --force to time the emulation); ratio n/a")
        return
    torch.manual_seed(0)
    print(
        f"{'model':22s} {'img':>4s} {'batch':>5s} | {'fwd fp32':>9s} {'fwd bf16':>9s} {'ratio':>6s} | "
        f"{'step fp32':>9s} {'step bf16':>9s} {'ratio':>6s} | top-1 agree  max |Δlogit|"
    )
    for name, model, size, batch in models(args.smoke):
        f32 = speed(model, size, batch, "none", args.reps)
        b16 = speed(model, size, batch, "bf16", args.reps)
        x = torch.randn(batch, 3, size, size)
        model.eval()
        with torch.inference_mode():
            l32 = model(x)
            with autocast("bf16", "cpu"):
                l16 = model(x).float()
        agree = (l32.argmax(1) == l16.argmax(1)).float().mean().item()
        print(
            f"{name:22s} {size:4d} {batch:5d} | {f32[0]:9.1f} {b16[0]:9.1f} {b16[0] / f32[0]:5.2f}x | "
            f"{f32[2]:9.1f} {b16[2]:9.1f} {b16[2] / f32[2]:5.2f}x | {agree:10.1%}  {(l32 - l16).abs().max():.3g}"
        )
    print(f"img/s = best of {args.reps} repetitions; ratio = bf16 img/s / fp32 img/s (> 1: bf16 faster)")
    if args.run is not None:
        if args.data is None:
            ap.error("--run needs --data")
        acc = run_accuracy(args.run, args.data, args.split)
        print(
            f"{args.run} on {args.split}: top-1 fp32 {acc['top1_fp32']:.2%}, bf16 {acc['top1_bf16']:.2%}; "
            f"top-1 changed for {acc['changed']:.2%} of the photos"
        )


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
