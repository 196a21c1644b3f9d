"""Atomic file writes: a crash or Ctrl-C mid-save never leaves a half-written file under the final name."""

from __future__ import annotations

import os

from ldm.util import atomic_save  # the one implementation, shared with ldm/

__all__ = ["atomic_save", "atomic_write_bytes", "atomic_write_text"]


def atomic_write_bytes(data: bytes, path: str | os.PathLike[str]) -> None:
    """Write `data` to `path` atomically."""
    atomic_save(lambda tmp: tmp.write_bytes(data), path)


def atomic_write_text(text: str, path: str | os.PathLike[str], encoding: str = "utf-8") -> None:
    """Write `text` to `path` atomically."""
    atomic_save(lambda tmp: tmp.write_text(text, encoding=encoding), path)
