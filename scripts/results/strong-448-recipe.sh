#!/usr/bin/env bash
# Extra row: the strong-resnet50-448 recipe itself, verbatim except for what the machine forces — full fine-tune,
# crop + flip, SGD Nesterov lr 0.01 @ batch 64, wd 5e-4, cosine, label smoothing 0.1, best by val — on
# EfficientNet-Lite0 ImageNet weights at T2's budget: 128 px (preset 448, resize 512 → the default 146),
# 10 epochs (preset 100) with 1 warm-up epoch (preset 5).
source "$(dirname "$0")/common.sh"
timed strong-448-recipe "$CS" train --preset strong-resnet50-448 --data "$DATA" --out "$RUNS/strong-448-recipe" \
  "${LITE0[@]}" "${SIZE[@]}" --epochs 10 --set data.resize_size=null --set schedule.warmup_epochs=1 \
  --set "name=strong-resnet50-448-recipe-on-lite0" \
  --set "description=strong-resnet50-448 recipe on EfficientNet-Lite0 ImageNet weights - full fine-tune, crop + flip, SGD Nesterov 0.01 wd 5e-4, cosine with 1 warm-up epoch, label smoothing 0.1, 10 epochs (preset 100), 128 px (preset 448)" \
  "$@"
timed strong-448-recipe "$CS" evaluate "$RUNS/strong-448-recipe" --split test
