#!/usr/bin/env bash
# Create the virtual environment (if there is none) and install llm-cxr into it.
#
# PyTorch is installed first, on its own, so that nothing else pulls a build you did not
# want: a local CPU wheel where the machine provides one (pip's find-links), otherwise the
# registry's normal build (CUDA on Linux). Override with TORCH_SPEC (e.g. "torch==2.5.1")
# and TORCH_INDEX_URL (e.g. a CPU-only wheel index).
set -euo pipefail
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
# web: Gradio for `llm-cxr serve`; test includes Playwright, which drives the system Chromium
# (/usr/bin/chromium, `apt-get install chromium`) in the web app's browser test.
EXTRAS=${EXTRAS:-test,web}
TORCH_LOCAL_VERSION=${TORCH_LOCAL_VERSION:-2.13.0}

if [ ! -x "$VENV/bin/python" ]; then
  echo ">> creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
pip_() { "$PY" -m pip --disable-pip-version-check "$@"; }

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  if [ -n "${TORCH_SPEC:-}" ]; then
    echo ">> installing $TORCH_SPEC"
    pip_ install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$TORCH_SPEC"
  elif tmp=$(mktemp -d) && pip_ download -q --no-index --no-deps -d "$tmp" "torch==$TORCH_LOCAL_VERSION" >/dev/null 2>&1; then
    echo ">> installing the local torch $TORCH_LOCAL_VERSION wheel"
    pip_ install "torch==$TORCH_LOCAL_VERSION"
  else
    echo ">> installing torch from the package index"
    pip_ install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} torch
  fi
  rm -rf "${tmp:-}"
fi
echo ">> installing llm-cxr[$EXTRAS]"
pip_ install -q -e ".[${EXTRAS}]"
case ",$EXTRAS," in
  *,test,*)
    # The taming-transformers reference modules, for the VQ-GAN parity test only. --no-deps:
    # its declared dependencies (torchvision, lightning) would break a CPU environment.
    pip_ install -q --no-deps "taming-transformers-rom1504==0.0.6" ;;
esac
"$PY" -c "import torch, transformers, peft, datasets, llm_cxr; print('>> ready: torch', torch.__version__, '| cuda', torch.cuda.is_available(), '| transformers', transformers.__version__)"
touch "$VENV/.setup-done"
