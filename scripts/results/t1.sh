#!/usr/bin/env bash
# T1 (reference: ImageNet ResNet-50, frozen backbone, linear head; 42.4 %) → EfficientNet-Lite0, 128 px.
# Frozen + no augmentation: the engine caches pooled features once, so the preset's 10 epochs cost seconds.
source "$(dirname "$0")/common.sh"
timed seed-t1 "$CS" train --preset seed-t1-resnet50-frozen --data "$DATA" --out "$RUNS/seed-t1" "${LITE0[@]}" \
  --img-size 128 --no-progress \
  --set "description=T1 scaled - EfficientNet-Lite0 ImageNet weights (standing in for ResNet-50) as a fixed feature extractor, linear head only, Adam 1e-3, StepLR 7/0.1, 10 epochs, 128 px" "$@"
timed seed-t1 "$CS" evaluate "$RUNS/seed-t1" --split test
