"""`difflab-train`: compose the Hydra config, build data/model/callbacks/loggers/trainer, fit.

difflab-train experiment=digits trainer.max_steps=50 data.batch_size=32
"""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from lightning.pytorch.callbacks import LearningRateMonitor
from omegaconf import DictConfig, OmegaConf
from torch.multiprocessing.spawn import ProcessRaisedException

from difflab.checkpoints import check_resume_compatible, resume_checkpoint
from difflab.config import CONF_DIR, print_error_and_exit, register_resolvers, rewrite_group_aliases, validate
from difflab.errors import DifflabError
from difflab.loggers import finish_loggers

log = logging.getLogger("difflab.train")


def instantiate(config: DictConfig, **kwargs: object) -> object:
    """``hydra.utils.instantiate``, with a DifflabError from a constructor passed on as itself: Hydra
    wraps it in "Error in call to target ..." lines, and the user should read one line."""
    try:
        return hydra.utils.instantiate(config, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        while cause is not None and not isinstance(cause, DifflabError):
            cause = cause.__cause__
        if cause is None:
            raise
        raise cause from None


def instantiate_group(group: DictConfig | None) -> list:
    """Instantiate every entry of a dict-of-configs group (callbacks, logger); null entries are off."""
    if not group:
        return []
    return [instantiate(c) for c in group.values() if isinstance(c, DictConfig) and "_target_" in c]


def train(cfg: DictConfig) -> float | None:
    """Train one run and return ``cfg.optimized_metric`` (for sweepers), or None if it was not logged."""
    validate(cfg)
    if cfg.get("seed") is not None:  # `is not None`: seed=0 is a seed
        L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    resume = resume_checkpoint(cfg.get("ckpt_path"), output_dir)
    ckpt_path = resume[0] if resume else None

    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    # Set after instantiation: passed to instantiate, the `_target_`s inside would be built too.
    resolved = OmegaConf.to_container(cfg, resolve=True)
    model.run_config = resolved
    if resume is not None:
        check_resume_compatible(
            resume[1], dict(model.unet.config), dict(model.noise_scheduler.config), ckpt_path
        )
        log.info("resuming from %s", ckpt_path)
        resume = None  # release the loaded copy before Lightning loads the file again

    loggers = instantiate_group(cfg.get("logger"))
    callbacks = instantiate_group(cfg.get("callbacks"))
    if not loggers:  # logger=none: Lightning refuses an LR monitor with nothing to log to
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    if trainer.is_global_zero:
        output_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, output_dir / "config.yaml", resolve=True)
    for logger in trainer.loggers:
        logger.log_hyperparams(resolved)

    try:
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


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def _hydra_main(cfg: DictConfig) -> float | None:
    try:
        return train(cfg)
    except DifflabError as e:
        print_error_and_exit(e)
    finally:
        if HydraConfig.initialized():
            log.info("run dir: %s", HydraConfig.get().runtime.output_dir)
    return None


def main() -> None:
    register_resolvers()
    sys.argv = rewrite_group_aliases(sys.argv)
    _hydra_main()


if __name__ == "__main__":
    main()
