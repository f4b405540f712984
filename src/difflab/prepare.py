"""`difflab-prepare`: write any difflab data source as LitData shards, for `data=streaming`.

difflab-prepare data=folder data.source.path=/my/images resolution=64 out=/data/shards/my_images
difflab-prepare data=fashion_mnist out=s3://bucket/fmnist num_workers=8
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import multiprocessing
import os
import re
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import torch
from omegaconf import DictConfig, OmegaConf

from difflab.cli import Command, keywords
from difflab.data.datamodule import ImageDataModule
from difflab.data.shards import (
    ChunkBytes,
    Encoding,
    JpegQuality,
    PrepareSize,
    ShardItems,
    is_remote,
    shard_bytes,
)
from difflab.errors import DifflabError
from difflab.files import atomic_dir, atomic_write_text
from difflab.rules import AtLeast, OutputDir

log = logging.getLogger("difflab.prepare")


# What difflab-prepare writes (the output-folder rule shared with sample, eval and export); an earlier
# shard set there is replaced only with overwrite=true.
SHARD_DIR = OutputDir(("index.json", "chunk-*"), "a shard set")


def _ready_local_out(out: str, overwrite: bool) -> Path:
    """``out`` as a writable directory, empty or (with ``overwrite``) holding a shard set to replace;
    refuses anything else."""
    path = Path(out).expanduser()
    if problem := SHARD_DIR.problem(path):  # a file, or someone else's files: never written into
        raise DifflabError(f"out={out} {problem}")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        if not (path / "index.json").exists():
            raise DifflabError(
                f"out={out} holds an unfinished shard set (chunks but no index.json: an earlier "
                "difflab-prepare was stopped); give overwrite=true to write it again"
            )
        raise DifflabError(
            f"out={out} is not empty; choose a new directory or give overwrite=true to replace the shards"
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DifflabError(f"out={out} cannot be created: {e.strerror or e}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise DifflabError(f"out={out} is not writable")
    return path


def _one_line(error: BaseException | str) -> str:
    """The line that says what went wrong in a writer's error: LitData re-raises a worker's failure as
    ``RuntimeError("We found the following error Traceback ...")`` holding a chained traceback, whose
    first part ends with the root cause."""
    root = re.split(r"The above exception was the direct cause|During handling of the above", str(error))[0]
    lines = [line.strip() for line in root.splitlines() if line.strip().strip(".")]
    if not lines:
        return type(error).__name__ if isinstance(error, BaseException) else "unknown error"
    return re.sub(r"^(?:[\w.]+\.)?DifflabError: ", "", lines[-1])


def _writer(write: Callable[[], None], cache: str, errors: Any) -> None:
    """The child process that runs LitData's ``optimize`` (and its workers) in a process group of its
    own, so that a signal to ``difflab-prepare`` stops all of them at once."""
    os.setpgrp()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # the parent's handlers raise
        signal.signal(sig, signal.SIG_DFL)
    parent = os.getppid()

    def follow_parent() -> None:  # a parent killed with SIGKILL cannot stop us: stop with it
        while os.getppid() == parent:
            time.sleep(0.5)
        os.killpg(0, signal.SIGKILL)

    threading.Thread(target=follow_parent, daemon=True).start()
    # LitData empties its fixed cache folder at start: a private one keeps two prepares apart.
    os.environ["DATA_OPTIMIZER_CACHE_FOLDER"] = os.path.join(cache, "chunks")
    os.environ["DATA_OPTIMIZER_DATA_CACHE_FOLDER"] = os.path.join(cache, "data")
    try:
        write()
    except BaseException as e:  # reported to the parent as one line; the traceback helps no user
        errors.put(_one_line(e)[:2000])  # well under a pipe's buffer: the parent reads it after join()
        errors.close()
        os._exit(1)
    os._exit(0)


class _Stopped(BaseException):
    """A signal asked ``difflab-prepare`` to stop. A BaseException, as KeyboardInterrupt is, so that
    no ``except Exception`` on the way (a source's bad-image check) mistakes it for a bad file."""


@contextlib.contextmanager
def _signals_stop() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP raise ``_Stopped`` in the main thread while this is open."""

    def stop(signum: int, frame: Any) -> None:
        raise _Stopped(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _write_stoppably(write: Callable[[], None], out: str, rerun: str) -> None:
    """Run ``write`` (LitData's ``optimize``) in a child process group, which a signal (under
    ``_signals_stop``) stops as a whole, with one line. Written here rather than left to LitData: its
    SIGINT handler exits with status 0 and no message, and SIGTERM left its workers running."""
    ctx = multiprocessing.get_context("fork")  # LitData's workers fork too: they inherit the source
    errors = ctx.SimpleQueue()
    cache = tempfile.mkdtemp(prefix="difflab-prepare-")
    child = ctx.Process(target=_writer, args=(write, cache, errors), name="difflab-prepare-writer")
    try:
        child.start()
        child.join()
    except _Stopped as e:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        child.join()
        raise DifflabError(f"stopped by {e} while writing shards to out={out}; {rerun}") from None
    finally:
        if child.pid is not None:  # LitData leaves helper processes behind when a worker fails
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
        shutil.rmtree(cache, ignore_errors=True)
    if child.exitcode != 0:
        why = errors.get() if not errors.empty() else f"the writer process died (exit code {child.exitcode})"
        if "No space left on device" in why or "Errno 28" in why:
            why = "no space left on the device; free space or choose another out"
        raise DifflabError(f"writing shards to out={out} failed: {why}; {rerun}")


def _pin_index(path: Path, key: str) -> None:
    """Make ``index.json`` a function of the shards alone: LitData stamps it with the time it was
    written (``updated_at``, the key of a remote set's local cache), so two identical runs differed.
    A digest of what determines the chunks keeps that key changing whenever the shards change."""
    index_path = path / "index.json"
    index = json.loads(index_path.read_text())
    content = json.dumps({k: v for k, v in index.items() if k != "updated_at"}, sort_keys=True)
    index["updated_at"] = hashlib.sha1(f"{key}|{content}".encode()).hexdigest()[:16]
    atomic_write_text(index_path, json.dumps(index, sort_keys=True))


def prepare(
    data: ImageDataModule,
    out: str,
    resolution: PrepareSize,
    encoding: Encoding,
    quality: JpegQuality,
    num_workers: Annotated[int, AtLeast(1)],
    chunk_bytes: ChunkBytes,
    overwrite: bool,
) -> dict[str, Any]:
    """Write ``data``'s images (its source, channel conversion and background) as shards in ``out``;
    returns the summary (conf/prepare.yaml documents each setting). The same source and settings
    write byte-identical local shards."""
    existed = is_remote(out) or Path(out).expanduser().exists()
    with _signals_stop():
        try:
            return _prepare(data, out, resolution, encoding, quality, num_workers, chunk_bytes, overwrite)
        except _Stopped as e:  # before or after the writer ran (it reports its own stop)
            raise DifflabError(
                f"stopped by {e} before writing shards to out={out}; run the command again"
            ) from None
        finally:
            path = Path(out).expanduser()
            if not existed and path.is_dir() and not any(path.iterdir()):
                path.rmdir()  # made by this run, still empty: it failed or was stopped


def _prepare(
    data: ImageDataModule,
    out: str,
    resolution: int | None,
    encoding: Encoding,
    quality: int,
    num_workers: int,
    chunk_bytes: int | str,
    overwrite: bool,
) -> dict[str, Any]:
    from litdata import optimize

    local = None if is_remote(out) else _ready_local_out(out, overwrite)
    source = data.source_factory() if callable(data.source_factory) else data.source_factory
    items = ShardItems(source, data.channels, data.background, resolution, encoding, quality)
    n = len(source)
    log.info("writing %d images from %s to %s (%s)", n, source.identity, out, encoding)
    t0 = time.perf_counter()

    def write(output_dir: str) -> None:
        optimize(
            fn=items,
            # A seeded shuffle: each chunk, and each block LitData decodes, is then a random sample of
            # the set, which the chunk-by-chunk training order relies on (a folder sorted by class
            # would otherwise give one-class batches).
            inputs=torch.randperm(n, generator=torch.Generator().manual_seed(data.seed)).tolist(),
            output_dir=output_dir,
            chunk_bytes=chunk_bytes,
            num_workers=num_workers,
            mode="overwrite" if overwrite and local is None else None,
            start_method="fork",  # the workers inherit the decoded source instead of re-reading it
            # Each worker takes a fixed slice of the inputs; LitData's default shares one work queue,
            # so which chunk an image lands in depended on timing (two runs trained 7.9e-2 apart).
            keep_data_ordered=True,
            verbose=False,  # LitData's notes and progress bar on stderr would bury an error's one line
        )

    if local is None:
        rerun = "the shards there may be incomplete: run the command again with overwrite=true"
        _write_stoppably(lambda: write(out), out, rerun)
    else:
        # A local set is written beside out= and swapped in whole: a failure, a signal or kill -9
        # leaves out= as it was (an earlier set replaced by overwrite=true included).
        with atomic_dir(local) as partial:
            _write_stoppably(lambda: write(str(partial)), out, "out= is unchanged; run the command again")
            settings = (
                source.identity,
                data.channels,
                data.background,
                resolution,
                encoding,
                quality,
                data.seed,
            )
            _pin_index(partial, "|".join(map(str, settings)))
    seconds = time.perf_counter() - t0
    size = shard_bytes(str(local)) if local is not None else None
    summary = {"images": n, "bytes": size, "seconds": round(seconds, 2), "img_per_s": round(n / seconds, 1)}
    return summary


def run(cfg: DictConfig) -> dict[str, Any]:
    kwargs = keywords(prepare, cfg)
    s = prepare(**kwargs)
    size = f"{s['bytes'] / 2**20:.1f} MB" if s["bytes"] is not None else "size on the remote store"
    print(
        f"wrote {s['images']} images ({size}) to {kwargs['out']} in {s['seconds']:.1f} s "
        f"({s['img_per_s']:.0f} img/s); train with: difflab-train data=streaming "
        f"data.source.path={kwargs['out']} data.channels={kwargs['data'].channels}"
    )
    return s


def checks(cfg: DictConfig) -> list[str]:
    """One ``num_workers``: the data group's ``data.num_workers`` is the training loader's and prepare
    never reads it, so setting it here is refused rather than silently ignored."""
    given = OmegaConf.select(cfg, "hydra.overrides.task", default=None) or []
    if any(str(o).lstrip("+~").startswith("data.num_workers=") for o in given):
        return [
            "data.num_workers is the training loader's setting and difflab-prepare does not use it; "
            f"give its worker processes as num_workers=N (now {cfg.num_workers})"
        ]
    return []


COMMAND = Command("prepare", run, prepare, checks, out_is_run_dir=False)


def main(argv: list[str] | None = None) -> None:
    COMMAND.main(argv)


if __name__ == "__main__":
    main()
