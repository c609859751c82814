"""Writing a file whole or not at all: a kill or a full disk never leaves half of one where a reader would look.

The content goes to ``NAME.tmp`` beside the target and is renamed over it only once complete (a rename within one
file system is atomic), so the previous version stays whole until the new one is; a failed write removes its
temporary file, so a full disk is not made fuller, and the error names the file it was writing.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO, Any, Callable


class _Recording:
    """A file that remembers the ``OSError`` of a failed write: torch.save turns it into a bare RuntimeError
    ("enforce fail at inline_container.cc"), and we want to say "the disk is full"."""

    def __init__(self, f: IO[bytes]) -> None:
        self._f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


def save_atomic(path: str | Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Write ``path`` with ``write(file)`` (e.g. ``lambda f: torch.save(obj, f)``) into a temporary file, then rename.

    A write that fails for want of space or permission raises that ``OSError`` naming ``path``, whatever the
    writer made of it."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    rec = None
    try:
        with open(tmp, "wb") as f:
            rec = _Recording(f)
            write(rec)
        os.replace(tmp, path)
    except Exception as e:
        cause = e if isinstance(e, OSError) else rec.error if rec is not None else None
        if cause is not None and cause.errno is not None and cause.filename is None:
            raise OSError(cause.errno, cause.strerror, str(path)) from e
        if cause is not None and cause is not e:
            raise cause from e
        raise
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Write text (UTF-8) or bytes to ``path`` whole or not at all."""
    save_atomic(path, lambda f: f.write(data.encode("utf-8") if isinstance(data, str) else data))


__all__ = ["save_atomic", "write_atomic"]
