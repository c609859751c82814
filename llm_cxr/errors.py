"""Exceptions a user can act on.

Every message names the file (or value) involved, what was wrong, and what to do.
Library code raises these; the CLI turns them into one clear line and an exit code,
never a traceback from deep inside torch.
"""

from __future__ import annotations


class LLMCXRError(Exception):
    """Base class of all errors that are the user's to fix."""


class InputError(LLMCXRError):
    """An input file or value is unusable (missing, corrupt, wrong format)."""


class ImageReadError(InputError):
    """An image file could not be decoded."""


class DatasetError(InputError):
    """A dataset on disk is missing, malformed, or not in the llm-cxr schema."""


class ConfigError(LLMCXRError):
    """A configuration is invalid (unknown key, bad value, mismatch with weights)."""


class NothingUsableError(LLMCXRError):
    """A batch job found no usable item at all."""


class MetricUnavailable(LLMCXRError):
    """A metric needs a package or data set that is not installed; the message says what to install."""
