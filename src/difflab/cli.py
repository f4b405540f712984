"""The one way every difflab command runs: a Hydra app over conf/, checked before anything happens.

difflab-train, -sample, -eval and -export are each a `Command`: Hydra's own --help, --cfg, tab
completion, -m sweeps and overrides. Before Hydra creates a run dir, `preflight` composes the same
config (once per value of every sweep) and checks it against the constructors' signatures
(rules.py) and the command's cross-group rules, so a typo, a wrong type, a bad value or a missing
file is one line naming the key and exit status 2. Errors found later (an unreadable checkpoint)
are one line too, and a run dir holding nothing but Hydra's own files is removed.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf, open_dict

from difflab import config
from difflab.compose import compose, register_resolvers, rewrite_group_aliases
from difflab.config import CONF_DIR
from difflab.errors import DifflabError
from difflab.rules import check_arguments, config_problems, missing_keys
from difflab.rundir import launched_rank_args

# Hydra flags that print or complete instead of running: nothing to check first.
_NO_RUN_FLAGS = ("help", "hydra_help", "version", "cfg", "info", "shell_completion", "resolve")


def quiet_third_party_noise() -> None:
    """Lines printed at every start that say nothing about this run, silenced so that the first lines
    a user reads are difflab's: Lightning's pytree check deprecated by torch 2.14, Lightning's
    advertisement for its cloud logger, and LitData's set-up notes."""
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    logging.getLogger("litdata").setLevel(logging.WARNING)
    tips = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if _not_a_tip not in tips.filters:  # once per process, however many commands run in it
        tips.addFilter(_not_a_tip)


def _not_a_tip(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("💡 Tip")


def print_error_and_exit(e: Exception | str) -> None:
    print(f"difflab: error: {e}", file=sys.stderr)
    raise SystemExit(2)


# What a user does about a file system error, by errno (the OS's own words say what went wrong).
_OS_ADVICE = {
    errno.ENOSPC: "free space there and rerun",
    errno.EDQUOT: "free space (disk quota exceeded) and rerun",
    errno.EROFS: "choose a path on a writable file system",
    errno.EACCES: "choose a path you may write to, or fix its permissions",
    errno.EPERM: "choose a path you may write to, or fix its permissions",
    errno.ENOTDIR: "a part of the path is a file, not a directory; choose another path",
    errno.EISDIR: "give a file, not a directory",
    errno.EEXIST: "move it away or choose another path",
    errno.ENOENT: "check the path (a directory in it does not exist)",
    errno.ENAMETOOLONG: "choose a shorter path",
    errno.ELOOP: "the path holds a symbolic link loop; choose another path",
    errno.EMFILE: "too many open files; raise the limit (ulimit -n) or use fewer data workers",
    errno.ENFILE: "too many open files on this machine; close some and rerun",
    errno.EIO: "the device reported an I/O error; check the disk or choose another path",
}


def os_error_line(e: OSError) -> str | None:
    """One line for an OSError a user's paths, disk or network caused (None: not one of those, so
    a bug keeps its traceback). ``OSError`` covers files and sockets alike: the filename or the
    kind (connection, timeout) says which."""
    advice = _OS_ADVICE.get(e.errno or -1)
    what = e.strerror or str(e) or type(e).__name__
    if e.filename is not None:
        where = f"{e.filename}" + (f" -> {e.filename2}" if e.filename2 is not None else "")
        return f"{where}: {what}; {advice or 'check the path and rerun'}"
    if advice is not None and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EMFILE, errno.ENFILE):
        return f"{what}; {advice}"  # a write to an open file: the OS does not say which file
    if isinstance(e, (ConnectionError, TimeoutError)) or type(e).__module__.startswith(
        ("requests", "urllib")
    ):
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return f"network error: {first}; check the connection (or work offline) and rerun"
    return None


