"""Heat-maps on real photos: where does a trained run look on n test photos of a prepared dataset?

Without per-photo boxes (the cars-small copy has none), the check is the share of heat-map mass in the
central box that covers half of the photo's area (margins of 14.6 % on each side): Stanford Cars photos are
framed on the car. The baseline is a map spread evenly over the region the network saw (with centre-crop
preprocessing that region is itself central, so the baseline is above 0.5), and empty maps are counted.
Writes each overlay and one contact sheet (photos above their overlays) to --out for viewing.

    python benchmarks/explain_real.py RUN --data /work/prepared/cars-small --n 20 --out /tmp/why-real
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchutil import machine_line

from carspotter.data.images import open_rgb
from carspotter.data.manifest import read_manifest, split_records
from carspotter.explain.cam import box_area_share, cam_to_photo, mass_inside
from carspotter.explain.photo import PhotoExplainer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--split", default="test")
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--method", default="gradcam")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    if a.out.exists() and any(a.out.iterdir()):
        ap.error(f"--out {a.out}: exists and is not empty")
    a.out.mkdir(parents=True, exist_ok=True)
    print(machine_line())
    recs = split_records(read_manifest(a.data), a.split)
    pick = [recs[int(i)] for i in np.random.default_rng(a.seed).permutation(len(recs))[: a.n]]
    px = PhotoExplainer.from_run(a.run, None, method=a.method)
    m = (1 - math.sqrt(0.5)) / 2
    inside, uniform, empty, correct, tiles = [], [], [], [], []
    for r in pick:
        photo = open_rgb(a.data / r.path)
        (e,) = px.explain([photo])
        h, w = e.heat_photo.shape
        box = (m * w, m * h, (1 - m) * w, (1 - m) * h)
        inside.append(mass_inside(e.heat_photo, box))
        flat = cam_to_photo(np.ones_like(e.heat), photo.size, px.pre.resize_side, px.pre.crop_mode)
        uniform.append(mass_inside(flat, box))  # a map spread evenly over what the network saw
        correct.append(e.top[0]["class_id"] == r.label)
        empty.append(bool(e.heat.max() <= 0))
        e.overlay.save(a.out / f"{Path(r.path).stem}_overlay.png")
        tiles.append((photo, e.overlay))
        print(f"{r.path}: central-half mass {inside[-1]:.3f} (uniform over the crop {uniform[-1]:.3f}); "
              f"{'correct' if correct[-1] else 'wrong'}: {e.top[0]['class_name']}")  # fmt: skip
    tw, th = 160, 120
    cols = 5
    rows = math.ceil(len(tiles) / cols)
    sheet = Image.new("RGB", (cols * (tw + 4), rows * (2 * th + 10)), (255, 255, 255))
    for i, (p, o) in enumerate(tiles):
        x, y = (i % cols) * (tw + 4), (i // cols) * (2 * th + 10)
        sheet.paste(p.resize((tw, th)), (x, y))
        sheet.paste(o.resize((tw, th)), (x, y + th + 2))
    sheet.save(a.out / "contact_sheet.png")
    print(
        f"\n{len(pick)} {a.split} photos, {a.method}, layer {px.layer}: central-half heat-map mass "
        f"mean {statistics.mean(inside):.3f} ± {statistics.stdev(inside):.3f} (median {statistics.median(inside):.3f}; "
        f"a map uniform over the region the network saw: {statistics.mean(uniform):.3f}; uniform over the photo "
        f"{box_area_share((h, w), box):.3f}); above the crop-uniform value for "
        f"{sum(v > u for v, u in zip(inside, uniform, strict=True))}/{len(inside)} photos; empty maps {sum(empty)}; "
        f"top-1 correct {sum(correct)}/{len(correct)}; sheet {a.out / 'contact_sheet.png'}"
    )


if __name__ == "__main__":
    main()
