#!/usr/bin/env bash
# R3 (reference: kNN k=7, cosine, on the progressively unfrozen T3 DenseNet-121; 73.4 %): kNN k=7 cosine on the
# EfficientNet-Lite0 T3 run's pooled features. Needs t3.sh first. Writes $RUNS/seed-t3/metrics_knn7_cosine.json.
source "$(dirname "$0")/common.sh"
timed seed-r3 "$CS" evaluate "$RUNS/seed-t3" --knn --k 7 --metric cosine --split test "$@"
