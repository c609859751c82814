"""Files from elsewhere never run code: crafted checkpoints are read inertly, and the library has no unsafe calls."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import pytest
import torch

from llm_cxr.errors import InputError
from llm_cxr.vqgan.taming import read_checkpoint_state

LIB = Path(__file__).resolve().parents[1] / "llm_cxr"


class _Payload:
    """Unpickling this creates a folder: proof that the file ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return os.mkdir, (str(self.marker),)


def test_crafted_legacy_checkpoint_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "legacy.ckpt"
    with open(ckpt, "wb") as f:
        pickle.dump(_Payload(marker), f, protocol=2)  # torch's legacy reader unpickles its header first
    with pytest.raises(InputError, match="cannot read checkpoint"):
        read_checkpoint_state(ckpt)
    assert not marker.exists()


def test_crafted_zip_checkpoint_runs_nothing_but_its_tensors_load(tmp_path):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "lightning.ckpt"
    weight = torch.arange(6.0).reshape(2, 3)
    # a Lightning-style checkpoint whose non-tensor entries (callbacks, hyper-parameters) carry a payload
    torch.save({"state_dict": {"w": weight}, "callbacks": _Payload(marker)}, ckpt)
    assert read_checkpoint_state(ckpt)["w"].equal(weight)
    assert not marker.exists()


_UNSAFE = {
    r"weights_only\s*=\s*False(?![^\n]*pickle_module=_restricted_pickle)": "torch.load without weights_only",
    r"\bpickle\.loads?\(": "pickle.load",
    r"allow_pickle\s*=\s*True": "numpy allow_pickle",
    r"trust_remote_code\s*=\s*True": "trust_remote_code",
    r"shell\s*=\s*True": "a shell",
    r"\b(?:yaml\.load|yaml\.unsafe_load)\(": "yaml.load (safe_load only)",
}


def test_library_has_no_unsafe_deserialisation_or_shell():
    found = []
    for path in sorted(LIB.rglob("*.py")):
        text = path.read_text()
        for pattern, what in _UNSAFE.items():
            for m in re.finditer(pattern, text):
                found.append(f"{path.relative_to(LIB.parent)}:{text[:m.start()].count(chr(10)) + 1}: {what}")
    assert not found, "unsafe calls:\n" + "\n".join(found)
    # the one torch.load that is not weights_only goes through the restricted unpickler
    assert "pickle_module=_restricted_pickle" in (LIB / "vqgan" / "taming.py").read_text()
