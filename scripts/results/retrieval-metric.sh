#!/usr/bin/env bash
# Retrieval on the Cars196 protocol with a METRIC-LEARNED embedding: preset strong-proxyanchor-efficientnet-lite0
# (512-d embedding, Proxy-Anchor loss, 30 classes × 4 photos per batch, 1 head-only warm-up epoch, BatchNorm
# frozen; preset 128 px, 60 epochs) trained on classes 1–98 (val = 10 % of their photos, best epoch by val R@1)
# at 128 px (resize 146, as the preset) for ${EPOCHS:-12} epochs; then the 99–196 test photos are indexed and every one queries the rest.
source "$(dirname "$0")/common.sh"
NAME="${NAME:-strong-proxyanchor}"   # e.g. NAME=strong-proxyanchor-16 EPOCHS=16
timed "$NAME" "$CS" train --preset strong-proxyanchor-efficientnet-lite0 --data "$RDATA" \
  --out "$RUNS/$NAME" "${LITE0[@]}" "${SIZE[@]}" --epochs "${EPOCHS:-12}" \
  --set "description=Proxy-Anchor metric learning on EfficientNet-Lite0 ImageNet weights, 512-d, classes 1-98, ${EPOCHS:-12} epochs (preset 60), 128 px" \
  "$@"
timed "$NAME" "$CS" index "$RUNS/$NAME" --data "$RDATA" --split test --metric cosine \
  --out "$RUNS/$NAME/index-test"
timed "$NAME" "$CS" evaluate "$RUNS/$NAME/index-test"
