"""Optuna sweeps: rerunnable (the sampler continues a stored study instead of replaying it), trials that
fail are reported to the study instead of ending it, and knobs that exist only for one objective."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig

from difflab.errors import DifflabError

log = logging.getLogger("difflab.sweeps")

OPTUNA_SWEEPER = "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"


class TrialFailed(Exception):
    """One Optuna trial failed (diverged, refused a setting, logged no metric). Not a DifflabError on
    purpose: Hydra catches it in the job and the Optuna sweeper marks the trial FAIL and logs this line
    ("Failed experiment: ..."), where a DifflabError would exit the process and end the whole study."""


def study_seed(seed: int | None, storage: str, study_name: str) -> int | None:
    """``seed`` + the number of trials the stored study already holds (the config's sampler seed).

    With a fixed seed, rerunning the same command (which continues the same SQLite study) would make
    the sampler replay its first suggestions: the random start-up trials of the second invocation
    repeat those of the first. Offsetting by the stored trial count keeps a sweep reproducible (the
    same study history gives the same suggestions) and makes every invocation propose new points.
    """
    if seed is None:
        return None
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        done = len(optuna.load_study(study_name=study_name, storage=storage).trials)
    except KeyError:  # no such study yet: the sweeper creates it
        done = 0
    return int(seed) + done


def in_optuna_trial() -> bool:
    """Whether this process runs a job of a ``hparams_search=optuna`` sweep."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return False
    hydra_cfg = HydraConfig.get()
    return hydra_cfg.mode == RunMode.MULTIRUN and hydra_cfg.sweeper.get("_target_") == OPTUNA_SWEEPER


def trial_value(run: Callable[[DictConfig], float | None], cfg: DictConfig) -> float | None:
    """``run(cfg)``'s value; in an Optuna trial, a failure (an error, the divergence guard, no metric,
    a non-finite metric) becomes TrialFailed with its reason, so the study records a FAIL and goes on
    (conf/hparams_search/optuna.yaml sets the sweeper's max_failure_rate to let it)."""
    if not in_optuna_trial():
        return run(cfg)
    name = cfg.get("optimized_metric")
    try:
        value = run(cfg)
    except (DifflabError, FloatingPointError) as e:
        log.error("trial failed: %s", e)
        raise TrialFailed(str(e)) from None
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C, preemption: the study stops, as a run would
        raise
    except Exception as e:  # a bug: its traceback goes to the trial's log, one line to the sweeper
        log.exception("trial failed")
        raise TrialFailed(f"{type(e).__name__}: {e} (traceback in this trial's log)") from None
    if value is None:
        why = (
            f"optimized_metric={name} was not logged by this trial; the FID callback logs it at the "
            "last step (keep callbacks.fid, and end the run with trainer.max_steps)"
        )
        log.error("trial failed: %s", why)
        raise TrialFailed(why)
    if not math.isfinite(value):
        why = f"optimized_metric={name} is {value} (the trial's model produced non-finite images)"
        log.error("trial failed: %s", why)
        raise TrialFailed(why)
    return value


def objective_knobs(cfg: DictConfig, trial: Any) -> None:
    """The sweeper's custom_search_space: suggests ``objective_params.<objective>`` (the knobs of the
    run's objective, flow or ddpm, in the sweeper's ``params`` syntax), parsed by the sweeper's own
    parser; the sweeper passes them to the job as overrides, as it does ``params``."""
    from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides

    from difflab.diffusion.noise import objective_of

    objective = objective_of(cfg.model.get("noise_scheduler") or {})
    knobs = (cfg.get("objective_params") or {}).get(objective) or {}
    space, fixed = create_params_from_overrides([f"{k}={v}" for k, v in knobs.items()])
    for name, distribution in space.items():
        trial._suggest(name, distribution)  # what the sweeper does with each of `params`
    for name, value in fixed.items():  # a plain value: a one-choice knob, so it still reaches the job
        trial.suggest_categorical(name, [value])
