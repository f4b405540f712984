"""The Hydra side of difflab: where configs live, custom resolvers, CLI aliases and start-up checks."""

from __future__ import annotations

import functools
import os
import secrets
import sys
import time
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from difflab.errors import DifflabError

# conf/ sits at the repository root (editable install); DIFFLAB_CONF_DIR points elsewhere if needed.
CONF_DIR = os.environ.get("DIFFLAB_CONF_DIR", str(Path(__file__).resolve().parents[2] / "conf"))

PRECISIONS = ("32-true", "32", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")


def new_run_dir(log_dir: str, ckpt_path: str | None = None) -> str:
    """A run directory: the checkpoint's own run when resuming from ``<run>/checkpoints/x.ckpt``,
    otherwise ``<log_dir>/runs/<time>_<random>`` (two runs started in the same second never collide)."""
    if ckpt_path and ckpt_path != "last":
        p = Path(ckpt_path).expanduser().resolve()
        if p.parent.name == "checkpoints":
            return str(p.parent.parent)
    if os.environ.get("SLURM_JOB_ID") and not os.environ.get("SLURM_ARRAY_TASK_ID"):
        # A requeued SLURM job keeps its job id: same run dir, so ckpt_path=last resumes it.
        return str(Path(log_dir) / "runs" / f"slurm_{os.environ['SLURM_JOB_ID']}")
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    while True:
        run = Path(log_dir) / "runs" / f"{stamp}_{secrets.token_hex(3)}"
        if not run.exists():
            return str(run)


@functools.cache
def unique_suffix() -> str:
    """`<time>_<random>`, fixed for the process: Hydra resolves a sweep dir more than once."""
    return f"{time.strftime('%Y-%m-%d_%H-%M-%S')}_{secrets.token_hex(3)}"


@functools.cache
def _run_dir_once(log_dir: str, ckpt_path: str | None) -> str:
    return new_run_dir(log_dir, ckpt_path)  # resolved more than once per process: same answer


def fid_metric_name(extractor_target: str, num_samples: int) -> str:
    """The logged FID key for an extractor class and sample count (for monitors and sweeps)."""
    import hydra.utils

    from difflab.metrics.fid import metric_name

    return metric_name(hydra.utils.get_class(extractor_target).name, int(num_samples))


def make_dir(path: str) -> str:
    """Create ``path`` (for files opened before any job runs, such as the Optuna SQLite study)."""
    Path(path).mkdir(parents=True, exist_ok=True)
    return path


def register_resolvers() -> None:
    from difflab.sweeps import study_seed  # imports optuna only when a sweep config resolves it

    if not OmegaConf.has_resolver("difflab_run_dir"):
        OmegaConf.register_new_resolver("difflab_run_dir", _run_dir_once)
        OmegaConf.register_new_resolver("difflab_unique", unique_suffix)
        OmegaConf.register_new_resolver("difflab_fid_name", fid_metric_name)
        OmegaConf.register_new_resolver("difflab_mkdir", make_dir)
        # The launch dir (hydra.job.chdir is false, so it stays the cwd); usable before HydraConfig is set.
        OmegaConf.register_new_resolver("difflab_cwd", os.getcwd)
        OmegaConf.register_new_resolver("difflab_study_seed", study_seed)


# `model.unet=tiny` reads naturally but Hydra selects groups with a slash; accept both spellings.
GROUP_ALIASES = {"model.unet": "model/unet"}


def rewrite_group_aliases(argv: list[str]) -> list[str]:
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key in GROUP_ALIASES and value and not value.startswith("{"):
            arg = f"{GROUP_ALIASES[key]}={value}"
        out.append(arg)
    return out


def _choice(cfg: DictConfig, key: str, allowed: tuple, errors: list[str]) -> None:
    value = OmegaConf.select(cfg, key, default=None)
    if value is not None and value not in allowed:
        errors.append(f"{key}={value!r} is not valid; allowed: {', '.join(map(str, allowed))}")


def _precision_errors(cfg: DictConfig) -> list[str]:
    """Precision the hardware cannot run, caught before any data is loaded."""
    import torch

    precision = str(cfg.trainer.get("precision"))
    accelerator = cfg.trainer.get("accelerator")
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        return [f"trainer.accelerator={accelerator} but no CUDA GPU is visible; use trainer=cpu or ddp_cpu"]
    if precision.startswith("16") and not on_gpu:
        return [
            f"trainer.precision={precision} needs a GPU (accelerator={accelerator}); "
            "on CPU use bf16-mixed or 32-true"
        ]
    if (
        precision.startswith("bf16")
        and on_gpu
        and torch.cuda.is_available()
        and not torch.cuda.is_bf16_supported()
    ):
        return [f"trainer.precision={precision}: this GPU has no bf16; use 16-mixed or 32-true"]
    return []


def validate(cfg: DictConfig) -> None:
    """Fail at start-up, naming the key and the allowed values, instead of deep inside a step."""
    from difflab.data.transforms import CROPS
    from difflab.diffusion.module import CHANNELS_LAST, LR_SCHEDULES
    from difflab.diffusion.noise import PREDICTION_TYPES
    from difflab.diffusion.sampling import SAMPLERS, sampler_problem

    errors: list[str] = []
    _choice(cfg, "data.channels", (1, 3), errors)
    _choice(cfg, "data.crop", CROPS, errors)
    _choice(cfg, "model.noise_scheduler.prediction_type", PREDICTION_TYPES, errors)
    _choice(cfg, "model.noise_scheduler.beta_schedule", BETA_SCHEDULES, errors)
    _choice(cfg, "model.lr_schedule", tuple(LR_SCHEDULES), errors)
    layout = OmegaConf.select(cfg, "model.channels_last", default=None)
    if layout is not None and layout not in CHANNELS_LAST:
        errors.append(f"model.channels_last={layout!r} is not valid; allowed: true, false, auto")
    _choice(cfg, "trainer.precision", PRECISIONS, errors)
    sched = OmegaConf.to_container(cfg.model.get("noise_scheduler") or DictConfig({}), resolve=True)
    for name, cb in (cfg.get("callbacks") or {}).items():
        if isinstance(cb, DictConfig) and "sampler" in cb:
            _choice(cfg, f"callbacks.{name}.sampler", tuple(SAMPLERS), errors)
            problem = sampler_problem(cb.sampler, sched) if cb.sampler in SAMPLERS else None
            if problem:
                errors.append(f"callbacks.{name}.sampler={cb.sampler}: {problem}")
    unet = cfg.model.get("unet")
    if not isinstance(unet, DictConfig):
        errors.append(f"model.unet={unet!r} is not a UNet preset; choose one with model/unet=NAME")
    else:
        depth = len(unet.block_out_channels) - 1
        res = cfg.data.resolution
        if res % (2**depth):
            errors.append(
                f"data.resolution={res} must be divisible by {2**depth} for a UNet with "
                f"{depth + 1} blocks (model.unet.block_out_channels)"
            )
    errors += _precision_errors(cfg)
    if errors:
        raise DifflabError("invalid config: " + "; ".join(errors))


def load_cli_config(name: str, argv: list[str]) -> DictConfig:
    """``conf/<name>.yaml`` merged with ``key=value`` arguments; unknown keys and missing values fail."""
    from omegaconf.errors import ConfigKeyError

    base = OmegaConf.load(Path(CONF_DIR) / f"{name}.yaml")
    OmegaConf.set_struct(base, True)
    bad = [a for a in argv if "=" not in a]
    if bad:
        raise DifflabError(f"arguments must be key=value, got {bad[0]!r}; keys: {', '.join(base.keys())}")
    try:
        cfg = OmegaConf.merge(base, OmegaConf.from_dotlist(argv))
    except ConfigKeyError as e:
        key = str(e).split("'")[1] if "'" in str(e) else str(e)
        raise DifflabError(
            f"unknown key {key!r} for difflab-{name}; keys: {', '.join(base.keys())}"
        ) from None
    missing = [key for key in cfg if OmegaConf.is_missing(cfg, key)]
    if missing:
        raise DifflabError(f"difflab-{name} needs {'=... '.join(missing)}=... (see conf/{name}.yaml)")
    return cfg


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DifflabError(f"device={name} but no CUDA device is visible; use device=cpu")
    return name


def run_command(name: str, command: Callable[[DictConfig], str], argv: list[str] | None = None) -> None:
    """Entry point of a key=value command: config from conf/<name>.yaml + argv, one-line errors."""
    try:
        print(command(load_cli_config(name, sys.argv[1:] if argv is None else argv)))
    except DifflabError as e:
        print_error_and_exit(e)


def print_error_and_exit(e: Exception) -> None:
    print(f"difflab: error: {e}", file=sys.stderr)
    raise SystemExit(2)
