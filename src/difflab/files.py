"""Files a command reads and writes: atomic file and folder writes (a reader sees the old file or folder
or the new one, never half of one), and the start-up rule that an input can be read."""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO


@dataclass(frozen=True)
class Readable:
    """A path this process may read (a folder: list and enter), as a type-hint rule (rules.py): a
    checkpoint behind chmod 000 is one line at start-up, not a PermissionError from inside torch."""

    def problem(self, value: Any) -> str | None:
        path = Path(str(value)).expanduser()
        if not path.exists():
            return None  # Exists() says that
        if os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0)):
            return None
        return "cannot be read (permission denied); fix its permissions (chmod u+r) or give a readable copy"


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


def atomic_write(
    path: str | os.PathLike, write: Callable[[Any], object], shared: bool = False, sync: bool = True
) -> None:
    """``write(f)`` into a temporary file beside ``path``, fsync, rename over ``path`` (atomic on POSIX).
    ``sync=False`` skips the fsync where a file lost to a power cut is cheap to redo (one of many
    sampled images): a kill or Ctrl-C still leaves the whole file or none.

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
            if sync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        cause = out.error if out is not None and out.error is not None else e
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(path) from None
        raise


@contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold ``.<name>.lock`` beside ``path`` (filelock's OS lock: released when the process dies), so
    processes sharing a cache dir build its file once: the others wait, then find it."""
    from filelock import FileLock

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(path.with_name(f".{path.name}.lock")):
        yield


def atomic_write_text(path: str | os.PathLike, text: str, shared: bool = False) -> None:
    atomic_write(path, lambda f: f.write(text.encode()), shared)


def is_disk_full(e: BaseException) -> bool:
    """A full disk or quota, also where a library rethrows it without an errno (safetensors' Rust
    writer says "No space left on device (os error 28)")."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return f"(os error {errno.ENOSPC})" in str(e) or f"(os error {errno.EDQUOT})" in str(e)


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``path`` to fill; when the block ends it takes ``path``'s
    place (an earlier folder there is replaced). A failure, Ctrl-C or kill -9 never leaves a half
    folder at ``path``: the temporary one is removed, or, after a kill, by the next call, which also
    puts back an earlier folder a kill caught mid-swap. A full disk raises ``DiskFullError``."""
    path = Path(path).resolve()  # a link to a folder: the folder is replaced, beside its target
    tmp, old = path.with_name(f".{path.name}.partial"), path.with_name(f".{path.name}.old")
    if old.is_dir() and not (path.is_dir() and any(path.iterdir())):
        if path.is_dir():
            path.rmdir()
        os.replace(old, path)  # killed between the two renames below: the earlier folder comes back
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if path.is_dir() and any(path.iterdir()):
            os.replace(path, old)
        elif path.is_dir():
            path.rmdir()  # an empty folder (Hydra makes ``out`` before the command runs)
        os.replace(tmp, path)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(e):
            raise DiskFullError(path) from None
        raise
    shutil.rmtree(old, ignore_errors=True)
