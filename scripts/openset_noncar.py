"""How often does a run answer "unknown" for images that are not cars at all?

Generates non-car images (uniform and Gaussian noise, flat colours, smooth colour gradients, and the
toolkit's synthetic cartoon cars — drawn shapes, not photos), computes the run's open-set scores (msp and
energy, with the temperature and thresholds of its calibration.json) and prints the rejection rate per kind
and overall for each score; `--photos DIR` adds real photos for contrast. Every figure it prints goes in
RESULTS.md with its command.

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
    import torch

    from carspotter.data.images import open_rgb
    from carspotter.engine.batch_predict import expand_paths
    from carspotter.engine.calibration import SCORES, load_calibration
    from carspotter.models.loading import load_run

    cal = load_calibration(args.run)
    if cal.threshold is None:
        print(f"{args.run}: no calibration.json with an open-set threshold; run `carspotter calibrate` first")
        return 2
    model, _ = load_run(args.run)
    tf = model.preprocess.transform()
    result: dict[str, object] = {
        "run": str(args.run),
        "chosen_score": cal.open_set_score,
        "thresholds": cal.thresholds,
    }
    with tempfile.TemporaryDirectory() as tmp:
        kinds = make_noncars(Path(tmp), args.n)
        if args.photos:
            kinds["real_photos(known)"] = expand_paths([args.photos])[: args.max_photos]
        totals = {k: [0, 0] for k in SCORES}
        for kind, files in kinds.items():
            with torch.inference_mode():
                logits = torch.cat([model(torch.stack([tf(open_rgb(f)) for f in files[i : i + 32]])).float()
                                    for i in range(0, len(files), 32)])  # fmt: skip
            row: dict[str, object] = {"n": len(files)}
            for score in SCORES:
                s = cal.scores(logits, score).numpy()
                rej = int((s < cal.thresholds[score]).sum())
                row[score] = {"rejected": rej, "rate": rej / len(files), "median_score": float(np.median(s))}
                if not kind.startswith("real"):
                    totals[score][0] += rej
                    totals[score][1] += len(files)
            result[kind] = row
            print(f"{kind:<20} n={len(files):>4}  " + "  ".join(
                f"{k}: {row[k]['rejected']:>4} rejected ({100 * row[k]['rate']:.1f} %)" for k in SCORES))  # type: ignore[index]  # fmt: skip
        for score, (rej, n) in totals.items():
            result[f"non_car_rejection_rate_{score}"] = rej / n
            mark = " (the run's chosen score)" if score == cal.open_set_score else ""
            print(f"non-car images, {score}: {rej}/{n} rejected ({100 * rej / n:.1f} %), "
                  f"threshold {cal.thresholds[score]:.4f}{mark}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
