#!/usr/bin/env bash
# R1 (reference: kNN k=3, Euclidean, on the fine-tuned T2 ResNet-50's pooled features; 74.9 %): kNN on the
# EfficientNet-Lite0 T2 run's 1280-d pooled features; gallery = the 3,631 train photos, queries = the test split.
# Needs t2.sh first. Writes $RUNS/seed-t2/metrics_knn3_euclidean.json.
source "$(dirname "$0")/common.sh"
timed seed-r1 "$CS" evaluate "$RUNS/seed-t2" --knn --k 3 --metric euclidean --split test "$@"
