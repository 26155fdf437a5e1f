#!/usr/bin/env bash
# Open catalogue (RESULTS.md "Open catalogue"): few-shot accuracy on the unseen classes 99–196 (frozen Lite0 and the
# Proxy-Anchor embedding trained on 1–98), and enrolling 10 unseen classes into a gallery of the trained classes.
# PA=run dir of a Proxy-Anchor run on classes 1–98 (scripts/results/retrieval-metric.sh, or EPOCHS=4 below).
source "$(dirname "$0")/common.sh"
PA="${PA:-$RUNS/strong-proxyanchor-4}"
if [ ! -f "$PA/best.safetensors" ]; then
  timed strong-proxyanchor-4 "$CS" train --preset strong-proxyanchor-efficientnet-lite0 --data "$RDATA" \
    "${LITE0[@]}" "${SIZE[@]}" --epochs 4 --out "$PA"
fi
timed fewshot-frozen "$CS" fewshot "${LITE0[@]}" "${SIZE[@]}" --data "$RDATA" --split test \
  --shots 1,2,5,10 --episodes 20 --out "$RUNS/fewshot-frozen.json"
timed fewshot-pa "$CS" fewshot "$PA" --data "$RDATA" --split test \
  --shots 1,2,5,10 --episodes 20 --out "$RUNS/fewshot-pa.json"
timed open-catalogue "$REPO/.venv/bin/python" "$REPO/scripts/open_catalogue_real.py" "$PA" --data "$RDATA" \
  --gallery-split val --classes 10 --shots 5 --work "$RUNS/open-catalogue" --out "$RUNS/open-catalogue.json"
