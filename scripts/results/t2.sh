#!/usr/bin/env bash
# T2 — reference: ImageNet ResNet-50 fully fine-tuned, crop/flip/rotation 15°, dropout 0.5, Adam 1e-3,
# StepLR 7/0.1, 10 epochs, 224 px: 73.8 %. Here: EfficientNet-Lite0 ImageNet weights, 128 px, the preset's
# own 10 epochs and schedule.
source "$(dirname "$0")/common.sh"
timed seed-t2 "$CS" train --preset seed-t2-resnet50-finetune --data "$DATA" --out "$RUNS/seed-t2" "${LITE0[@]}" \
  "${SIZE[@]}" \
  --set "description=T2 scaled - EfficientNet-Lite0 ImageNet weights (for ResNet-50) fully fine-tuned, crop/flip/rotation, dropout 0.5, Adam 1e-3, StepLR 7/0.1, 10 epochs, 128 px" \
  "$@"
timed seed-t2 "$CS" evaluate "$RUNS/seed-t2" --split test
