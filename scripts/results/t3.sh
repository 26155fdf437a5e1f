#!/usr/bin/env bash
# T3 — reference: ImageNet DenseNet-121, progressive unfreezing (head → +dense block 4 + final norm → +block 3
# → all), Adam 1e-3, StepLR 7/0.1, 10 epochs, 224 px: 71.7 %. Here: EfficientNet-Lite0 ImageNet weights,
# 128 px, the preset's 10 epochs and schedule {0: 0, 3: 2, 5: 3, 7: all}. It counts trailing parameter groups;
# Lite0 has 8 (stem, blocks 0–6, the head conv in the last), so: head only in epochs 1–3, + blocks 5–6 in
# epochs 4–5, + block 4 in epochs 6–7, everything in epochs 8–10.
source "$(dirname "$0")/common.sh"
timed seed-t3 "$CS" train --preset seed-t3-densenet121-progressive --data "$DATA" --out "$RUNS/seed-t3" \
  "${LITE0[@]}" "${SIZE[@]}" \
  --set "description=T3 scaled - EfficientNet-Lite0 ImageNet weights (for DenseNet-121), progressive unfreezing (head, +2 groups at epoch 4, +3 at 6, all at 8), Adam 1e-3, StepLR 7/0.1, 10 epochs, 128 px" \
  "$@"
timed seed-t3 "$CS" evaluate "$RUNS/seed-t3" --split test
