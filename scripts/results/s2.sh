#!/usr/bin/env bash
# S2 — the reference's from-scratch CNN (seed-s2-cnn-bn-dropout: Adam 1e-3, constant LR, 40 epochs, 224 px) scaled to this
# machine: 128 px (IMG=64 in RESULTS.md), the preset's 40 epochs by default; everything else as the preset. Best epoch by val accuracy.
source "$(dirname "$0")/common.sh"
timed seed-s2 "$CS" train --preset seed-s2-cnn-bn-dropout --data "$DATA" --out "$RUNS/seed-s2" "${SIZE[@]}" --epochs "${EPOCHS:-40}" \
  --set "description=S2 scaled - from-scratch CNN, 4 conv blocks with BatchNorm + dropout 0.5, no augmentation, Adam 1e-3, ${EPOCHS:-40} epochs (preset 40), ${IMG:-128} px (preset 224)" \
  "$@"
timed seed-s2 "$CS" evaluate "$RUNS/seed-s2" --split test
