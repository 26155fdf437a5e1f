#!/usr/bin/env bash
# T3 (reference: ImageNet DenseNet-121, progressive unfreezing head → +block 4 → +block 3 → all, 10 epochs; 71.7 %)
# → EfficientNet-Lite0 ImageNet weights, 128 px, 10 epochs. The preset's schedule {0: 0, 3: 2, 5: 3, 7: all}
# counts trailing parameter groups; on Lite0 (8 groups: stem, blocks 0–6 with the head conv in the last) that is
# head only → + blocks 5–6 → + block 4 → all.
source "$(dirname "$0")/common.sh"
timed seed-t3 "$CS" train --preset seed-t3-densenet121-progressive --data "$DATA" --out "$RUNS/seed-t3" \
  "${LITE0[@]}" --img-size 128 --epochs "${EPOCHS:-10}" \
  --set "description=T3 scaled - EfficientNet-Lite0 ImageNet weights (standing in for DenseNet-121), progressive unfreezing head then +2, +3 trailing stages then all, Adam 1e-3, StepLR 7/0.1, 10 epochs, 128 px" "$@"
timed seed-t3 "$CS" evaluate "$RUNS/seed-t3" --split test
