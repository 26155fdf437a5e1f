#!/usr/bin/env bash
# The `carspotter report` of every run in RESULTS.md → $RUNS/report/, then report.md + its PNGs copied into
# docs/results-report/ (the HTML, with the images inlined, stays outside the repository).
source "$(dirname "$0")/common.sh"
runs=()
for d in seed-t1 seed-t2 seed-t3 strong-efficientnet strong-efficientnet-192 strong-448-recipe seed-s1 seed-s2 seed-s3 strong-efficientnet-all strong-cnn strong-proxyanchor strong-proxyanchor-16; do
  [ -f "$RUNS/$d/config.yaml" ] && runs+=("$RUNS/$d")
done
idx=()
for d in retrieval-frozen-lite0 strong-proxyanchor/index-test strong-proxyanchor-16/index-test; do
  [ -f "$RUNS/$d/index.json" ] && idx+=(--index "$RUNS/$d")
done
"$CS" report "${runs[@]}" "${idx[@]}" --out "$RUNS/report" --overwrite
dest="$REPO/docs/results-report"
rm -rf "$dest" && mkdir -p "$dest"
cp "$RUNS/report/report.md" "$dest/"
find "$RUNS/report" -maxdepth 1 -name '*.png' -exec cp {} "$dest/" \;
du -sh "$dest"
