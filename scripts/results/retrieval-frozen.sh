#!/usr/bin/env bash
# Retrieval on the Cars196 protocol (train classes 1–98, test classes 99–196: every test photo queries all the
# other test photos) with FROZEN ImageNet EfficientNet-Lite0 features (1280-d pooled, cosine), 128 px (resize 146, centre crop).
# Writes $RUNS/retrieval-frozen-lite0/{index.faiss,meta.csv,index.json,metrics.json}.
source "$(dirname "$0")/common.sh"
timed retrieval-frozen "$CS" index --backbone tf_efficientnet_lite0 --weights "$WEIGHTS" --img-size "${IMG:-128}" \
  --data "$RDATA" --split test --metric cosine --out "$RUNS/retrieval-frozen-lite0" "$@"
timed retrieval-frozen "$CS" evaluate "$RUNS/retrieval-frozen-lite0"
