"""ResNet-50 train and embedding throughput on one GPU, against the bf16 dense peak (MFU).

One prepared, self-checking script for a session that has a GPU (<= 8 minutes by default, `--budget-s`):
synthetic tensors already on the device (no data loading), carspotter's own model (`create_model`), the
training step as engine/train.py runs it (bf16 autocast, channels_last, SGD momentum, cross-entropy), eager
and then `torch.compile`d; the embedding pass (`model.embed`, inference_mode, bf16) the same two ways.
FLOPs are counted once with FlopCounterMode (train = forward + backward); MFU = achieved / --peak-tflops.

Checks itself: losses must be finite, compiled embeddings must match eager ones (bf16 tolerance), phases
that would overrun the time budget are skipped (and say so), a failing torch.compile is reported and the
eager numbers still printed. Exit status 0 when the eager numbers were measured.

    python benchmarks/gpu_train_throughput.py                      # on the GPU machine
    python benchmarks/gpu_train_throughput.py --batch-size 384 --json "$OUT/gpu.json"
    python benchmarks/gpu_train_throughput.py --smoke              # CPU, tiny: proves the script runs

Needs torch (with CUDA), timm and PyYAML on the GPU host; carspotter itself is taken from this
checkout's src/ when it is not installed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

try:
    import carspotter  # noqa: F401
except ImportError:  # a bare GPU host with torch + timm but without the package installed: use the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from carspotter.config import ModelConfig
from carspotter.models.factory import CarModel, create_model

N_CLASSES = 196


class Budget:
    def __init__(self, seconds: float) -> None:
        self.end = time.perf_counter() + seconds

    def left(self) -> float:
        return self.end - time.perf_counter()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_flops(model: CarModel, size: int, device: torch.device) -> tuple[float, float]:
    """(inference FLOPs per image, train FLOPs per image = forward + backward), fp32 semantics."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(2, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    model.eval()
    with FlopCounterMode(display=False) as fc, torch.inference_mode():
        model.embed(x)
    infer = fc.get_total_flops() / 2
    model.train()
    with FlopCounterMode(display=False) as fc:
        nn.functional.cross_entropy(model(x), torch.zeros(2, dtype=torch.long, device=device)).backward()
    model.zero_grad(set_to_none=True)
    return infer, fc.get_total_flops() / 2


