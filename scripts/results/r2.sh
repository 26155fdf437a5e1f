#!/usr/bin/env bash
# R2 (reference: kNN k=10, Euclidean, on the T2 network; 76.8 %): as r1.sh with k=10. Needs t2.sh first.
source "$(dirname "$0")/common.sh"
timed seed-r2 "$CS" evaluate "$RUNS/seed-t2" --knn --k 10 --metric euclidean --split test "$@"
