#!/usr/bin/env bash
# Reproduce benchmarks/results/vqgan.md: the `small` VQ-GAN (128 px, 16x16 codes) trained in
# 30 minutes on a 2-core CPU with the clinical feature loss (the finding classifier's features,
# as LLM-CXR used a CXR classifier's), graded by an independently trained classifier.
# About 45 minutes in all on a 2-core CPU. Run from the repository root with the venv active.
set -euo pipefail
OUT=${OUT:-runs}
llm-cxr -q data synth --n 4000 --size 128 --seed 7 --out "$OUT/synth-4k"
# the classifier whose features the VQ-GAN learns to keep (exports feature_net.pt2)
llm-cxr -q classifier train --data "$OUT/synth-4k" --out "$OUT/classifier" --epochs 10 --export-feature-net
llm-cxr vqgan train --data "$OUT/synth-4k" --config small --out "$OUT/vqgan-small-feat" \
    --steps 1750 --max-minutes 30 --set disc_start=1400 \
    --feature-net "$OUT/classifier/feature_net.pt2" --set feature_weight=0.3
# an independent classifier (another seed) grades whether findings survive reconstruction
llm-cxr -q classifier train --data "$OUT/synth-4k" --out "$OUT/classifier-eval" --epochs 10 --seed 1
python benchmarks/bench_vqgan.py --run "$OUT/vqgan-small-feat" --data "$OUT/synth-4k" \
    --classifier "$OUT/classifier-eval" --parts quality,speed,scaling,real --scaling-sizes 1000,4000
