"""A synthetic, fine-grained stand-in for Stanford Cars that needs no download.

Each class is a combination of subtle shape traits of a side-view vehicle (roof line, body length, wheel
size and spacing, window count, light shapes, spoiler, rim style). Colour, position, scale, mirroring,
background clutter, occluders, blur and noise vary *inside* a class, so colour or placement never gives
the class away: a model has to look at shape, as with real car models. Classes sharing a body style
differ in a few small details only (the fine-grained part).

The class definitions are fixed (same names and traits for every seed); the photos depend on the seed only.
"""

from __future__ import annotations

import colorsys
import itertools
import os
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from carspotter.data.manifest import SPLITS, Record, write_manifest, write_summary
from carspotter.data.prepare import check_out, swap_into_place

BODIES = ("Sedan", "Coupe", "Hatchback", "Wagon", "SUV", "Pickup")
YEARS = (2007, 2009, 2010, 2011, 2012)
MAX_CLASSES = 384  # distinct trait combinations we draw from

# Cabin profile per body: (x, height above the belt line) as fractions of length; x runs rear → front.
CABINS = {
    "Sedan": [(0.02, 0.0), (0.22, 0.0), (0.33, 0.17), (0.58, 0.17), (0.72, 0.0)],
    "Coupe": [(0.04, 0.0), (0.12, 0.02), (0.40, 0.14), (0.54, 0.14), (0.70, 0.0)],
    "Hatchback": [(0.02, 0.0), (0.06, 0.12), (0.12, 0.17), (0.56, 0.17), (0.72, 0.0)],
    "Wagon": [(0.01, 0.0), (0.03, 0.16), (0.06, 0.18), (0.58, 0.18), (0.72, 0.0)],
    "SUV": [(0.01, 0.0), (0.02, 0.20), (0.05, 0.22), (0.60, 0.22), (0.73, 0.0)],
    "Pickup": [(0.42, 0.0), (0.44, 0.20), (0.46, 0.21), (0.64, 0.21), (0.76, 0.0)],
}


@dataclass(frozen=True)
class CarClass:
    name: str
    body: str
    length: float  # relative body length (1.0 = base)
    wheel: float  # wheel radius as a fraction of length
    wheelbase: float  # axle distance as a fraction of length
    windows: int  # side windows: 2 or 3
    headlight: str  # round | rect | strip
    taillight: str  # tall | wide
    spoiler: bool
    spokes: int  # 0 = plain hubcap


