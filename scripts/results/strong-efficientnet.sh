#!/usr/bin/env bash
# The strong recipe on the backbone that runs here: preset strong-efficientnet-lite0-finetune (the project's CPU
# adaptation of strong-resnet50-448: crop + flip, AdamW 1e-3 wd 0.05 with backbone lr ×0.3, cosine, label
# smoothing 0.1, dropout 0.2, the last 4 of 8 stages + head trained, best by val; preset 192 px, 10 epochs) at
# T2's budget: 128 px, 10 epochs, so the two recipes compare like for like (it costs less CPU than T2: the early
# high-resolution stages get no backward pass).
source "$(dirname "$0")/common.sh"
NAME="${NAME:-strong-efficientnet}"   # NAME=strong-efficientnet-192 IMG=192: the preset's own size
timed "$NAME" "$CS" train --preset strong-efficientnet-lite0-finetune --data "$DATA" \
  --out "$RUNS/$NAME" "${LITE0[@]}" "${SIZE[@]}" --epochs 10 \
  --set "description=Strong recipe on EfficientNet-Lite0 ImageNet weights - last 4 stages + head, crop + flip, AdamW 1e-3 (backbone x0.3) wd 0.05, cosine, label smoothing 0.1, dropout 0.2, 10 epochs, ${IMG:-128} px (preset 192 px)" \
  "$@"
timed "$NAME" "$CS" evaluate "$RUNS/$NAME" --split test
