"""Launch a training stage under accelerate: `accelerate launch training/train.py --config YAML [options]`.

Same options as `llm-cxr train` (see `llm-cxr train --help`); accelerate decides the processes:
  accelerate launch --config_file training/accelerate/multi_gpu.yaml training/train.py --config ...
  accelerate launch --config_file training/accelerate/deepspeed_zero2.yaml training/train.py --config ...
  ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 training/train.py --config ...  (2 CPU ranks)
"""

import sys

from llm_cxr.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
