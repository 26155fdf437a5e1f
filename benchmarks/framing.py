"""Robustness to framing: a trained run on the same test photos, re-framed, with and without the second look.

Re-framings of each photo (w × h):
  tight crops   90 / 75 / 60 % of each side, centred on the photo's centre, or on the CAM box of the first
                look at the original photo (clamped inside the photo)
  wider frames  the photo shrunk to 75 / 50 % of each side and pasted in the middle of a w × h canvas that is
                padded (the photo's mean colour) or blurred (the photo itself, Gaussian-blurred, radius w/10)
  resolution    the whole photo shrunk to 60 / 50 % of each side, nothing else: the ceiling of a zoom that
                found the car of a 50 % wide frame exactly (the crop has only that many pixels)
Each is classified once (one look) and with `--zoom` (one pass gives both: explain/zoom.py Looker), and the
accuracy is printed against the framing, with its ratio to the original framing (two ratios with zoom: to the
original framing with zoom, and to the original framing's one look), and the zoom's paired gain with its
bootstrap 95 % interval. The boxes for "on box" are those of the original framing's own pass.

    python benchmarks/framing.py --run RUN [--data DIR] [--split test --limit 600 --combine mean] [--focus]
    python benchmarks/framing.py --smoke

`--focus`: only the framings the goal is set on (original, 60 % tight on centre and box, 50 % wide pad and
blur): less than half the time.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchutil import machine_line

from carspotter.data.dataset import PreparedDataset
from carspotter.explain.box import Box, box_area
from carspotter.explain.zoom import (
    Looker,
    ZoomSettings,
    combine_alternatives,
    load_for_split,
    paired_bootstrap,
)

FOCUS = ("original", "tight 60 % centre", "tight 60 % on box", "wide 50 % pad", "wide 50 % blur")
GOAL = 0.9  # accuracy at a 60 % crop / 50 % wide frame with --zoom, as a share of the original framing's


def tight(img: Image.Image, share: float, centre: tuple[float, float]) -> Image.Image:
    """`share` of each side, centred on `centre` (normalised), kept inside the photo."""
    w, h = img.size
    cw, ch = max(1, round(w * share)), max(1, round(h * share))
    left = min(max(round(centre[0] * w - cw / 2), 0), w - cw)
    top = min(max(round(centre[1] * h - ch / 2), 0), h - ch)
    return img.crop((left, top, left + cw, top + ch))


def lowres(img: Image.Image, share: float) -> Image.Image:
    """The whole photo at `share` of its resolution (same framing, fewer pixels): what a perfect crop of a car
    filling `share` of each side would give, so the ceiling of any zoom on a wide frame of that share."""
    w, h = img.size
    return img.resize((max(1, round(w * share)), max(1, round(h * share))), Image.Resampling.BILINEAR)


def wide(img: Image.Image, share: float, canvas: str) -> Image.Image:
    """The photo at `share` of each side in the middle of a canvas of its own size: padded or blurred."""
    w, h = img.size
    if canvas == "pad":
        mean = tuple(int(v) for v in np.asarray(img).reshape(-1, 3).mean(0))
        bg = Image.new("RGB", (w, h), mean)
    else:
        bg = img.filter(ImageFilter.GaussianBlur(max(w, h) / 10))
    sw, sh = max(1, round(w * share)), max(1, round(h * share))
    bg.paste(img.resize((sw, sh), Image.Resampling.BILINEAR), ((w - sw) // 2, (h - sh) // 2))
    return bg


def conditions(
    only: tuple[str, ...] | None = None,
) -> list[tuple[str, Callable[[Image.Image, Box], Image.Image]]]:
    """(name, reframe(photo, CAM box of the original framing)); "original" first."""
    out: list[tuple[str, Callable[[Image.Image, Box], Image.Image]]] = [("original", lambda im, b: im)]
    for s in (0.9, 0.75, 0.6):
        out.append((f"tight {int(s * 100)} % centre", lambda im, b, s=s: tight(im, s, (0.5, 0.5))))
        out.append(
            (
                f"tight {int(s * 100)} % on box",
                lambda im, b, s=s: tight(im, s, ((b[0] + b[2]) / 2, (b[1] + b[3]) / 2)),
            )
        )
    for s in (0.75, 0.5):
        for canvas in ("pad", "blur"):
            out.append((f"wide {int(s * 100)} % {canvas}", lambda im, b, s=s, c=canvas: wide(im, s, c)))
    for s in (0.6, 0.5):
        out.append((f"resolution {int(s * 100)} %", lambda im, b, s=s: lowres(im, s)))
    return [c for c in out if only is None or c[0] in only]


def cam_overhead(model: torch.nn.Module, x: torch.Tensor, reps: int = 5) -> dict[str, float]:
    """Best-of-`reps` seconds of a plain forward vs the forward that also yields the CAM box maps."""
    from carspotter.explain.box import activation_maps

    def best(fn: Callable[[], Any]) -> float:
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return min(ts)

    plain = best(lambda: model(x))
    cam = best(lambda: activation_maps(model, x))  # type: ignore[arg-type]
    return {"forward_s": plain, "forward_with_cam_s": cam, "ratio": cam / plain}


def run_benchmark(
    run: Path,
    data: Path | None,
    split: str,
    limit: int | None,
    combine: str,
    batch: int = 32,
    seed: int = 0,
    margin: float | None = None,
    only: tuple[str, ...] | None = None,
) -> dict[str, Any]:
    t0 = time.perf_counter()
    model, info, ds, _ = load_for_split(run, data, split)  # the run's classes, its own crop_bbox setting
    idx = np.arange(len(ds))
    if limit and limit < len(ds):
        idx = np.sort(np.random.default_rng(seed).choice(len(ds), size=limit, replace=False))
    labels = torch.as_tensor([ds.records[i].label for i in idx])
    zs = ZoomSettings(combine) if margin is None else ZoomSettings(combine, margin=margin)
    looker = Looker(model, info, zoom=zs)
    images = [ds.load_image(int(i)) for i in idx]
    overhead = cam_overhead(model, torch.stack([model.preprocess.transform()(im) for im in images[:batch]]))
    rows = []
    boxes = np.zeros((len(images), 4))  # the CAM box of the first look at the original photo ("on box")
    for name, fn in conditions(only):
        first, final, second, bx, secs = [], [], [], [], [0.0, 0.0]
        for s in range(0, len(images), batch):
            framed = [
                fn(im, tuple(b)) for im, b in zip(images[s : s + batch], boxes[s : s + batch], strict=True)
            ]
            looks = looker(framed)
            first.append(looks.first)
            final.append(looks.logits)
            second.append(looks.second)
            bx.append(looks.boxes)
            secs[0] += looks.seconds["first"]
            secs[1] += looks.seconds["second"]
        first_logits, frame_boxes = torch.cat(first), np.concatenate(bx)
        if name == "original":
            boxes = frame_boxes
        ok1 = (first_logits.argmax(1) == labels).numpy()
        okz = (torch.cat(final).argmax(1) == labels).numpy()
        # every photo had both looks (unless gate): the other ways to combine them, for free
        others = combine_alternatives(labels.numpy(), first_logits, torch.cat(second), frame_boxes, zs)
        rows.append(
            {
                "framing": name,
                "one_look": float(ok1.mean()),
                "zoom": float(okz.mean()),
                "zoom_gain_ci95": list(paired_bootstrap(ok1, okz)),
                "mean_box_area": float(box_area(frame_boxes).mean()),
                "combine_alternatives": others,
                "time_first_s": secs[0],
                "time_second_s": secs[1],
            }
        )
    base = rows[0]
    for r in rows:
        r["one_look_vs_original"] = r["one_look"] / base["one_look"] if base["one_look"] else None
        r["zoom_vs_original_zoom"] = r["zoom"] / base["zoom"] if base["zoom"] else None
        r["zoom_vs_original_one_look"] = r["zoom"] / base["one_look"] if base["one_look"] else None
    return {
        "run": str(run),
        "data": str(ds.root),
        "split": split,
        "n_images": len(idx),
        "subset_seed": seed if len(idx) < len(ds) else None,
        "combine": combine,
        "zoom_margin": zs.margin,
        "rows": rows,
        "cam_overhead": overhead,
        "wall_s": time.perf_counter() - t0,
    }


def print_report(r: dict[str, Any]) -> None:
    print(f"{r['run']} on {r['data']} {r['split']} ({r['n_images']} photos); --zoom combine: {r['combine']}, "
          f"margin {r['zoom_margin']}")  # fmt: skip
    print(
        f"{'framing':22s} {'one look':>9s} {'--zoom':>8s} {'one/orig':>9s} {'zoom/orig':>10s} {'box area':>9s}"
    )
    for x in r["rows"]:
        print(f"{x['framing']:22s} {x['one_look']:9.3f} {x['zoom']:8.3f} "
              f"{x['one_look_vs_original'] or 0:9.2f} {x['zoom_vs_original_zoom'] or 0:10.2f} "
              f"{x['mean_box_area']:9.2f}")  # fmt: skip
    o = r["cam_overhead"]
    t1 = sum(x["time_first_s"] for x in r["rows"])
    t2 = sum(x["time_second_s"] for x in r["rows"])
    print(f"CAM box cost: forward {o['forward_s'] * 1e3:.1f} ms vs forward + CAM {o['forward_with_cam_s'] * 1e3:.1f} ms "
          f"per batch (ratio {o['ratio']:.3f}); --zoom total time / one look: {(t1 + t2) / max(t1, 1e-9):.2f}x")  # fmt: skip
    by = {x["framing"]: x for x in r["rows"]}
    for k in FOCUS[1:]:
        if k in by:
            x = by[k]
            lo, hi = x["zoom_gain_ci95"]
            print(f"RATIO {k} / original with --zoom: {x['zoom_vs_original_zoom'] or 0:.2f} "
                  f"(vs original one look {x['zoom_vs_original_one_look'] or 0:.2f}; goal ≥ {GOAL}); one look: "
                  f"{x['one_look_vs_original'] or 0:.2f}; zoom gain {100 * (x['zoom'] - x['one_look']):+.1f} "
                  f"points [{100 * lo:+.1f}, {100 * hi:+.1f}]")  # fmt: skip


def smoke() -> dict[str, Any]:
    from carspotter.config import ModelConfig
    from carspotter.data.synth import make_synthetic
    from carspotter.engine.checkpoint import ModelInfo, save_model_json, save_weights
    from carspotter.models.factory import create_model

    tmp = Path(tempfile.mkdtemp())
    make_synthetic(tmp / "data", classes=3, per_class=6, size=48)
    cfg = ModelConfig(arch="scratch_cnn", channels=[8, 16], hidden_dim=16)
    model = create_model(cfg, 3, 48)
    (tmp / "run").mkdir()
    save_weights(model, tmp / "run" / "best.safetensors")
    from dataclasses import asdict

    names = [r.class_name for r in PreparedDataset(tmp / "data", "all").records]
    save_model_json(
        tmp / "run",
        ModelInfo(asdict(cfg), 3, sorted(set(names), key=names.index), model.preprocess.to_dict()),
    )
    (tmp / "run" / "config.yaml").write_text(f"data:\n  root: {tmp / 'data'}\n")
    return run_benchmark(tmp / "run", tmp / "data", "test", None, "mean")


def _only(a: argparse.Namespace) -> tuple[str, ...] | None:
    if a.framings:
        names = ("original", *(n.strip() for n in a.framings.split(",")))
        unknown = set(names) - {n for n, _ in conditions()}
        if unknown:
            sys.exit(f"--framings: unknown {sorted(unknown)}; known: {[n for n, _ in conditions()]}")
        return names
    return FOCUS if a.focus else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path)
    ap.add_argument("--data", type=Path, help="Prepared dataset (default: the run's own).")
    ap.add_argument("--split", default="test")
    ap.add_argument("--limit", type=int, default=None, help="A seeded random subset of this many photos.")
    ap.add_argument("--combine", default="mean", help="How --zoom combines the looks: mean | zoom | gate.")
    ap.add_argument("--margin", type=float, default=None, help="Context around the box for the crop.")
    ap.add_argument("--focus", action="store_true", help=f"Only the framings {', '.join(FOCUS)}.")
    ap.add_argument("--framings", help="Only these framings (comma-separated names; original is always run).")
    ap.add_argument("--json", type=Path, help="Also write the result here (refuses to overwrite).")
    ap.add_argument("--smoke", action="store_true")
    a = ap.parse_args()
    print(machine_line())
    torch.set_grad_enabled(False)
    if a.smoke:
        r = smoke()
    else:
        if a.run is None:
            ap.error("give --run RUN, or --smoke")
        r = run_benchmark(a.run, a.data, a.split, a.limit, a.combine, margin=a.margin, only=_only(a))
    print_report(r)
    if a.json:
        if a.json.exists():
            sys.exit(f"{a.json}: exists; not overwritten")
        a.json.write_text(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
