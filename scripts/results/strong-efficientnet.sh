#!/usr/bin/env bash
# The strong recipe on the backbone that runs here: preset strong-efficientnet-lite0-finetune (the project's CPU
# adaptation of strong-resnet50-448: every layer trained, crop + flip, AdamW 1e-3 wd 0.05, cosine, label smoothing
# 0.1, dropout 0.2, best by val; 128 px, 10 epochs) at T2's budget, so the two recipes compare like for like.
# Extra arguments go to `train`; RESULTS.md's rows:
#   NAME=strong-efficientnet-all scripts/results/strong-efficientnet.sh                     (the preset as shipped)
#   scripts/results/strong-efficientnet.sh --set 'model.unfreeze_schedule={0: 4}' --set model.backbone_lr_mult=0.3
#   NAME=strong-efficientnet-192 IMG=192 scripts/results/strong-efficientnet.sh --set … (the same two --set)
source "$(dirname "$0")/common.sh"
NAME="${NAME:-strong-efficientnet}"
timed "$NAME" "$CS" train --preset strong-efficientnet-lite0-finetune --data "$DATA" \
  --out "$RUNS/$NAME" "${LITE0[@]}" "${SIZE[@]}" --epochs 10 \
  --set "description=Strong recipe (strong-efficientnet-lite0-finetune) on EfficientNet-Lite0 ImageNet weights, 10 epochs, ${IMG:-128} px${DESC:+ - $DESC}" \
  "$@"
timed "$NAME" "$CS" evaluate "$RUNS/$NAME" --split test
