#!/usr/bin/env bash
# CPU time (user+sys, /usr/bin/time) of two training epochs of T2 and of the strong preset, one torch thread each,
# one after the other in the order T2, strong, T2, strong (RESULTS.md "The strong preset on CPU").
# Results: $RUNS/cpu-<preset>.time (one JSON line per run).
source "$(dirname "$0")/common.sh"
for p in seed-t2-resnet50-finetune strong-efficientnet-lite0-finetune seed-t2-resnet50-finetune strong-efficientnet-lite0-finetune; do
  timed "cpu-$p" "$CS" train --preset "$p" --data "$DATA" "${LITE0[@]}" --img-size 128 --epochs 2 \
    --out "$RUNS/cpu-$p" --overwrite --no-progress
done
