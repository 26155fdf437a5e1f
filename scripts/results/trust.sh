#!/usr/bin/env bash
# RESULTS.md "Answers people can trust": hierarchy accuracies, calibration before/after, the open-set protocol
# (train on classes 1–98, evaluate on a set whose test split holds held-out photos of 1–98 and every photo of
# 99–196), non-car rejection, and `predict` on real photos.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
T="${TRUST:-/tmp/i15}"
mkdir -p "$T/src"

# 1. make / model / body / year accuracy and ECE before/after (frozen Lite0, T1 recipe; train calibrates on val)
timed trust-t1 "$CS" train --preset seed-t1-resnet50-frozen --data "$DATA" "${LITE0[@]}" "${SIZE[@]}" --out "$T/t1" --no-progress
"$CS" calibrate "$T/t1"                      # the same fit, for a run trained before calibration existed
"$CS" evaluate "$T/t1" --device cpu          # → $T/t1/metrics.json
"$CS" predict "$T/t1" "$DATA/images/test/00017.jpg" "$DATA/images/test/00104.jpg" "$DATA/images/test/00115.jpg"

# 2. open set: the retrieval-protocol run (classes 1–98) against all 196 classes
timed trust-t1r "$CS" train --preset seed-t1-resnet50-frozen --data "$RDATA" "${LITE0[@]}" "${SIZE[@]}" --out "$T/t1r" --no-progress
"$CS" calibrate "$T/t1r"
# held-out known photos exist only in the run's val split (the protocol trains on every other photo of 1–98):
# they become this set's test split with every photo of classes 99–196; the other photos of 1–98 are "train".
"$REPO/.venv/bin/python" - "$RDATA" "$REPO/../shared/data/stanford-cars-small" "$T/src/open196r.csv" <<'PY'
import csv, sys
rdata, src, out = sys.argv[1:]
val = {r["path"].rsplit("/", 1)[1] for r in csv.DictReader(open(f"{rdata}/manifest.csv")) if r["split"] == "val"}
with open(out, "w", newline="") as f:
    w = csv.writer(f); w.writerow(["path", "class_id", "class_name", "split"])
    for r in csv.DictReader(open(f"{src}/labels.csv")):
        known = int(r["class_id"]) <= 98
        split = ("test" if r["fname"] in val else "train") if known else "test"
        w.writerow([f"{src}/images/{r['fname']}", r["class_id"], r["class_name"], split])
PY
"$CS" data prepare "$T/src/open196r.csv" --out "$T/open196r" --max-side 128 --val-fraction 0
"$CS" evaluate "$T/t1r" --data "$T/open196r" --split test --device cpu   # open_set_auroc, n_unknown
"$REPO/.venv/bin/python" "$REPO/scripts/openset_noncar.py" "$T/t1r" --n 50 --json "$T/noncar_t1r.json"
"$REPO/.venv/bin/python" "$REPO/scripts/openset_knn.py" "$T/t1r" --gallery "$RDATA" --data "$T/open196r" --json "$T/openset_knn_t1r.json"
