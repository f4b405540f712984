"""`difflab-train`: compose the Hydra config, build data/model/callbacks/loggers/trainer, fit.

difflab-train experiment=digits trainer.max_steps=50 data.batch_size=32
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Annotated

import lightning as L
from lightning.pytorch.callbacks import LearningRateMonitor
from omegaconf import DictConfig, OmegaConf
from torch.multiprocessing.spawn import ProcessRaisedException

from difflab.callbacks.divergence import DivergenceGuard
from difflab.callbacks.preemption import launcher_outlives_first_ctrl_c
from difflab.checkpoints import check_resume_compatible, resume_checkpoint
from difflab.cli import Command, instantiate, restore_stop_signals
from difflab.diffusion.sampling import sampler_problem, steps_problem
from difflab.errors import DifflabError
from difflab.launch import launch_problems, ranks_started_here
from difflab.loggers import finish_loggers
from difflab.precision import precision_problems
from difflab.rules import Above, AtLeast, Between, check_values
from difflab.run_record import RunRecord
from difflab.rundir import check_resume_settings, log_changed_settings, start_train_run
from difflab.sweeps import trial_value

log = logging.getLogger("difflab.train")


# numpy's seed range, which Lightning's seed_everything enforces only once the run has started.
Seed = Annotated[int, Between(0, 2**32 - 1)]


def settings(task_name: str, seed: Seed | None, ckpt_path: str | None, optimized_metric: str | None) -> None:
    """The top-level keys of conf/train.yaml (the start-up check reads these type hints)."""


# Ranges of library settings whose constructors declare only a type (Lightning's Trainer, torch's
# optimizers), so that a bad value is refused at start-up instead of failing or misbehaving later:
# torch refuses lr<0 only when the optimizer is built, and lr=0 or a negative clip train nothing.
LIBRARY_RULES = {
    "model.optimizer.lr": Annotated[float, Above(0)],
    "model.optimizer.weight_decay": Annotated[float, AtLeast(0)],
    "model.optimizer.eps": Annotated[float, Above(0)],
    "trainer.accumulate_grad_batches": Annotated[int, AtLeast(1)],
    "trainer.gradient_clip_val": Annotated[float, Above(0)] | None,
    "trainer.log_every_n_steps": Annotated[int, AtLeast(1)],
    "trainer.num_nodes": Annotated[int, AtLeast(1)],
}


def length_problems(trainer: DictConfig) -> list[str]:
    """A run has an end: max_steps >= 1, or -1 with max_epochs >= 1 (the LR schedule spans it)."""
    steps, epochs = trainer.get("max_steps"), trainer.get("max_epochs")
    if not isinstance(steps, int) or steps >= 1:
        return []
    if steps != -1:
        return [f"trainer.max_steps={steps} must be at least 1 (or -1 to train trainer.max_epochs epochs)"]
    if isinstance(epochs, int) and epochs >= 1:
        return []
    return [
        f"trainer.max_steps=-1 trains trainer.max_epochs epochs, and trainer.max_epochs={epochs} sets "
        "no end; give trainer.max_steps=N or trainer.max_epochs=N (N >= 1)"
    ]


def cross_group_problems(cfg: DictConfig) -> list[str]:
    """The start-up checks that span config groups (each group's own values are its constructors'
    rules, checked from their signatures): image size vs UNet depth, precision vs hardware, a
    callback's sampler vs the model's objective and schedule, immiscible noise vs the batch size."""
    problems = list(check_values(cfg, LIBRARY_RULES)) + length_problems(cfg.trainer)
    unet = cfg.model.get("unet")
    if not isinstance(unet, DictConfig):
        problems.append(f"model.unet={unet!r} is not a UNet preset; choose one with model/unet=NAME")
    else:
        depth = len(unet.block_out_channels) - 1
        res = cfg.data.resolution
        if res % (2**depth):
            problems.append(
                f"data.resolution={res} must be divisible by {2**depth} for a UNet with "
                f"{depth + 1} blocks (model.unet.block_out_channels)"
            )
    problems += precision_problems(str(cfg.trainer.get("precision")), str(cfg.trainer.get("accelerator")))
    problems += launch_problems(cfg)
    schedule = OmegaConf.to_container(cfg.model.get("noise_scheduler") or DictConfig({}), resolve=True)
    for name, cb in (cfg.get("callbacks") or {}).items():
        why = (
            sampler_problem(cb.sampler, schedule) if isinstance(cb, DictConfig) and "sampler" in cb else None
        )
        if why:
            problems.append(f"callbacks.{name}.sampler={cb.sampler}: {why}")
        steps = cb.get("steps") if isinstance(cb, DictConfig) and "sampler" in cb else None
        if not why and isinstance(steps, int) and (too_many := steps_problem(cb.sampler, schedule, steps)):
            problems.append(f"callbacks.{name}.{too_many}")  # else NaN grids, or a crash when it samples
    if cfg.model.get("immiscible") and cfg.data.get("batch_size", 2) < 2:
        problems.append(
            f"model.immiscible=true pairs the noise to the images of a batch and data.batch_size="
            f"{cfg.data.batch_size} leaves nothing to pair; use data.batch_size>=2 or model.immiscible=false"
        )
    return problems


def instantiate_group(group: DictConfig | None) -> list:
    """Instantiate every entry of a dict-of-configs group (callbacks, logger); null entries are off."""
    if not group:
        return []
    return [instantiate(c) for c in group.values() if isinstance(c, DictConfig) and "_target_" in c]


def train(cfg: DictConfig) -> float | None:
    """Train one run and return ``cfg.optimized_metric`` (for sweepers), or None if it was not logged.
    ``cfg`` passed COMMAND's start-up checks (the console script runs them before Hydra starts)."""
    if cfg.get("seed") is not None:  # `is not None`: seed=0 is a seed
        L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    log.info("run dir: %s", output_dir)
    resume = resume_checkpoint(cfg.get("ckpt_path"), output_dir)
    ckpt_path = resume[0] if resume else None

    # Callbacks and loggers first: the cheap objects whose constructors can still refuse (a missing
    # Inception file) before the model is built.
    loggers = instantiate_group(cfg.get("logger"))
    # The divergence guard is not a choice (without it a NaN run would write NaN checkpoints), and it
    # comes first: its step-end check must stop a NaN run before the FID or grid callbacks sample it.
    callbacks = [DivergenceGuard(), *instantiate_group(cfg.get("callbacks"))]
    datamodule = instantiate(cfg.data)
    # A resume's weights come from its checkpoint: model.init_from (a new run's start) is not read,
    # so a resume still works after its source run was deleted.
    model = instantiate(cfg.model, **({"init_from": None} if resume is not None else {}))
    # Set after instantiation: passed to instantiate, the `_target_`s inside would be built too.
    resolved = OmegaConf.to_container(cfg, resolve=True)
    model.run_config = resolved
    if resume is not None:
        check_resume_compatible(
            resume[1], dict(model.unet.config), dict(model.noise_scheduler.config), ckpt_path
        )
        # Also checked before Hydra started (rundir.start_train_run); here for in-process calls, and
        # to log what changed in the run's own log.
        saved = RunRecord.from_checkpoint(resume[1], ckpt_path).config
        log_changed_settings(check_resume_settings(saved, resolved, ckpt_path))
        log.info("resuming from %s", ckpt_path)
        resume = None  # release the loaded copy before Lightning loads the file again

    if not loggers:  # logger=none: Lightning refuses an LR monitor with nothing to log to
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    if trainer.is_global_zero:
        output_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, output_dir / "config.yaml", resolve=True)
    for logger in trainer.loggers:
        logger.log_hyperparams(resolved)

    restore_stop_signals()  # from here on SIGTERM is Lightning's and the preemption callback's
    try:
        with ranks_started_here(trainer), launcher_outlives_first_ctrl_c(trainer):
            trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    except ProcessRaisedException as e:  # a spawned DDP rank raised: its error text is all that returns
        found = re.search(r"^difflab\.errors\.DifflabError: (.*)$", str(e), flags=re.M)
        if found is None:
            raise
        raise DifflabError(found[1]) from None
    finally:
        finish_loggers(trainer.loggers)

    metric = trainer.callback_metrics.get(cfg.get("optimized_metric") or "")
    return float(metric) if metric is not None else None


def train_or_trial(cfg: DictConfig) -> float | None:
    """``train``; in an Optuna sweep a failed trial is reported to the study, not the end of it."""
    return trial_value(train, cfg)


COMMAND = Command(
    "train",
    train_or_trial,
    settings,
    cross_group_problems,
    start=start_train_run,
    start_files=("config.yaml",),
)


def main(argv: list[str] | None = None) -> None:
    COMMAND.main(argv)


if __name__ == "__main__":
    main()
