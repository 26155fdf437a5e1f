#!/usr/bin/env bash
# RESULTS.md "Find the car, then look again": the CAM box, the second look (--zoom) and framing robustness.
#   EPOCHS=5 scripts/results/find-the-car.sh     (the figures in RESULTS.md used the run's epoch-1 weights:
#   the shared 2-core machine ran a training step in 13-28 s that evening; see RESULTS.md)
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
PY="${PY:-$REPO/.venv/bin/python}"
STRONG="$RUNS/strong-efficientnet-lite0-zoom"
SYNTH="${SYNTH:-$RUNS/../synth128}"
SYNTHRUN="$RUNS/../synth128-lite0"
# 1. cars-small: the strong fine-tune recipe, then one look vs the second look on val (choose) and test (report)
[ -f "$STRONG/best.safetensors" ] || timed strong-zoom "$CS" train --preset strong-efficientnet-lite0-finetune \
  --data "$DATA" "${LITE0[@]}" --epochs "${EPOCHS:-5}" --no-progress --out "$STRONG"
# (the val runs write metrics_zoom_val.json with every way to combine, in combine_alternatives; copy the run
#  directory per margin to keep each file)
for m in 0.0 0.15 0.3 0.6; do
  "$CS" evaluate "$STRONG" --zoom --zoom-combine mean --zoom-margin "$m" --split val --device cpu
done
"$CS" evaluate "$STRONG" --zoom --zoom-combine mean --zoom-margin 0.15 --device cpu
# 2. framing: tight crops and wide frames of a seeded 400-photo test subset, one look vs --zoom
"$PY" "$REPO/benchmarks/framing.py" --run "$STRONG" --limit 400 --margin 0.15
# 3. synthetic cars with known boxes: CorLoc / mean IoU of the CAM box vs the centre box and the whole photo
[ -d "$SYNTH" ] || "$CS" data synth --out "$SYNTH" --size 128 --per-class 50
[ -f "$SYNTHRUN/best.safetensors" ] || "$CS" train --preset strong-efficientnet-lite0-finetune --data "$SYNTH" \
  "${LITE0[@]}" --epochs 8 --no-progress --out "$SYNTHRUN"
"$PY" "$REPO/benchmarks/localisation.py" --run "$SYNTHRUN" --data "$SYNTH"
