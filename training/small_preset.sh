#!/usr/bin/env bash
# The `small` preset end to end, resumable: rerun the script after an interruption and every step continues where it
# stopped (finished steps are skipped). VQ-GAN and judge (training/vqgan_small.sh's recipe, without its time cap),
# 20,000 synthetic studies encoded, the language-model stages (training/lm_small.sh), and the 200-study quality
# benchmark. Run from the repository root with the venv active; OUT= changes `runs`. Arguments go to every
# language-model stage; NAME= names the benchmark's result files (default lm_quality). E.g. the LoRA arm:
#   OUT=runs-lora NAME=lm_quality_lora bash training/small_preset.sh --set full_finetune=false
set -euo pipefail
OUT=${OUT:-runs}
step() { echo "[$(date +%H:%M:%S)] $*" >&2; }
step synthetic data for the VQ-GAN
[ -e "$OUT/synth-4k/dataset_info.json" ] || llm-cxr -q data synth --n 4000 --size 128 --seed 7 --out "$OUT/synth-4k"
step finding classifier whose features the VQ-GAN keeps
[ -e "$OUT/classifier/feature_net.pt2" ] || llm-cxr -q classifier train --data "$OUT/synth-4k" --out "$OUT/classifier" \
    --epochs 10 --export-feature-net
step "VQ-GAN (1750 steps; resumes from its last checkpoint)"
[ -e "$OUT/vqgan-small-feat/DONE" ] || llm-cxr vqgan train --data "$OUT/synth-4k" --config small \
    --out "$OUT/vqgan-small-feat" --steps 1750 --set disc_start=1400 \
    --feature-net "$OUT/classifier/feature_net.pt2" --set feature_weight=0.3
step independent judge classifier
[ -e "$OUT/classifier-eval/model.safetensors" ] || llm-cxr -q classifier train --data "$OUT/synth-4k" \
    --out "$OUT/classifier-eval" --epochs 10 --seed 1
step 20,000 studies for the language model
[ -e "$OUT/synth-20k/dataset_info.json" ] || llm-cxr data synth --n 20000 --seed 11 --workers 2 --out "$OUT/synth-20k"
step encoding them
[ -e "$OUT/synth-20k-codes/dataset_info.json" ] || llm-cxr vqgan encode --model "$OUT/vqgan-small-feat" \
    --data "$OUT/synth-20k" --out "$OUT/synth-20k-codes"
step language-model stages
DATA="$OUT/synth-20k-codes" RUNS="$OUT" bash "$(dirname "$0")/lm_small.sh" "$@"
step quality benchmark
python benchmarks/bench_lm_quality.py --run "$OUT/lm-small-s2" --stage1 "$OUT/lm-small-s1" --stage0 "$OUT/lm-small-s0" \
    --base "$OUT/lm-base-small" --data "$OUT/synth-20k-codes" --classifier "$OUT/classifier-eval" --n 200 --candidates 4 \
    --name "${NAME:-lm_quality}"
step done