def class_catalogue(n: int) -> list[CarClass]:
    """`n` distinct classes, bodies taken in turn so same-body classes differ only in details."""
    rng = np.random.default_rng(1234)  # fixed: class definitions do not depend on the data seed
    details = list(
        itertools.product(
            (1.0, 1.15), (0.09, 0.125), (0.54, 0.66), (2, 3), ("round", "rect", "strip"), ("tall", "wide"),
            (False, True), (0, 5),
        )
    )  # fmt: skip
    order = rng.permutation(len(details))
    per_body: Counter[str] = Counter()
    out = []
    for i in range(n):
        body = BODIES[i % len(BODIES)]
        k = per_body[body]
        per_body[body] += 1
        length, wheel, wb, win, head, tail, spoiler, spokes = details[order[i % len(details)]]
        letter = chr(ord("A") + k % 26) + (str(k // 26 + 1) if k >= 26 else "")
        name = f"Synthetic {body} {letter} {YEARS[(i // len(BODIES)) % len(YEARS)]}"
        out.append(
            CarClass(name, body, length, wheel, wb, win, head, tail, spoiler and body != "Pickup", spokes)
        )
    if len({tuple(asdict(c).values())[1:] for c in out}) != n:
        raise AssertionError("synthetic class catalogue has duplicates")
    return out


def _colour(rng: np.random.Generator, sat: tuple[float, float], val: tuple[float, float]) -> tuple[int, ...]:
    r, g, b = colorsys.hsv_to_rgb(rng.random(), rng.uniform(*sat), rng.uniform(*val))
    return (int(r * 255), int(g * 255), int(b * 255))


def _background(d: ImageDraw.ImageDraw, rng: np.random.Generator, s: int, horizon: float) -> None:
    sky = _colour(rng, (0.0, 0.5), (0.5, 1.0))
    ground = _colour(rng, (0.0, 0.5), (0.2, 0.7))
    d.rectangle((0, 0, s, int(horizon)), fill=sky)
    d.rectangle((0, int(horizon), s, s), fill=ground)
    for _ in range(rng.integers(1, 6)):  # buildings, trees, poles behind the car
        kind = rng.integers(0, 3)
        c = _colour(rng, (0.0, 0.4), (0.3, 0.9))
        x, w = rng.uniform(-0.1, 1.0) * s, rng.uniform(0.03, 0.3) * s
        h = rng.uniform(0.1, 0.6) * s
        if kind == 0:
            d.rectangle((x, horizon - h, x + w, horizon + 2), fill=c)
        elif kind == 1:
            d.ellipse((x, horizon - h, x + w, horizon - h + w), fill=c)
        else:
            d.rectangle((x, horizon - h, x + w * 0.1 + 1, horizon + 2), fill=c)


def _draw_car(d: ImageDraw.ImageDraw, c: CarClass, rng: np.random.Generator, s: int, horizon: float) -> list:
    """Draw the car facing right; returns its bbox (x1, y1, x2, y2): every pixel drawn for the vehicle.

    The window pillars are drawn as bars up to 0.3·L above the belt line, so on every class they poke out
    above the roof; they are part of the drawn vehicle (their number is a class trait), so the box covers
    them, as it covers the wheel arches that reach a little below the tyres. Tested against the pixels.
    """
    j = lambda v, p=0.04: v * (1 + rng.uniform(-p, p))  # noqa: E731 — small within-class shape jitter
    L = s * rng.uniform(0.68, 0.9) * c.length / 1.15
    x0 = rng.uniform(0.02, 0.98) * (s - L)
    ground = horizon + rng.uniform(0.05, 0.3) * (s - horizon)
    r = j(c.wheel) * L
    clear = r * (1.25 if c.body == "SUV" else 0.85)
    sill = ground - clear
    belt = sill - j(0.17 if c.body in ("SUV", "Pickup") else 0.14) * L
    body = _colour(rng, (0.0, 1.0), (0.25, 0.95))
    dark = tuple(int(v * 0.55) for v in body)
    hood = belt + j(0.04) * L  # the nose sits a little lower than the belt
    lower = [
        (x0, sill), (x0, belt + 0.02 * L), (x0 + 0.02 * L, belt), (x0 + 0.72 * L, belt),
        (x0 + 0.97 * L, hood), (x0 + L, hood + 0.03 * L), (x0 + L, sill),
    ]  # fmt: skip
    cabin = [(x0 + fx * L, belt - j(fy) * L) for fx, fy in CABINS[c.body]]
    d.polygon(cabin, fill=body)
    d.polygon(lower, fill=body, outline=dark)
    # Windows: the cabin shrunk towards its centre, then cut by pillars.
    cx = sum(p[0] for p in cabin) / len(cabin)
    cy = sum(p[1] for p in cabin) / len(cabin)
    glass = tuple(int(v) for v in _colour(rng, (0.1, 0.4), (0.15, 0.45)))
    inner = [(cx + (x - cx) * 0.86, cy + (y - cy) * 0.80 + 0.01 * L) for x, y in cabin]
    d.polygon(inner, fill=glass)
    xs = [p[0] for p in inner]
    left, right = min(xs), max(xs)
    for k in range(1, c.windows):
        px = left + (right - left) * k / c.windows
        d.rectangle((px - 0.018 * L, belt - 0.3 * L, px + 0.018 * L, belt), fill=body)
    d.polygon(cabin, outline=dark)
    # Door lines, one per window on passenger cars.
    for k in range(c.windows if c.body != "Pickup" else 1):
        px = left + (right - left) * (k + 1) / c.windows if k < c.windows - 1 else right
        d.line((px, belt, px, sill - 0.02 * L), fill=dark, width=max(1, round(0.006 * L)))
    if c.body == "Pickup":
        d.line(
            (x0, belt + 0.015 * L, x0 + 0.42 * L, belt + 0.015 * L), fill=dark, width=max(1, round(0.01 * L))
        )
    if c.spoiler:
        top = min(p[1] for p in cabin[:2])
        d.rectangle((x0 + 0.01 * L, top - 0.035 * L, x0 + 0.09 * L, top - 0.015 * L), fill=dark)
    # Lights.
    hy, hx = hood + 0.015 * L, x0 + L
    if c.headlight == "round":
        d.ellipse((hx - 0.05 * L, hy - 0.025 * L, hx - 0.005 * L, hy + 0.02 * L), fill=(250, 250, 220))
    elif c.headlight == "rect":
        d.rectangle((hx - 0.06 * L, hy - 0.02 * L, hx - 0.005 * L, hy + 0.015 * L), fill=(250, 250, 220))
    else:
        d.rectangle((hx - 0.09 * L, hy - 0.008 * L, hx - 0.005 * L, hy + 0.006 * L), fill=(250, 250, 220))
    red = (200, 20, 20)
    if c.taillight == "tall":
        d.rectangle((x0, belt + 0.005 * L, x0 + 0.02 * L, belt + 0.07 * L), fill=red)
    else:
        d.rectangle((x0, belt + 0.01 * L, x0 + 0.06 * L, belt + 0.035 * L), fill=red)
    # Wheels: arches, tyres, rims, spokes.
    rear = x0 + (1 - j(c.wheelbase, 0.02)) / 2 * L
    axles = (rear, rear + j(c.wheelbase, 0.02) * L)
    for wx in axles:
        wy = ground - r
        d.ellipse((wx - r * 1.15, wy - r * 1.15, wx + r * 1.15, wy + r * 1.15), fill=dark)
        d.ellipse((wx - r, wy - r, wx + r, wy + r), fill=(25, 25, 25))
        rim = r * 0.6
        d.ellipse((wx - rim, wy - rim, wx + rim, wy + rim), fill=(170, 170, 175))
        phase = rng.uniform(0, 2 * np.pi)
        for k in range(c.spokes):
            a = phase + 2 * np.pi * k / c.spokes
            d.line(
                (wx, wy, wx + rim * np.cos(a), wy + rim * np.sin(a)),
                fill=(60, 60, 60),
                width=max(1, round(r / 6)),
            )
        d.ellipse((wx - rim * 0.25, wy - rim * 0.25, wx + rim * 0.25, wy + rim * 0.25), fill=(90, 90, 95))
    arch = r * 1.15
    top = min(min(p[1] for p in cabin), belt - 0.3 * L)  # the pillar bars reach belt - 0.3·L
    if c.spoiler:
        top = min(top, min(p[1] for p in cabin[:2]) - 0.035 * L)
    return [min(x0, axles[0] - arch), top, max(x0 + L, axles[1] + arch), ground - r + arch]


def render(c: CarClass, rng: np.random.Generator, size: int) -> tuple[Image.Image, tuple[float, ...]]:
    """One photo of class `c` (size×size RGB) and the car's bbox in its pixel coordinates."""
    s = size * 2  # draw at 2× and downsample: anti-aliasing for free
    img = Image.new("RGB", (s, s))
    d = ImageDraw.Draw(img)
    horizon = rng.uniform(0.35, 0.7) * s
    _background(d, rng, s, horizon)
    box = _draw_car(d, c, rng, s, horizon)
    if rng.random() < 0.2:  # a pole or bush in front of the car
        col = _colour(rng, (0.0, 0.6), (0.1, 0.8))
        x = rng.uniform(0, s)
        if rng.random() < 0.5:
            d.rectangle((x, rng.uniform(0.2, 0.6) * s, x + rng.uniform(0.01, 0.04) * s, s), fill=col)
        else:
            w = rng.uniform(0.08, 0.25) * s
            d.ellipse((x, s - w * 0.8, x + w, s + w * 0.2), fill=col)
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        box = [s - box[2], box[1], s - box[0], box[3]]
    img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.0, 0.8)))
    img = img.resize((size, size), Image.Resampling.LANCZOS)
    arr = np.asarray(img, dtype=np.float32)
    arr = arr * rng.uniform(0.8, 1.15) + rng.uniform(-20, 20)  # exposure
    arr += rng.normal(0, rng.uniform(2, 8), arr.shape)  # sensor noise
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    bbox = tuple(round(min(max(v / 2, 0), size), 1) for v in box)
    return img, bbox


