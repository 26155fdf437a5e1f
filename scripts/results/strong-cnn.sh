#!/usr/bin/env bash
# strong-cnn-scratch (wider 5-block CNN + BatchNorm, RandomResizedCrop/flip/jitter/erasing, AdamW cosine with
# warm-up, label smoothing 0.1, EMA; preset 224 px, 150 epochs) at S3's schedule: the preset's recipe for ${EPOCHS:-40}
# epochs (S3: 40) at IMG px (RESULTS.md: IMG=64, as S1–S3). About 4x S3's conv FLOPs per photo.
# Scaled with the run: 1 warm-up epoch (preset 5 of 150) and EMA decay 0.99 (preset 0.999 averages over
# ~1,000 steps, half of a 40-epoch run's ~2,270 steps on cars-small, so the EMA weights would still carry ~10 % of
# the random init at the end).
source "$(dirname "$0")/common.sh"
timed strong-cnn "$CS" train --preset strong-cnn-scratch --data "$DATA" --out "$RUNS/strong-cnn" "${SIZE[@]}" \
  --epochs "${EPOCHS:-40}" --set schedule.warmup_epochs=1 --set train.ema_decay=0.99 \
  --set "description=Strong from-scratch recipe - 5-block CNN with BatchNorm, RRC/flip/jitter/erasing, AdamW cosine, label smoothing, EMA 0.99, ${EPOCHS:-40} epochs (preset 150), ${IMG:-128} px (preset 224)" \
  "$@"
timed strong-cnn "$CS" evaluate "$RUNS/strong-cnn" --split test
