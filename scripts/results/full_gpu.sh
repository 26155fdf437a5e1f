#!/usr/bin/env bash
# The same tables on the FULL Stanford Cars (8,144 train / 8,041 test photos, full resolution) with the presets'
# own settings (ResNet-50 / DenseNet-121 ImageNet weights downloaded by timm, 224 px or 448 px, 10–150 epochs).
# NOT RUN HERE (no GPU, no download): meant for a GPU machine. Usage:
#   SRC=/path/to/stanford_cars   (the devkit layout: cars_train/, cars_test/, devkit/ with the .mat files)
#   OUT=runs/full scripts/results/full_gpu.sh
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CS="${CS:-$REPO/.venv/bin/carspotter}"
SRC="${SRC:?set SRC to the full Stanford Cars folder}"
OUT="${OUT:-runs/full}"
FULL="$OUT/prepared-full"; RFULL="$OUT/prepared-full-retrieval"
[ -d "$FULL" ] || "$CS" data prepare "$SRC" --out "$FULL" --max-side 512
[ -d "$RFULL" ] || "$CS" data prepare "$SRC" --out "$RFULL" --max-side 512 --protocol retrieval
for p in seed-t1-resnet50-frozen seed-t2-resnet50-finetune seed-t3-densenet121-progressive \
         seed-s1-cnn-basic seed-s2-cnn-bn-dropout seed-s3-cnn-aug strong-resnet50-448 strong-cnn-scratch; do
  [ -f "$OUT/$p/metrics.json" ] && continue
  "$CS" train --preset "$p" --data "$FULL" --out "$OUT/$p" --device cuda --num-workers 8 --resume
  "$CS" evaluate "$OUT/$p" --split test --device cuda
done
# R1–R3: kNN on the fine-tuned T2 / T3 networks (train photos as gallery, test photos as queries).
"$CS" evaluate "$OUT/seed-t2-resnet50-finetune" --knn --k 3 --metric euclidean --device cuda
"$CS" evaluate "$OUT/seed-t2-resnet50-finetune" --knn --k 10 --metric euclidean --device cuda
"$CS" evaluate "$OUT/seed-t3-densenet121-progressive" --knn --k 7 --metric cosine --device cuda
# Retrieval, Cars196 protocol: frozen ImageNet ResNet-50 and Proxy-Anchor metric learning.
"$CS" index --backbone resnet50 --img-size 224 --data "$RFULL" --split test --metric cosine \
  --out "$OUT/retrieval-frozen-resnet50" --device cuda
"$CS" evaluate "$OUT/retrieval-frozen-resnet50"
"$CS" train --preset strong-proxyanchor-resnet50 --data "$RFULL" --out "$OUT/strong-proxyanchor-resnet50" \
  --device cuda --num-workers 8 --resume
"$CS" index "$OUT/strong-proxyanchor-resnet50" --data "$RFULL" --split test --metric cosine \
  --out "$OUT/strong-proxyanchor-resnet50/index-test" --device cuda
"$CS" evaluate "$OUT/strong-proxyanchor-resnet50/index-test"
"$CS" report "$OUT"/seed-* "$OUT"/strong-* --index "$OUT/strong-proxyanchor-resnet50/index-test" \
  --index "$OUT/retrieval-frozen-resnet50" --out "$OUT/report" --overwrite
