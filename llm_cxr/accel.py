"""Creating accelerate ``Accelerator`` objects that library functions can call more than once.

accelerate keeps one process-wide ``AcceleratorState``; a second ``Accelerator`` with another
mixed-precision setting in the same process (a notebook that trains twice, a test suite)
raises "AcceleratorState has already been initialized". Only the precision differs then: the
distributed set-up (``PartialState``) is kept, and the precision state is rebuilt.
"""

from __future__ import annotations

import functools
import logging
import os

import torch

log = logging.getLogger(__name__)

# torch's CPU kernels that run bf16 natively; elsewhere (an AVX2-only CPU) bf16 is emulated, and measured on a
# 2-core AVX2 AMD EPYC a 3x3 convolution ran 250x and a linear layer 7x slower under bf16 autocast than in fp32
FAST_BF16_CPUS = ("AVX512", "AVX512_BF16", "AMX")


def bf16_is_fast(device: str | torch.device = "cpu") -> bool:
    """Whether bf16 autocast speeds ``device`` up: a CUDA GPU with bf16, or a CPU with AVX-512 / AMX kernels."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.backends.cpu.get_cpu_capability() in FAST_BF16_CPUS
    return True  # other accelerators: trust the user's choice


@functools.lru_cache(maxsize=None)
def _warn_slow_bf16(capability: str) -> None:
    log.warning("bf16 autocast is much slower than fp32 on this CPU (%s kernels, no AVX-512/AMX): computing in fp32 "
                "instead; set mixed_precision: no to silence this", capability)


def effective_precision(mixed_precision: str, device: str | torch.device) -> str:
    """``mixed_precision`` as it will run on ``device``: "bf16" becomes "no" where bf16 is emulated and slow."""
    if mixed_precision == "bf16" and not bf16_is_fast(device):
        _warn_slow_bf16(torch.backends.cpu.get_cpu_capability())
        return "no"
    return mixed_precision


def make_accelerator(mixed_precision: str = "no", **kwargs):
    """An ``Accelerator``; "bf16" runs as fp32 on a CPU where bf16 is slow (:func:`effective_precision`)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # the device accelerate will pick, without creating its state first (that would fix the distributed set-up
    # before Accelerator reads its arguments)
    use_cpu = kwargs.get("cpu") or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    device = "cuda" if torch.cuda.is_available() and not use_cpu else "cpu"
    mixed_precision = effective_precision(mixed_precision, device)
    try:
        return Accelerator(mixed_precision=mixed_precision, **kwargs)
    except ValueError as e:
        if "already been initialized" not in str(e):
            raise
        log.debug("re-creating the accelerate state for mixed_precision=%s", mixed_precision)
        AcceleratorState._reset_state(reset_partial_state=False)
        return Accelerator(mixed_precision=mixed_precision, **kwargs)
