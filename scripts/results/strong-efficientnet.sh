#!/usr/bin/env bash
# The strong recipe (strong-resnet50-448: SGD Nesterov, cosine with warm-up, label smoothing 0.1, crop + flip, best
# by val) on the backbone that runs here: preset strong-efficientnet-lite0-finetune, at T2's budget
# (128 px, 10 epochs) so the two recipes compare like for like.
source "$(dirname "$0")/common.sh"
timed strong-efficientnet "$CS" train --preset strong-efficientnet-lite0-finetune --data "$DATA" \
  --out "$RUNS/strong-efficientnet" "${LITE0[@]}" --img-size 128 --epochs "${EPOCHS:-10}" \
  --set "description=Strong recipe on EfficientNet-Lite0 ImageNet weights - full fine-tune, crop + flip, SGD Nesterov 0.05, cosine with 1 warm-up epoch, label smoothing 0.1, 10 epochs, 128 px (T2's budget)" "$@"
timed strong-efficientnet "$CS" evaluate "$RUNS/strong-efficientnet" --split test