def time_loop(fn: Callable[[], Any], device: torch.device, warmup: int, steps: int, budget: Budget) -> dict:
    """Warm up (compiles happen here), then time `steps` calls; stops early if the budget runs out."""
    t = time.perf_counter()
    for _ in range(warmup):
        out = fn()
    sync(device)
    warm_s = time.perf_counter() - t
    times, t = [], time.perf_counter()
    for _ in range(steps):
        out = fn()
        sync(device)
        now = time.perf_counter()
        times.append(now - t)
        t = now
        if budget.left() < 5:
            break
    times.sort()
    return {"warmup_s": warm_s, "steps": len(times), "step_s": times[len(times) // 2], "last": out}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="resnet50", help="any timm model (--smoke: test_resnet)")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=256, help="train batch")
    ap.add_argument("--embed-batch-size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=30, help="timed steps per phase (median step time is used)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--peak-tflops", type=float, default=790.0, help="bf16 dense peak of the GPU")
    ap.add_argument("--budget-s", type=float, default=450.0, help="stop starting phases after this long")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument(
        "--smoke", action="store_true", help="CPU, tiny shapes, no compile: proves the script runs"
    )
    args = ap.parse_args(argv)
    if args.smoke:  # timm's tiny test_resnet: same code path, seconds on a CPU
        args.arch = "test_resnet" if args.arch == "resnet50" else args.arch
        args.img_size, args.batch_size, args.embed_batch_size = 32, 2, 2
        args.steps, args.warmup, args.no_compile = 2, 1, True
        args.device = "cpu" if args.device == "auto" else args.device
    budget = Budget(args.budget_s)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if device.type != "cuda" and not args.smoke:
        print("error: no CUDA device here; this benchmark is for a GPU machine (use --smoke for a CPU check)")
        return 2
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke)"
    print(f"device: {name}; torch {torch.__version__}, CUDA {torch.version.cuda}")
    print(f"peak: {args.peak_tflops} TFLOP/s (bf16 dense)")
    res: dict[str, Any] = {
        "device": name,
        "torch": torch.__version__,
        "arch": args.arch,
        "img_size": args.img_size,
        "peak_tflops": args.peak_tflops,
        "phases": {},
    }

    torch.manual_seed(0)
    model = create_model(ModelConfig(arch=args.arch, pretrained=False), N_CLASSES, args.img_size)
    model = model.to(device).to(memory_format=torch.channels_last)
    f_inf, f_train = count_flops(model, args.img_size, device)
    res["gflop_per_image"] = {"embed": f_inf / 1e9, "train": f_train / 1e9}
    print(
        f"{args.arch} @ {args.img_size}px: {f_inf / 1e9:.2f} GFLOP/image forward, {f_train / 1e9:.2f} train"
    )

    bs, ebs, s = args.batch_size, args.embed_batch_size, args.img_size
    x = torch.randn(bs, 3, s, s, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, N_CLASSES, (bs,), device=device)
    xe = torch.randn(ebs, 3, s, s, device=device).contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)

    def train_step(net: Callable) -> Callable[[], torch.Tensor]:
        def step() -> torch.Tensor:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                out = net(x)  # (B, C)
            loss = loss_fn(out.float(), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()

        return step

    def embed_step(fn: Callable) -> Callable[[], torch.Tensor]:
        def step() -> torch.Tensor:
            with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16):
                return fn(xe)  # (B, D)

        return step

    def record(key: str, r: dict, n_img: int, flops: float) -> None:
        ips = n_img / r["step_s"]
        tflops = ips * flops / 1e12
        row = {
            "img_per_s": ips,
            "tflops": tflops,
            "mfu": tflops / args.peak_tflops,
            "step_s": r["step_s"],
            "steps": r["steps"],
            "warmup_s": r["warmup_s"],
        }
        res["phases"][key] = row
        print(
            f"RESULT {key:<16} {ips:9.1f} img/s  {tflops:7.2f} TFLOP/s  MFU {100 * row['mfu']:5.1f}%  "
            f"(median of {r['steps']} steps; warm-up {r['warmup_s']:.1f} s)",
            flush=True,
        )

    def affordable(key: str, est_s: float) -> bool:
        if est_s < budget.left() - 10:
            return True
        print(f"SKIP {key}: needs ~{est_s:.0f} s, {budget.left():.0f} s of budget left")
        return False

    # 1. eager training
    model.train()
    r = time_loop(train_step(model), device, args.warmup, args.steps, budget)
    if not torch.isfinite(r["last"]):
        print("error: non-finite training loss")
        return 1
    record("train_eager", r, bs, f_train)
    per_train = r["step_s"] * (args.steps + args.warmup)
    # 2. eager embedding
    model.eval()
    r = time_loop(embed_step(model.embed), device, args.warmup, args.steps, budget)
    ref = r["last"].float()
    record("embed_eager", r, ebs, f_inf)
    per_embed = r["step_s"] * (args.steps + args.warmup)

    if not args.no_compile:
        compile_guess = 120.0  # s; ResNet-50 train graph on a many-core host, measured 60-120 s elsewhere
        if affordable("train_compiled", per_train + compile_guess):
            try:
                model.train()
                r = time_loop(train_step(torch.compile(model)), device, args.warmup, args.steps, budget)
                record("train_compiled", r, bs, f_train)
            except Exception as e:  # report, keep the eager numbers
                print(f"FAILED train_compiled: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
        if affordable("embed_compiled", per_embed + compile_guess / 2):
            try:
                model.eval()
                r = time_loop(embed_step(torch.compile(model.embed)), device, args.warmup, args.steps, budget)
                got = r["last"].float()
                err = float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-6))
                res["embed_compiled_rel_err"] = err
                ok = err < 5e-2
                verdict = "ok" if ok else "MISMATCH"
                print(f"check: compiled vs eager embeddings, max|diff| / max|value| = {err:.2e} ({verdict})")
                record("embed_compiled", r, ebs, f_inf)
                if not ok:
                    res["phases"]["embed_compiled"]["mismatch"] = True
            except Exception as e:
                print(f"FAILED embed_compiled: {type(e).__name__}: {str(e).splitlines()[0][:300]}")

    ph = res["phases"]
    for kind in ("train", "embed"):
        best = max(
            (k for k in ph if k.startswith(kind) and not ph[k].get("mismatch")),
            key=lambda k: ph[k]["img_per_s"],
        )
        res[f"best_{kind}"] = best
        if f"{kind}_compiled" in ph:
            how = f"{ph[f'{kind}_compiled']['img_per_s'] / ph[f'{kind}_eager']['img_per_s']:.2f}x"
        else:
            how = "n/a (not compiled)"
        ips, mfu = ph[best]["img_per_s"], ph[best]["mfu"]
        print(f"RATIO {kind}: compiled/eager = {how}; best {best}: {ips:.1f} img/s, MFU {100 * mfu:.1f}%")
    if device.type == "cuda":
        res["max_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        print(f"peak GPU memory {res['max_memory_gib']:.1f} GiB")
    if args.smoke:
        print("(smoke mode on CPU: the numbers above only prove the script runs)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps({k: v for k, v in res.items() if k != "phases"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
