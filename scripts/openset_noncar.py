"""How often does a run answer "unknown" for photos that are not cars at all?

Generates non-car images (uniform and Gaussian noise, flat colours, smooth colour gradients, and the
toolkit's synthetic cartoon cars — shapes, not photos) and runs them through `predict` with the run's
calibration; prints the rejection rate per kind and overall, and optionally the same for real photos
(the known-class acceptance rate, for contrast). Every figure it prints goes in RESULTS.md with its command.

    python scripts/openset_noncar.py RUN [--n 100] [--photos DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image


def make_noncars(folder: Path, n: int, size: int = 128, seed: int = 0) -> dict[str, list[Path]]:
    from carspotter.data.synth import class_catalogue, render

    rng = np.random.default_rng(seed)
    kinds: dict[str, list[Path]] = {}

    def save(kind: str, i: int, arr: np.ndarray | Image.Image) -> None:
        img = arr if isinstance(arr, Image.Image) else Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
        p = folder / kind / f"{i:04d}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        img.save(p)
        kinds.setdefault(kind, []).append(p)

    h, w = size * 3 // 4, size
    cat = class_catalogue(24)
    for i in range(n):
        save("uniform_noise", i, rng.uniform(0, 255, (h, w, 3)))
        save("gaussian_noise", i, rng.normal(128, 50, (h, w, 3)))
        save("flat_colour", i, np.broadcast_to(rng.uniform(0, 255, 3), (h, w, 3)).copy())
        a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        t = np.linspace(0, 1, w)[None, :, None]
        save("gradient", i, np.broadcast_to(a * (1 - t) + b * t, (h, w, 3)).copy())
        save("synthetic_shapes", i, render(cat[i % len(cat)], rng, size)[0])
    return kinds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--n", type=int, default=100, help="images per kind")
    ap.add_argument("--photos", type=Path, help="a folder of real car photos of known classes, for contrast")
    ap.add_argument("--max-photos", type=int, default=300)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    from carspotter.engine.batch_predict import expand_paths, predict_files
    from carspotter.engine.calibration import load_calibration

    cal = load_calibration(args.run)
    if cal.threshold is None:
        print(f"{args.run}: no calibration.json with an open-set threshold; run `carspotter calibrate` first")
        return 2
    result: dict[str, object] = {
        "run": str(args.run),
        "score": cal.open_set_score,
        "threshold": cal.threshold,
    }
    with tempfile.TemporaryDirectory() as tmp:
        kinds = make_noncars(Path(tmp), args.n)
        if args.photos:
            kinds["real_photos(known)"] = expand_paths([args.photos])[: args.max_photos]
        total_rej = total = 0
        for kind, files in kinds.items():
            rows = predict_files(args.run, files)
            rej = sum(1 for r in rows if r.get("unknown"))
            scores = [r["open_set"]["score"] for r in rows if not r.get("error")]
            result[kind] = {
                "n": len(rows),
                "rejected": rej,
                "rate": rej / len(rows),
                "median_score": float(np.median(scores)),
            }
            print(f"{kind:<20} n={len(rows):>4}  answered 'unknown': {rej:>4} ({100 * rej / len(rows):.1f} %)  "
                  f"median score {np.median(scores):.4f}")  # fmt: skip
            if not kind.startswith("real"):
                total_rej, total = total_rej + rej, total + len(rows)
        result["non_car_rejection_rate"] = total_rej / total
        print(f"non-car images: {total_rej}/{total} rejected ({100 * total_rej / total:.1f} %), "
              f"{cal.open_set_score} threshold {cal.threshold:.4f}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