def make_synthetic(
    out: str | Path,
    classes: int = 24,
    per_class: int = 40,
    size: int = 96,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write a prepared dataset (manifest.csv + images/ + summary.json) of synthetic cars."""
    t0 = time.perf_counter()
    if not 2 <= classes <= MAX_CLASSES:
        raise ValueError(f"classes {classes}: must be between 2 and {MAX_CLASSES}")
    if per_class < 3:
        raise ValueError(f"per_class {per_class}: need at least 3 (one each for train, val, test)")
    if size < 16:
        raise ValueError(f"size {size}: must be at least 16 pixels")
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError("val_fraction and test_fraction must be ≥ 0 and sum to less than 1")
    out = Path(out)
    check_out(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "images").mkdir(parents=True)
    try:
        cats = class_catalogue(classes)
        n_test = max(1, round(per_class * test_fraction)) if test_fraction > 0 else 0
        n_val = max(1, round(per_class * val_fraction)) if val_fraction > 0 else 0
        records = []
        for label, c in enumerate(cats):
            for i in range(per_class):
                rng = np.random.default_rng([seed, label, i])  # per photo: order-independent, reproducible
                img, bbox = render(c, rng, size)
                split = "test" if i < n_test else "val" if i < n_test + n_val else "train"
                rel = f"images/{split}/c{label:03d}_{i:04d}.jpg"
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                img.save(tmp / rel, "JPEG", quality=92)
                records.append(Record(rel, label, c.name, split, bbox, label + 1))
        write_manifest(tmp, records)
        counts = Counter(r.split for r in records)
        summary = {
            "created_by": "carspotter data synth",
            "source": "synthetic",
            "layout": "synthetic",
            "detected": "procedurally drawn side-view cars",
            "protocol": "classification",
            "options": {"classes": classes, "per_class": per_class, "size": size, "seed": seed,
                        "val_fraction": val_fraction, "test_fraction": test_fraction},
            "n_images": len(records),
            "n_classes": classes,
            "counts": {s: counts.get(s, 0) for s in SPLITS},
            "classes_per_split": {s: classes if counts.get(s) else 0 for s in SPLITS},
            "class_order": "source id",
            "n_with_bbox": len(records),
            "n_skipped": 0,
            "skipped_by_reason": {},
            "skipped": [],
            "notes": ["synthetic fine-grained cars: classes differ in shape details only (see traits)"],
            "per_class": [
                {"label": i, "class_name": c.name, "source_id": i + 1, "train": per_class - n_test - n_val,
                 "val": n_val, "test": n_test, "traits": asdict(c)}
                for i, c in enumerate(cats)
            ],
        }  # fmt: skip
        summary["wall_time_s"] = round(time.perf_counter() - t0, 2)
        write_summary(tmp, summary)
        swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary
