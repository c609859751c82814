#!/usr/bin/env bash
# The `small` language-model preset, end to end on this repository's synthetic data:
#   base LM (report tokenizer + GPT-NeoX pretrained on report text) -> stage 0 (learn to read the codes)
#   -> stage 1 (findings + impression, both directions) -> stage 2 (impression), each continuing the last.
# Needs a dataset encoded by the small VQ-GAN, e.g. (see training/vqgan_small.sh):
#   llm-cxr data synth --n 20000 --seed 11 --workers 2 --out runs/synth-20k
#   llm-cxr vqgan encode --model runs/vqgan-small-feat --data runs/synth-20k --out runs/synth-20k-codes
# The stages' configs ship with the package (llm_cxr/train/presets/). Every step resumes if interrupted: rerun
# the script.
set -euo pipefail
DATA=${DATA:-runs/synth-20k-codes}
RUNS=${RUNS:-runs}
LLM_CXR=${LLM_CXR:-llm-cxr}
$LLM_CXR lm pretrain --data "$DATA" --out "$RUNS/lm-base-small" --preset small --steps 800
$LLM_CXR train --preset small --stage 0 --data "$DATA" --out "$RUNS/lm-small-s0" \
    --base "$RUNS/lm-base-small/model" "$@"
$LLM_CXR train --preset small --stage 1 --data "$DATA" --out "$RUNS/lm-small-s1" \
    --init-from "$RUNS/lm-small-s0" "$@"
$LLM_CXR train --preset small --stage 2 --data "$DATA" --out "$RUNS/lm-small-s2" \
    --init-from "$RUNS/lm-small-s1" "$@"
