#!/usr/bin/env bash
# strong-cnn-scratch (wider 5-block CNN + BatchNorm, RandomResizedCrop/flip/jitter/erasing, AdamW cosine with
# warm-up, label smoothing 0.1, EMA; preset 224 px, 150 epochs) at about S3's CPU budget: 128 px, ${EPOCHS:-12} epochs.
# Scaled with the run: 1 warm-up epoch (preset 5 of 150) and EMA decay 0.99 (preset 0.999 averages over
# ~1,000 steps, more than this whole run's ~680 steps, so the EMA weights would still be mostly the random init).
source "$(dirname "$0")/common.sh"
timed strong-cnn "$CS" train --preset strong-cnn-scratch --data "$DATA" --out "$RUNS/strong-cnn" "${SIZE[@]}" \
  --epochs "${EPOCHS:-12}" --set schedule.warmup_epochs=1 --set train.ema_decay=0.99 \
  --set "description=Strong from-scratch recipe - 5-block CNN with BatchNorm, RRC/flip/jitter/erasing, AdamW cosine, label smoothing, EMA 0.99, ${EPOCHS:-12} epochs (preset 150), ${IMG:-128} px (preset 224)" \
  "$@"
timed strong-cnn "$CS" evaluate "$RUNS/strong-cnn" --split test
