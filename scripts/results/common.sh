#!/usr/bin/env bash
# Shared settings for the scripts that reproduce every row of RESULTS.md (sourced, not run).
# Override any of these from the environment, e.g. `RUNS=/tmp/runs scripts/results/t1.sh`.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CS="${CS:-$REPO/.venv/bin/carspotter}"
DATA="${DATA:-/work/prepared/cars-small}"                      # classification protocol (train/val/test)
RDATA="${RDATA:-/work/prepared/cars-small-retrieval}"          # Cars196 protocol: classes 1–98 / 99–196
RUNS="${RUNS:-/work/runs/cars-small}"
WEIGHTS="${WEIGHTS:-$REPO/../shared/weights/tf_efficientnet_lite0.in1k.safetensors}"
# The ImageNet backbone that runs here offline (stands in for the reference's ResNet-50 / DenseNet-121).
LITE0=(--backbone tf_efficientnet_lite0 --weights "$WEIGHTS")
# 128 px: the photos are 128×96; the evaluation transform resizes the shorter side to 146 and centre-crops
# 128×128 (the usual 0.875 ratio), training crops randomly where the preset says so. IMG=96 halves the cost.
SIZE=(--img-size "${IMG:-128}")
# One intra-op thread per run. On a 2-core machine that other processes keep busy, two OpenMP threads spend
# most of their time waiting for each other: measured 1.5–9.5 img/s (41–268 CPU-ms per image) for an
# EfficientNet-Lite0 training step at 96 px with 2 threads against 19–24 img/s (16–17 CPU-ms) with 1.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
mkdir -p "$RUNS"

# timed NAME CMD...: run CMD, append wall and CPU seconds (user+sys of CMD and its children) to $RUNS/NAME.time
timed() {
  local name="$1"; shift
  /usr/bin/time -f "{\"cmd\": \"$name\", \"wall_s\": %e, \"user_s\": %U, \"sys_s\": %S, \"max_rss_kb\": %M}" \
    -a -o "$RUNS/$name.time" "$@"
}
