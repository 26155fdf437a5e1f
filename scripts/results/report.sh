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
# The retrieval grids are mosaics of Stanford Cars photos (non-commercial research use, kept in ../shared, never in
# the repository): the copy in docs/ keeps tables, curves and the confusion matrix and points at the full report.
sed -E 's#^!\[(Retrieval examples from [^]]*)\]\(retrieval_[^)]*\.png\)#*(\1: a mosaic of Stanford Cars photos, in the full report at `$RUNS/report/report.html`, not copied into the repository)*#' \
  "$RUNS/report/report.md" > "$dest/report.md"
find "$RUNS/report" -maxdepth 1 -name '*.png' ! -name 'retrieval_*' -exec cp {} "$dest/" \;
du -sh "$dest"