def instantiate(config: DictConfig, **kwargs: object) -> Any:
    """``hydra.utils.instantiate`` with a constructor's error as one line naming the config key: Hydra
    wraps it in "Error in call to target ..." lines. A DifflabError passes on as itself."""
    try:
        return hydra.utils.instantiate(config, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        while cause is not None and not isinstance(cause, DifflabError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        key = re.search(r"full_key: (\S+)", str(e))
        first = str(e.__cause__ or e).strip().splitlines()[0] if str(e.__cause__ or e).strip() else repr(e)
        where = key[1] if key else str(config.get("_target_", "config"))
        raise DifflabError(f"{where}: {first}") from e


@dataclass
class Command:
    """One entry point: ``conf/<name>.yaml``, the function that runs it, and the rules to check first.

    ``settings``: a callable whose typed keyword parameters are the config's top-level keys (a
    command's function itself, or a signature-only function); ``checks``: problems spanning groups.
    """

    name: str
    run: Callable[[DictConfig], Any]
    settings: Callable[..., Any]
    checks: Callable[[DictConfig], list[str]] | None = None
    # ``out`` is Hydra's job dir (one per sweep job); False where ``out`` may be remote (prepare).
    out_is_run_dir: bool = True
    # Files the command writes into its run dir before its work begins (train's config.yaml): with
    # only these and Hydra's own there, a failed start removes the dir.
    start_files: tuple[str, ...] = ()
    # Claims a single run's dir before Hydra writes into it (train: its lock, a resume's settings);
    # without it, the run dir is only checked to be writable.
    start: Callable[[DictConfig], None] | None = None

    def problems(self, cfg: DictConfig) -> list[str]:
        """Every start-up problem of a composed config, one line each (empty: good to go)."""
        missing = missing_keys(cfg)
        if missing:
            return [f"{k} is required (give {k}=...)" for k in missing]
        found = list(check_arguments(self.settings, cfg, "", skip=self._groups(cfg), complete=True))
        found += [p for p in config_problems(cfg) if p not in found]
        if not found and self.checks is not None:
            found = self.checks(cfg)
        return list(dict.fromkeys(found))  # an interpolated key (seed) is reported once

    def call(self, overrides: list[str]) -> Any:
        """Run in this process, as ``difflab-<name> <overrides>`` would, without Hydra's run dir
        (tests, notebooks and scripts)."""
        return self.run(compose_command(self, overrides))

    def check(self, cfg: DictConfig) -> None:
        """Raise one DifflabError line listing every start-up problem of ``cfg``."""
        problems = self.problems(cfg)
        if problems:
            raise DifflabError("; ".join(problems))

    def _groups(self, cfg: DictConfig) -> list[str]:
        """Top-level keys that hold config groups (data, paths, ...), not settings of the command;
        config_problems checks the objects among them."""
        import inspect

        params = inspect.signature(self.settings).parameters
        return [str(k) for k in cfg if isinstance(cfg._get_node(k), DictConfig) and k not in params]

    def main(self, argv: list[str] | None = None) -> Any:
        """The console script: check the command line, then hand it to Hydra."""
        register_resolvers()
        quiet_third_party_noise()
        args = rewrite_group_aliases(sys.argv[1:] if argv is None else list(argv))
        args = launched_rank_args(args)
        named_here = config.UNIQUE_VARIABLE not in os.environ
        if named_here:
            os.environ[config.UNIQUE_VARIABLE] = config.unique_suffix()
        argv_before = list(sys.argv)
        try:
            stop_signals_interrupt()
            preflight(self, args)
            sys.argv = [sys.argv[0], *args]  # hydra.main reads the command line from sys.argv
            return self._hydra_main()
        except DifflabError as e:
            print_error_and_exit(e)
        except KeyboardInterrupt as e:  # before Hydra's run dir exists, or after app() has cleaned up
            print_error_and_exit(f"{_interrupted(e)}; nothing was written")
        except OSError as e:
            if (line := os_error_line(e)) is None:
                raise
            print_error_and_exit(line)
        finally:
            from difflab.rundir import release_locks

            sys.argv[:] = argv_before  # an in-process call (tests, notebooks) leaves the caller's
            restore_stop_signals()
            release_locks()  # the run is over (matters when called in-process: tests, notebooks)
            # The next command in this process (a test, a notebook) names a sweep of its own.
            config.own_suffix.cache_clear()
            if named_here:
                os.environ.pop(config.UNIQUE_VARIABLE, None)
        return None

    def _hydra_main(self) -> Any:
        @hydra.main(version_base="1.3", config_path=CONF_DIR, config_name=self.name)
        def app(cfg: DictConfig) -> Any:
            if "out" in cfg and self.out_is_run_dir:
                # The job's own output dir: ``out`` in a single run, ``out/<overrides>`` for each job
                # of a -m sweep (conf/hydra/command.yaml).
                cfg.out = HydraConfig.get().runtime.output_dir
            # Hydra prints any exception of this function as a traceback: every one a user's input
            # causes becomes one line here (a bug, any other exception, keeps its traceback).
            try:
                return self.run(cfg)
            except DifflabError as e:
                self._fail(str(e))
            except OSError as e:
                if (line := os_error_line(e)) is None:
                    raise
                self._fail(line)
            except KeyboardInterrupt as e:
                self._fail(_interrupted(e), interrupted=True)
            return None

        return app()

    def _fail(self, line: str, interrupted: bool = False) -> None:
        """Print ``line`` as the one error line (exit 2); a run dir holding only Hydra's files goes."""
        out = Path(HydraConfig.get().runtime.output_dir)
        removed = self.out_is_run_dir and _remove_if_only_hydra_files(out, self.start_files)
        if interrupted and self.out_is_run_dir:  # elsewhere ``out`` is not this run's (prepare: ".")
            kept = not removed and out.is_dir() and any(out.iterdir())
            line += f"; what was written so far is in {out}" if kept else "; nothing was written"
        print_error_and_exit(line)


# `kill <pid>` and a closed terminal stop a command as Ctrl-C does (one line, the run dir cleaned up)
# instead of killing it mid-write; training hands them back first (see restore_stop_signals).
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
_previous_handlers: dict[int, Any] = {}


class Stopped(KeyboardInterrupt):
    """A stop signal, raised where the command was (as Python raises KeyboardInterrupt for Ctrl-C)."""


def _raise_stopped(signum: int, frame: object) -> None:
    raise Stopped(signal.Signals(signum).name)


def _interrupted(e: KeyboardInterrupt) -> str:
    return f"stopped by {e.args[0]}" if isinstance(e, Stopped) and e.args else "interrupted"


def stop_signals_interrupt() -> None:
    """SIGTERM and SIGHUP raise ``Stopped`` until ``restore_stop_signals`` (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in _STOP_SIGNALS:
        _previous_handlers.setdefault(sig, signal.getsignal(sig))
        signal.signal(sig, _raise_stopped)


def restore_stop_signals() -> None:
    """The handlers from before ``stop_signals_interrupt``: Lightning installs its own SIGTERM handling
    for training only where none is set, and the preemption callback saves a checkpoint on it."""
    for sig, previous in _previous_handlers.items():
        signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
    _previous_handlers.clear()


def keywords(fn: Callable[..., Any], cfg: DictConfig) -> dict[str, Any]:
    """``cfg``'s top-level settings as ``fn``'s keyword arguments, object configs instantiated."""
    import inspect

    names = [n for n in inspect.signature(fn).parameters if n in cfg]
    return {n: instantiate(cfg[n], _convert_="all") if _is_node(cfg, n) else cfg[n] for n in names}


def _is_node(cfg: DictConfig, key: str) -> bool:
    value = cfg[key]
    return isinstance(value, DictConfig) or OmegaConf.is_list(value)


def _remove_if_only_hydra_files(run_dir: Path, start_files: tuple[str, ...] = ()) -> bool:
    """A run that failed before writing anything leaves no dir behind (only Hydra's own files there,
    the run dir's lock and the command's ``start_files``); True if it was removed."""
    from difflab.rundir import LOCK_NAME

    own = {".hydra", f"{HydraConfig.get().job.name}.log", LOCK_NAME, *start_files}
    if not run_dir.is_dir() or any(p.name not in own for p in run_dir.iterdir()):
        return False
    shutil.rmtree(run_dir, ignore_errors=True)
    cwd = Path.cwd().resolve()
    parent = run_dir.resolve().parent
    while parent != cwd and cwd in parent.parents and not any(parent.iterdir()):
        parent.rmdir()  # logs/runs made for this run alone
        parent = parent.parent
    return True


# ---------------------------------------------------------------------------------------- preflight
def preflight(command: Command, args: list[str]) -> None:
    """Compose the command line's config (each value of each sweep) and raise one DifflabError with
    every problem, before Hydra creates a run dir; flags that only print (--help, --cfg) pass."""
    from hydra._internal.utils import get_args_parser  # the parser hydra.main itself uses

    parsed, _ = get_args_parser().parse_known_args(args)
    if any(getattr(parsed, flag, None) for flag in _NO_RUN_FLAGS):
        return
    if parsed.config_path or parsed.config_dir or parsed.config_name:
        return  # another config tree: Hydra reports its own errors
    # A fresh process has no Hydra run config yet; one left by an earlier run in this process (a test, a
    # notebook) would resolve ${hydra:runtime.output_dir} to its stale value (null after a compose).
    HydraConfig.instance().cfg = None
    problems: list[str] = []
    multirun = bool(parsed.multirun)
    for i, overrides in enumerate(sweep_variants(parsed.overrides)):
        try:
            cfg = compose(command.name, overrides)
        except DifflabError as e:
            problems.append(str(e))
            break
        if i == 0:
            # -m, or a config that sweeps by itself (hparams_search=optuna sets hydra.mode).
            multirun |= str(OmegaConf.select(cfg, "hydra.mode")) == "RunMode.MULTIRUN"
            if not multirun:
                _refuse_sweeps(parsed.overrides)
        problems += [p for p in command.problems(cfg) if p not in problems]
    if problems:
        raise DifflabError("; ".join(problems))
    _check_run_dir(command, cfg, multirun=multirun)


def _refuse_sweeps(overrides: list[str]) -> None:
    """A comma in a single run's value makes it a list of runs (Hydra's sweep syntax), most often in a
    path: say how to quote it instead of reporting each piece as a missing path."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for o in OverridesParser.create().parse_overrides(overrides):
        if o.is_sweep_override():
            key, value = o.get_key_element(), o.input_line.partition("=")[2]
            raise DifflabError(
                f"{key}={value} is a list of values (a sweep, run with -m); for one value holding a "
                f"comma, quote it: '{key}=\"{value}\"'"
            )


def _check_run_dir(command: Command, cfg: DictConfig, multirun: bool) -> None:
    """The dir Hydra is about to write can be written (else one line naming the key, before Hydra
    fails with a traceback), and a single run's ``command.start`` claims it."""
    from omegaconf.errors import OmegaConfBaseException

    from difflab.rundir import make_writable_dir, remove_dirs

    if not multirun and command.start is not None:
        command.start(cfg)
        return
    if not command.out_is_run_dir:
        return
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    try:
        where = OmegaConf.select(cfg, key)
    except OmegaConfBaseException:
        return  # resolved only at run time: Hydra reports it
    if where:
        user_key = "out" if "out" in cfg and str(cfg.out) == str(where) else key
        remove_dirs(make_writable_dir(Path(str(where)), user_key))  # Hydra creates it again at once


def sweep_variants(overrides: list[str]) -> Iterator[list[str]]:
    """The overrides with each sweep (``a=1,2``) replaced by one of its values: the first of every sweep,
    then each further value of each sweep in turn. Sweeps that cannot be listed (Optuna's
    ``interval``) keep the config's value."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as e:  # a syntax error: Hydra's message, first line
        raise DifflabError(f"cannot parse the command line: {str(e).strip().splitlines()[0]}") from None
    fixed: list[str] = []
    sweeps: list[tuple[str, list[str]]] = []
    for o in parsed:
        if not o.is_sweep_override():
            fixed.append(o.input_line)
            continue
        try:
            values = list(o.sweep_string_iterator())
        except Exception:
            continue
        sweeps.append((o.get_key_element(), values))
    first = [f"{k}={v[0]}" for k, v in sweeps if v]
    yield fixed + first
    for i, (key, values) in enumerate(sweeps):
        for value in values[1:]:
            yield fixed + first[:i] + [f"{key}={value}"] + first[i + 1 :]


def compose_command(command: Command, overrides: list[str]) -> DictConfig:
    """The config ``difflab-<name> <overrides>`` would run with, checked; without Hydra's own node.
    For tests and scripts that call a command in-process."""
    cfg = compose(command.name, rewrite_group_aliases(list(overrides)))
    command.check(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg
