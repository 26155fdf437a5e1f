#!/usr/bin/env bash
# Check against ../shared's reference figure "kNN k=1 (cosine) on the test split: 12.2 %": frozen ImageNet
# EfficientNet-Lite0 features at 128 px, gallery = every labelled train photo (train + val), queries = test.
# No training run: the gallery index is built from the bare backbone.
source "$(dirname "$0")/common.sh"
timed knn-frozen "$CS" index --backbone tf_efficientnet_lite0 --weights "$WEIGHTS" --img-size "${IMG:-128}" \
  --data "$DATA" --split train+val --metric cosine --out "$RUNS/knn-frozen-lite0" "$@"
timed knn-frozen "$CS" evaluate "$RUNS/knn-frozen-lite0" --knn --k 1 --data "$DATA" --split test
