"""Atomic file writes: a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO


class DiskFullError(OSError):
    """No space (or quota) left while writing ``path``; the temporary file is already removed."""

    def __init__(self, path: Path) -> None:
        super().__init__(errno.ENOSPC, f"no space left on device writing {path}")
        self.path = path


class _KeepsWriteErrors:
    """A file whose ``OSError`` on write is kept: torch.save rethrows it as a RuntimeError with no errno,
    and a full disk must be told apart from a bug."""

    def __init__(self, f: BinaryIO) -> None:
        self.f, self.error = f, None

    def write(self, data: bytes) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def atomic_write(path: str | os.PathLike, write: Callable[[Any], object], shared: bool = False) -> None:
    """``write(f)`` into a temporary file beside ``path``, fsync, rename over ``path`` (atomic on POSIX).

    Any failure removes the temporary file; a full disk raises ``DiskFullError``. The temporary name is
    fixed (``.<name>.tmp``: a killed writer's leftover is overwritten by the next write, never piles
    up) unless ``shared``: files several processes may write at once (caches) get a per-process name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp" if shared else f".{path.name}.tmp")
    out = None
    try:
        with open(tmp, "wb") as f:
            out = _KeepsWriteErrors(f)
            write(out)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        cause = out.error if out is not None and out.error is not None else e
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(path) from None
        raise


def atomic_write_text(path: str | os.PathLike, text: str, shared: bool = False) -> None:
    atomic_write(path, lambda f: f.write(text.encode()), shared)
