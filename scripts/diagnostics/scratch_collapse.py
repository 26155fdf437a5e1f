"""Why do the BatchNorm scratch networks (S2/S3/strong-cnn-scratch) collapse to the class prior?

Trains a preset's scratch network for a few epochs on a prepared dataset (default /work/prepared/cars-small,
64 px, no augmentation: the S2 recipe) and after every epoch prints, measured in eval mode on a fixed probe of
training photos:
  - dead ReLU units per block (a conv channel / hidden unit that is zero for every probe photo);
  - activation scale per block (rms of the block output, and of the hidden layer);
  - eval-mode loss/accuracy on the training photos beside the train-mode running figures.
Variants (`--variant`, repeatable): old (the network before the fix: no BatchNorm1d in the hidden layer),
old_dropout0, old_bf16 (bf16 autocast on), old_lr3e-4, fixed (the preset as shipped), fixed_dropout0, fixed_bf16.

    PYTHONPATH=src OMP_NUM_THREADS=1 python scripts/diagnostics/scratch_collapse.py --epochs 2 \
        --variant old --variant old_dropout0 --variant old_bf16 --variant fixed
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from torch import nn

from carspotter.config import apply_overrides
from carspotter.data.dataset import PreparedDataset
from carspotter.data.transforms import build_transform
from carspotter.models.factory import create_model
from carspotter.presets import load_preset

# "old" = the network before the fix (no BatchNorm in the hidden layer); "fixed" = the preset as shipped.
VARIANTS = {
    "old": {"model.hidden_bn": False},
    "old_dropout0": {"model.hidden_bn": False, "model.dropout": 0.0},
    "old_bf16": {"model.hidden_bn": False},
    "old_lr3e-4": {"model.hidden_bn": False, "optim.lr": 3e-4},
    "fixed": {},
    "fixed_dropout0": {"model.dropout": 0.0},
    "fixed_bf16": {},
}


def load_split(root: str, split: str, cfg, mean, std) -> tuple[torch.Tensor, torch.Tensor]:
    ds = PreparedDataset(root, split, build_transform(cfg.data, mean, std, train=False))
    xs, ys = zip(*(ds[i] for i in range(len(ds))), strict=True)
    return torch.stack(xs), torch.tensor(ys)


def relu_outputs(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) whose output is a post-ReLU activation: each conv block's pooled output, the hidden layer."""
    bb = model.backbone
    return [(f"block{i + 1}", b) for i, b in enumerate(bb.blocks)] + [("hidden", bb.fc)]


@torch.no_grad()
def probe(model: nn.Module, x: torch.Tensor, y: torch.Tensor, amp: bool) -> dict:
    model.eval()
    acts: dict[str, list[torch.Tensor]] = {}
    hooks = [
        m.register_forward_hook(lambda _m, _i, o, n=n: acts.setdefault(n, []).append(o.float()))
        for n, m in relu_outputs(model)
    ]
    logits = []
    for i in range(0, len(x), 128):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            logits.append(model(x[i : i + 128]).float())
    for h in hooks:
        h.remove()
    out = torch.cat(logits)
    res = {
        "eval_loss": nn.functional.cross_entropy(out, y).item(),
        "eval_acc": (out.argmax(1) == y).float().mean().item(),
    }
    for n, a in acts.items():
        a = torch.cat(a)  # (N, C, H, W) or (N, F)
        per_unit = a.transpose(0, 1).reshape(a.shape[1], -1)  # (C, N·H·W)
        res[f"{n}_dead"] = (per_unit.abs().amax(1) == 0).float().mean().item()
        res[f"{n}_rms"] = a.pow(2).mean().sqrt().item()
    return res


def run(variant: str, args: argparse.Namespace, data: dict) -> None:
    cfg = load_preset(args.preset)
    over = {"data.img_size": args.img_size, "model.pretrained": False, **VARIANTS[variant]}
    over = {k: v for k, v in over.items() if k.split(".")[-1] in _fields(cfg, k)}
    cfg = apply_overrides(cfg, over)
    torch.manual_seed(args.seed)
    model = create_model(cfg.model, 196, args.img_size)
    x, y, px, py = data["x"], data["y"], data["px"], data["py"]
    opt = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr)
    amp = variant.endswith("bf16")
    g = torch.Generator().manual_seed(args.seed)
    bs = cfg.data.batch_size
    print(f"\n== {variant}: {args.preset} {over}  (ln 196 = {math.log(196):.3f})")
    r = probe(model, px, py, amp)
    print(_fmt(0, float("nan"), float("nan"), r))
    for ep in range(args.epochs):
        model.train()
        perm = torch.randperm(len(x), generator=g)
        loss_sum = correct = 0.0
        t0 = time.perf_counter()
        for i in range(0, len(x), bs):
            idx = perm[i : i + bs]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                out = model(x[idx])
            loss = nn.functional.cross_entropy(out.float(), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            loss_sum += loss.item() * len(idx)
            correct += (out.argmax(1) == y[idx]).sum().item()
        r = probe(model, px, py, amp)
        print(_fmt(ep + 1, loss_sum / len(x), correct / len(x), r) + f"  {time.perf_counter() - t0:.0f}s")


def _fields(cfg, dotted: str) -> set[str]:
    node = cfg
    for p in dotted.split(".")[:-1]:
        node = getattr(node, p)
    return set(vars(node))


def _fmt(ep: int, tl: float, ta: float, r: dict) -> str:
    blocks = " ".join(
        f"{k[:-5]}:dead {100 * r[k]:.0f}% rms {r[k[:-5] + '_rms']:.2f}" for k in r if k.endswith("_dead")
    )
    return (
        f"ep {ep}: train-mode loss {tl:.3f} acc {100 * ta:.1f}% | eval-mode train loss {r['eval_loss']:.3f} "
        f"acc {100 * r['eval_acc']:.1f}% | {blocks}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="/work/prepared/cars-small")
    ap.add_argument("--preset", default="seed-s2-cnn-bn-dropout")
    ap.add_argument("--img-size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--probe", type=int, default=512, help="training photos in the eval-mode probe")
    ap.add_argument("--train-max", type=int, default=0, help="train on the first N photos (0 = all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variant", action="append", choices=sorted(VARIANTS))
    args = ap.parse_args()
    cfg = apply_overrides(load_preset(args.preset), {"data.img_size": args.img_size})
    x, y = load_split(args.data, "train", cfg, (0.5,) * 3, (0.5,) * 3)
    if args.train_max:
        keep = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[: args.train_max]
        x, y = x[keep], y[keep]
    step = max(1, len(x) // args.probe)
    data = {"x": x, "y": y, "px": x[::step][: args.probe], "py": y[::step][: args.probe]}
    print(f"{args.data}: {len(x)} training photos at {args.img_size} px; probe {len(data['px'])}")
    for v in args.variant or ["old", "fixed"]:
        run(v, args, data)


if __name__ == "__main__":
    main()
