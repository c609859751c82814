"""Creating accelerate ``Accelerator`` objects that library functions can call more than once.

accelerate keeps one process-wide ``AcceleratorState``; a second ``Accelerator`` with another
mixed-precision setting in the same process (a notebook that trains twice, a test suite)
raises "AcceleratorState has already been initialized". Only the precision differs then: the
distributed set-up (``PartialState``) is kept, and the precision state is rebuilt.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def make_accelerator(mixed_precision: str = "no", **kwargs):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    try:
        return Accelerator(mixed_precision=mixed_precision, **kwargs)
    except ValueError as e:
        if "already been initialized" not in str(e):
            raise
        log.debug("re-creating the accelerate state for mixed_precision=%s", mixed_precision)
        AcceleratorState._reset_state(reset_partial_state=False)
        return Accelerator(mixed_precision=mixed_precision, **kwargs)
