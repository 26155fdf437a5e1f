#!/usr/bin/env bash
# T1 — reference: ImageNet ResNet-50 as a fixed feature extractor, linear head only (Adam 1e-3, StepLR 7/0.1,
# 10 epochs, 224 px): 42.4 %. Here: EfficientNet-Lite0 ImageNet weights, 128 px, the preset's 10 epochs.
# Frozen + no augmentation: the engine computes the pooled features once and trains the head on them.
source "$(dirname "$0")/common.sh"
timed seed-t1 "$CS" train --preset seed-t1-resnet50-frozen --data "$DATA" --out "$RUNS/seed-t1" "${LITE0[@]}" \
  "${SIZE[@]}" \
  --set "description=T1 scaled - EfficientNet-Lite0 ImageNet weights (for ResNet-50) as a fixed feature extractor, linear head only, Adam 1e-3, StepLR 7/0.1, 10 epochs, 128 px" \
  "$@"
timed seed-t1 "$CS" evaluate "$RUNS/seed-t1" --split test
