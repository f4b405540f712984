"""A process that imports difflab's dependencies once and forks a fresh copy of itself per command.

Why: a console script spends ~4.5 s of its life importing torch, Lightning, diffusers and Hydra
(`python -X importtime -c "import difflab.train"`), longer than most test commands then run, and the
suite runs over a hundred of them (kill -9 resumes, signals, README lines). A child forked from
this server starts with those modules already imported and nothing else: no test has run in it,
no torch op has run in it (so no OpenMP pool is forked), no Hydra config is set. It then becomes
the command exactly as the installed script would run it: its own session (as
`start_new_session=True`), its working directory, environment, `sys.argv[0]` the console script
(so Lightning's DDP launcher re-runs the real script for the other ranks), stdout/stderr to files,
`main()`, and the interpreter's exit up to its atexit handlers and flushed streams (see
`exit_as_python_would` for the teardown it skips). What it cannot give: a per-command hash seed
(children share the server's `PYTHONHASHSEED`), import-time failures (imports happened once, in the
server) and module teardown. `tests/test_cli.py` and `tests/test_package.py`
run real interpreters for those; `DIFFLAB_TEST_FRESH_PROCESSES=1` makes every command one.

Protocol, one Unix-socket connection per command: the client sends one JSON line (command, args,
cwd, env, stdout and stderr paths); the server answers with one JSON line {"pid": ...} once the
child exists, and one {"returncode": ...} when it has exited (negative: killed by that signal,
as `subprocess` reports it).

Run as a script (`python tests/forkserver.py SOCKET`), never with -m: Lightning's launcher re-runs
`sys.argv[0]` for a script `__main__` but `python -m <module>` for a module one.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import json
import os
import random
import signal
import socket
import sys
import threading
import traceback
from importlib.metadata import entry_points

# Imported once here; each child would otherwise import them again (the entry points import most
# of them; the rest are imported lazily by commands the tests run often).
PRELOAD = (
    "difflab.data.datamodule",
    "difflab.diffusion.module",
    "difflab.metrics.fid",
    "diffusers.optimization",
    "sklearn.datasets",  # the digits data set
    "hydra_plugins.hydra_optuna_sweeper",
    "hydra_plugins.hydra_submitit_launcher",
)


def _scripts() -> dict[str, object]:
    """difflab's console scripts (``difflab-train`` -> ``difflab.train:main``), loaded."""
    scripts = entry_points(group="console_scripts")
    return {ep.name: ep.load() for ep in scripts if ep.name.startswith("difflab-")}


def _report(conn: socket.socket, pid: int) -> None:
    """Waits for child ``pid`` and sends its exit status as ``subprocess`` spells it."""
    _, status = os.waitpid(pid, 0)
    code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
    try:
        conn.sendall(json.dumps({"returncode": code}).encode() + b"\n")
    finally:
        conn.close()


def serve(path: str) -> tuple[object, dict]:
    """Accepts commands forever; returns only in a forked child: its entry point and request."""
    for name in PRELOAD:
        importlib.import_module(name)
    scripts = _scripts()
    assert threading.active_count() == 1, "a preloaded module started a thread: forking would lose it"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(16)
    print("ready", flush=True)
    while True:
        conn, _ = server.accept()
        request = json.loads(conn.makefile("rb").readline())
        pid = os.fork()
        if pid == 0:
            server.close()
            conn.close()
            return scripts[request["command"]], request
        conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
        threading.Thread(target=_report, args=(conn, pid), daemon=True).start()


def become(request: dict) -> None:
    """Turns this forked child into the command's process (see the module docstring)."""
    os.setsid()
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    for fd, name in ((0, os.devnull), (1, request["stdout"]), (2, request["stderr"])):
        f = os.open(name, os.O_RDONLY if fd == 0 else os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(f, fd)
        os.close(f)
    sys.argv = [request["script"], *request["args"]]
    sys.path[0] = os.path.dirname(request["script"])  # the script's folder, as for the real script
    sys.modules["__main__"].__file__ = request["script"]  # what multiprocessing's spawn re-imports
    random.seed()  # a fresh interpreter seeds from the OS; the fork copied the server's state
    import numpy as np
    import torch

    np.random.seed()
    if "OMP_NUM_THREADS" in request["env"]:  # OpenMP read the variable when the server loaded it
        torch.set_num_threads(int(request["env"]["OMP_NUM_THREADS"]))


def exit_as_python_would(main) -> None:
    """Runs ``main`` and ends the process as the interpreter would, up to the module teardown: that
    teardown writes to every object the fork shares with the server, copying most of its ~1 GB of
    pages, which took ~1.8 s of each command's ~2-3 s here. What runs at a real exit still runs:
    non-daemon threads are joined, atexit handlers (logging, multiprocessing, weakref.finalize, ...)
    run, the streams are flushed, and the status is the one ``python script`` would exit with."""
    interrupted = False
    try:
        status = main()
    except SystemExit as e:
        status = e.code
    except KeyboardInterrupt:
        traceback.print_exc()
        status, interrupted = 1, True
    except BaseException:
        traceback.print_exc()
        status = 1
    if status is not None and not isinstance(status, int):
        print(status, file=sys.stderr)
        status = 1
    threading._shutdown()  # what the interpreter does first at exit: waits for non-daemon threads
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    if interrupted:  # as CPython: an uncaught KeyboardInterrupt ends the process by SIGINT
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit((status or 0) & 0xFF)


if __name__ == "__main__":
    main, request = serve(sys.argv[1])
    become(request)
    exit_as_python_would(main)
