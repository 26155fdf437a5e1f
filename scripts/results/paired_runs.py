"""Two runs scored on the same photos: accuracy of each, McNemar's exact p and a paired bootstrap 95 % interval.

Usage: .venv/bin/python scripts/results/paired_runs.py RUN_A RUN_B [--split test]
Reads RUN/predictions_<split>.csv of each (written by `carspotter evaluate RUN --split SPLIT`), pairs the rows by
photo path, and prints one JSON object. Used for "strong scratch vs S3" in RESULTS.md.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np

from carspotter.explain.zoom import mcnemar, paired_bootstrap


def correct_by_path(run: Path, split: str) -> dict[str, bool]:
    p = run / f"predictions_{split}.csv"
    if not p.is_file():
        raise SystemExit(f"{p}: not found; run `carspotter evaluate {run} --split {split}` first")
    with p.open(newline="") as f:
        return {r["path"]: r["label"] == r["pred"] for r in csv.DictReader(f)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_a", type=Path)
    ap.add_argument("run_b", type=Path)
    ap.add_argument("--split", default="test")
    args = ap.parse_args()
    a, b = correct_by_path(args.run_a, args.split), correct_by_path(args.run_b, args.split)
    if a.keys() != b.keys():
        raise SystemExit(
            f"the two runs scored different photos ({len(a)} vs {len(b)}); same --split and data?"
        )
    paths = sorted(a)
    ok_a = np.array([a[p] for p in paths])
    ok_b = np.array([b[p] for p in paths])
    m = mcnemar(ok_a, ok_b)
    lo, hi = paired_bootstrap(ok_a, ok_b)
    out = {
        "n": len(paths),
        "accuracy_a": float(ok_a.mean()),
        "accuracy_b": float(ok_b.mean()),
        "b_minus_a_pt": 100 * float(ok_b.mean() - ok_a.mean()),
        "b_minus_a_ci95_pt": [100 * lo, 100 * hi],
        "only_a_right": m["only_first_right"],
        "only_b_right": m["only_zoom_right"],
        "mcnemar_p": m["mcnemar_p"],
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
