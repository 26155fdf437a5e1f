#!/usr/bin/env bash
# S3 — the reference's from-scratch CNN (seed-s3-cnn-aug: Adam 1e-3, constant LR, 40 epochs, 224 px) scaled to this
# machine: 128 px (IMG=64 in RESULTS.md), the preset's 40 epochs by default; everything else as the preset. Best epoch by val accuracy.
source "$(dirname "$0")/common.sh"
timed seed-s3 "$CS" train --preset seed-s3-cnn-aug --data "$DATA" --out "$RUNS/seed-s3" "${SIZE[@]}" --epochs "${EPOCHS:-40}" \
  --set "description=S3 scaled - the S2 network with crop/flip/colour-jitter augmentation, Adam 1e-3, ${EPOCHS:-40} epochs (preset 40), ${IMG:-128} px (preset 224)" \
  "$@"
timed seed-s3 "$CS" evaluate "$RUNS/seed-s3" --split test
