#!/usr/bin/env bash
# S1 — the reference's from-scratch CNN (seed-s1-cnn-basic: Adam 1e-3, constant LR, 40 epochs, 224 px) scaled to this
# machine: 128 px (IMG=64 in RESULTS.md), the preset's 40 epochs by default; everything else as the preset. Best epoch by val accuracy.
source "$(dirname "$0")/common.sh"
timed seed-s1 "$CS" train --preset seed-s1-cnn-basic --data "$DATA" --out "$RUNS/seed-s1" "${SIZE[@]}" --epochs "${EPOCHS:-40}" \
  --set "description=S1 scaled - from-scratch CNN, 3 conv blocks, no BatchNorm, no augmentation, Adam 1e-3, ${EPOCHS:-40} epochs (preset 40), ${IMG:-128} px (preset 224)" \
  "$@"
timed seed-s1 "$CS" evaluate "$RUNS/seed-s1" --split test
