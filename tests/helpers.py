"""Test-only callbacks, importable by spawned DDP workers."""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import lightning as L
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def image_digest(image: torch.Tensor) -> str:
    """The same string for the same pixels in every process (Python's bytes hash is salted per process)."""
    return hashlib.sha1(image.cpu().numpy().tobytes()).hexdigest()[:16]


class DumpRankState(L.Callback):
    """Records which images each rank saw (by digest) and dumps its EMA weights at the end."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.seen: list[list[float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen.append([image_digest(x) for x in batch])

    def on_train_end(self, trainer, pl_module) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "seen": self.seen,
                "ema": [p.clone() for p in pl_module.ema.shadow_params],
                # ddp_spawn: shared EMA storage would be updated by every rank (N times too fast)
                "ema_shared": any(p.is_shared() for p in pl_module.ema.shadow_params),
                "world_size": trainer.world_size,
            },
            self.path / f"rank{trainer.global_rank}.pt",
        )


class RecordStepLosses(L.Callback):
    """Keeps the loss of every training batch (micro-batch), in order, for tests of logged means."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


class KillAt(L.Callback):
    """SIGKILLs the run's whole process group at a chosen moment, as a crash or ``kill -9`` would.

    ``moment``: ``step`` (optimizer step ``step`` done, before its checkpoint is written),
    ``after_save`` (the checkpoint of step ``step`` is on disk, the next step has not begun),
    ``during_save`` (halfway through writing the checkpoint of step ``step``),
    ``during_last_save`` (halfway through writing ``last.ckpt`` at step ``step``, its step file done),
    ``before_remove`` (the checkpoint of step ``step`` is written, the top-k file it replaces not yet
    deleted).
    """

    MOMENTS = ("step", "after_save", "during_save", "during_last_save", "before_remove")

    def __init__(self, step: int, moment: str = "step") -> None:
        assert moment in self.MOMENTS, moment
        self.step, self.moment = step, moment

    @staticmethod
    def _kill() -> None:
        import os
        import signal

        os.killpg(os.getpgrp(), signal.SIGKILL)

    def setup(self, trainer, pl_module, stage) -> None:
        if self.moment == "before_remove":
            io, step = trainer.strategy.checkpoint_io, self.step
            real_remove = io.remove_checkpoint

            def die_then_remove(path, *args, **kwargs):
                if trainer.global_step == step:
                    KillAt._kill()
                return real_remove(path, *args, **kwargs)

            io.remove_checkpoint = die_then_remove
        if self.moment not in ("during_save", "during_last_save"):
            return
        import difflab.checkpoints as ckpts

        real_save, step, only_last = torch.save, self.step, self.moment == "during_last_save"

        def half_then_die(obj, f, *args, **kwargs):  # only checkpoint writes go through this name
            name = str(getattr(getattr(f, "f", f), "name", ""))  # atomic_write's file: .<name>.tmp
            if trainer.global_step == step and (not only_last or name.endswith("last.ckpt.tmp")):
                import io

                buf = io.BytesIO()
                real_save(obj, buf, *args, **kwargs)
                data = buf.getvalue()
                f.write(data[: len(data) // 2])
                f.flush()
                KillAt._kill()
            return real_save(obj, f, *args, **kwargs)

        ckpts.torch = _TorchWithSave(half_then_die)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.moment == "step" and trainer.global_step == self.step:
            self._kill()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.moment == "after_save" and trainer.global_step == self.step:
            self._kill()


class Crash(Exception):
    """What CrashAt raises."""


class CrashAt(L.Callback):
    """Raises ``Crash`` when optimizer step ``step`` is done, before its checkpoint is written: the files
    on disk are those a ``kill -9`` there leaves (KillAt's ``step``), in-process and without a new
    interpreter per run, for short tests."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise Crash(f"crash at step {self.step}")


class _TorchWithSave:
    """``torch`` with ``save`` replaced (patches the name in one module only)."""

    def __init__(self, save) -> None:
        self.save = save

    def __getattr__(self, name: str):
        return getattr(torch, name)


def user_env(**extra: str) -> dict[str, str]:
    """A user's environment: no wandb account, the checkout importable (KillAt & co. live in tests/)."""
    return {**os.environ, "WANDB_MODE": "", "WANDB_API_KEY": "", "PYTHONPATH": str(ROOT), **extra}


class _ForkServer:
    """The one tests/forkserver.py process of this pytest process, started on first use."""

    process: subprocess.Popen | None = None
    socket_path: str = ""

    @classmethod
    def address(cls) -> str:
        if cls.process is None or cls.process.poll() is not None:
            folder = tempfile.mkdtemp(prefix="difflab-forkserver-")
            cls.socket_path = os.path.join(folder, "socket")
            env = user_env()
            cls.process = subprocess.Popen(
                [sys.executable, str(ROOT / "tests" / "forkserver.py"), cls.socket_path],
                stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env, text=True, cwd=folder,
            )  # fmt: skip
            atexit.register(shutil.rmtree, folder, ignore_errors=True)
            atexit.register(cls.process.kill)
            assert cls.process.stdout.readline().strip() == "ready", "tests/forkserver.py did not start"
        return cls.socket_path


class CliProcess:
    """``difflab-<command> args`` started as a user would, with ``subprocess.Popen``'s methods.

    By default a child of tests/forkserver.py (the same entry point without ~4.5 s of imports, see
    that file); with DIFFLAB_TEST_FRESH_PROCESSES=1 a new interpreter. Either way in its own session
    (so a KillAt callback kills it and its DDP workers, never pytest), stdout and stderr to files, in
    the environment ``env`` (default: ``user_env()``)."""

    def __init__(self, command: str, *args: str, cwd, env: dict[str, str] | None = None) -> None:
        self.args = [str(BIN / f"difflab-{command}"), *args]
        # Removed by communicate(), or when a test that only signals or polls drops the object.
        self._folder = tempfile.TemporaryDirectory(prefix="difflab-cli-", ignore_cleanup_errors=True)
        self._files = self._folder.name
        out, err = os.path.join(self._files, "stdout"), os.path.join(self._files, "stderr")
        self.returncode: int | None = None
        self._popen: subprocess.Popen | None = None
        if os.environ.get("DIFFLAB_TEST_FRESH_PROCESSES") == "1":
            with open(out, "w") as o, open(err, "w") as e:
                self._popen = subprocess.Popen(
                    self.args, cwd=cwd, env=env or user_env(), stdout=o, stderr=e, start_new_session=True
                )
            self.pid = self._popen.pid
            return
        request = {"command": f"difflab-{command}", "script": self.args[0], "args": list(args),
                   "cwd": str(cwd), "env": env or user_env(), "stdout": out, "stderr": err}  # fmt: skip
        self._conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._conn.connect(_ForkServer.address())
        self._conn.sendall(json.dumps(request).encode() + b"\n")
        self._replies = self._conn.makefile("rb")
        self.pid = json.loads(self._replies.readline())["pid"]

    def poll(self) -> int | None:
        if self.returncode is None:
            if self._popen is not None:
                self.returncode = self._popen.poll()
            elif select.select([self._conn], [], [], 0)[0]:
                self.wait()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            if self._popen is not None:
                self.returncode = self._popen.wait(timeout)
            else:
                if not select.select([self._conn], [], [], timeout)[0]:
                    raise subprocess.TimeoutExpired(self.args, timeout)
                self.returncode = json.loads(self._replies.readline())["returncode"]
                self._conn.close()
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill_group(self) -> None:
        """SIGKILL to the command and every process it started (DDP ranks, data workers)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        """Waits (killing the whole session after ``timeout``, then raising) and returns the output."""
        try:
            self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill_group()
            self.wait()
            raise
        out = self.output()
        self._folder.cleanup()
        return out

    def output(self) -> tuple[str, str]:
        """What the command has written to stdout and stderr so far."""
        read = lambda name: Path(self._files, name).read_text(errors="replace")  # noqa: E731
        return read("stdout"), read("stderr")


def difflab_cli(
    command: str, *args: str, cwd, timeout: int = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run ``difflab-<command> args`` as a user would, to its end (see CliProcess)."""
    proc = CliProcess(command, *args, cwd=cwd, env=env)
    out, err = proc.communicate(timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def max_abs_diff(a: dict, b: dict) -> dict[str, float]:
    """Largest |a-b| between two checkpoints' live weights, optimizer states and EMA weights."""

    def flat(x) -> list[torch.Tensor]:
        if isinstance(x, torch.Tensor):
            return [x.float()]
        if isinstance(x, dict):
            return [t for k in sorted(x, key=str) for t in flat(x[k])]
        if isinstance(x, list | tuple):
            return [t for v in x for t in flat(v)]
        return []

    def diff(x, y) -> float:
        xs, ys = flat(x), flat(y)
        assert len(xs) == len(ys) and xs, "checkpoints hold different tensors"
        return max((u - v).abs().max().item() if u.numel() else 0.0 for u, v in zip(xs, ys, strict=True))

    return {
        "weights": diff(a["state_dict"], b["state_dict"]),
        "optimizer": diff(a["optimizer_states"], b["optimizer_states"]),
        "ema": diff(a["ema"], b["ema"]),
    }


def train_cli(*args: str, cwd, timeout: int = 600) -> subprocess.CompletedProcess:
    """``difflab-train args`` in a subprocess."""
    return difflab_cli("train", *args, cwd=cwd, timeout=timeout)


# The machine record of benchmark fixtures (protocol.machine()'s fields), shared by the report tests.
BENCH_MACHINE = {
    "cpu": "Test CPU",
    "cores": 2,
    "amx": False,
    "avx512_bf16": True,
    "gpu": None,
    "torch": "0",
    "lightning": "0",
    "diffusers": "0",
    "python": "3",
    "commit": "abc",
    "dirty": False,
}


def user_files(root: Path) -> dict[str, Path]:
    """A user's files a refused command must leave alone: a folder with a file, a file, their parent."""
    root.mkdir(exist_ok=True)
    full = root / "full"
    full.mkdir(exist_ok=True)
    (full / "notes.txt").write_text("mine")
    (root / "notes.txt").write_text("mine")
    return {"full": full, "file": root / "notes.txt", "dir": root}


def refused_line(command, args, tmp_path, monkeypatch, capsys, paths: dict[str, Path]) -> str:
    """``difflab-<command> args`` in a fresh cwd, ``{name}`` in ``args`` filled from ``paths`` and
    user_files(): returns its one error line (asserting exit 2, one line, no traceback, no litter in the
    cwd and the user's files untouched)."""
    files = {**user_files(tmp_path / "inputs"), **paths}
    cwd = tmp_path / "cwd"
    cwd.mkdir(exist_ok=True)
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit) as e:
        command.main([a.format(**files) for a in args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("difflab: error:")]
    assert len(errors) == 1, err
    assert "Traceback" not in err, err
    assert list(cwd.iterdir()) == [], list(cwd.iterdir())  # no run dir, out dir or temporary dir
    assert (files["full"] / "notes.txt").read_text() == "mine"
    assert files["file"].read_text() == "mine"
    return errors[0].format(**files)
