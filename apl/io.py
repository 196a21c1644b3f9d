"""Atomic file writes: a crash or Ctrl-C mid-save never leaves a half-written file under the final name."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path


def _fsync_dir(folder: Path) -> None:
    """Flush a directory entry so a completed rename survives power loss (POSIX only)."""
    if os.name != "posix":
        return  # Windows cannot open directories; os.replace is already durable enough there
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _new_tmp_path(path: Path) -> Path:
    """Create an empty, unique temporary file next to `path` that keeps `path`'s suffix."""
    for _ in range(100):
        # Keep the real suffix last: writers such as matplotlib's savefig pick the format from it.
        tmp = path.with_name(f".{path.stem}.{secrets.token_hex(6)}.tmp{path.suffix}")
        try:
            # 0o666 lets the process umask decide the final permissions, as for any ordinary file.
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise OSError(f"could not create a temporary file next to {path}: 100 random names were all taken")


def atomic_save(obj_writer: Callable[[Path], None], path: str | os.PathLike[str]) -> None:
    """Call `obj_writer(tmp)` on a temporary file in `path`'s folder, fsync it, then rename it onto `path`.

    The parent folder is created if needed. If the writer raises, the temporary file is removed, `path` is left
    as it was, and the error propagates. Example: `atomic_save(lambda p: torch.save(obj, p), "out/emb.pt")`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_tmp_path(path)
    try:
        obj_writer(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(data: bytes, path: str | os.PathLike[str]) -> None:
    """Write `data` to `path` atomically."""
    atomic_save(lambda tmp: tmp.write_bytes(data), path)


def atomic_write_text(text: str, path: str | os.PathLike[str], encoding: str = "utf-8") -> None:
    """Write `text` to `path` atomically."""
    atomic_save(lambda tmp: tmp.write_text(text, encoding=encoding), path)
