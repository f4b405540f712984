"""How a training job's processes start: checks of the launch at start-up (devices, SLURM, torchrun,
the submitit launcher) and the ranks Lightning's subprocess launcher starts for ``strategy=ddp``."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, ListConfig, OmegaConf

from difflab.errors import DifflabError
from difflab.rundir import JOB_VARIABLE, pass_job_to_ranks

# Strategies whose ranks Lightning starts by running the command line again (its subprocess launcher).
_RERUN_STRATEGIES = ("ddp", "ddp_find_unused_parameters_true", "ddp_find_unused_parameters_false")


def _wanted_devices(trainer: DictConfig) -> int | None:
    """How many devices ``trainer.devices`` asks for per node (None: all there are, or unknown)."""
    devices = trainer.get("devices")
    if isinstance(devices, ListConfig | list):
        return len(devices)
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    return devices if isinstance(devices, int) and devices > 0 else None


def _on_gpu(accelerator: str) -> bool:
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def launch_problems(cfg: DictConfig) -> list[str]:
    """Start-up problems of how ``cfg``'s job would be launched, one line each; Lightning finds them
    only once the run dir exists and the ranks are waiting for each other."""
    trainer = cfg.trainer
    accelerator = str(trainer.get("accelerator"))
    wanted = _wanted_devices(trainer)
    problems = []
    # No CUDA at all is refused by precision_problems (trainer=gpu without CUDA).
    if _on_gpu(accelerator) and torch.cuda.is_available() and wanted is not None:
        have = torch.cuda.device_count()
        if wanted > have:
            problems.append(
                f"trainer.devices={trainer.devices} asks for {wanted} GPUs and this machine has {have}; "
                f"give trainer.devices={have} (or -1 for all of them)"
            )
    problems += _slurm_problems(trainer, wanted)
    problems += _torchrun_problems(cfg)
    problems += _submitit_problems(cfg, wanted)
    return problems


def _slurm_problems(trainer: DictConfig, wanted: int | None) -> list[str]:
    from lightning.fabric.plugins.environments import SLURMEnvironment

    if not SLURMEnvironment.detect():
        return []
    problems = []
    nodes, num_nodes = os.environ.get("SLURM_NNODES"), trainer.get("num_nodes")
    if nodes is not None and str(num_nodes) != nodes:
        problems.append(
            f"trainer.num_nodes={num_nodes} and this SLURM job runs on {nodes} nodes (SLURM_NNODES); "
            f"give trainer.num_nodes={nodes} (or srun/sbatch --nodes={num_nodes})"
        )
    per_node = os.environ.get("SLURM_NTASKS_PER_NODE")
    if per_node is not None and wanted is not None and str(wanted) != per_node:
        problems.append(
            f"trainer.devices={trainer.devices} and this SLURM job starts {per_node} tasks per node "
            f"(SLURM_NTASKS_PER_NODE), one per device; give trainer.devices={per_node} (or "
            f"--ntasks-per-node={wanted})"
        )
    return problems


def _torchrun_problems(cfg: DictConfig) -> list[str]:
    env = os.environ
    if env.get("TORCHELASTIC_RUN_ID") != "none" or env.get("LOCAL_WORLD_SIZE") == env.get("WORLD_SIZE"):
        return []
    given = [str(o) for o in OmegaConf.select(cfg, "hydra.overrides.hydra", default=None) or []]
    if any(o.startswith(("hydra.run.dir=", "hydra.sweep.dir=")) for o in given):
        return []
    # config.launcher_job_name: nothing else the ranks of every node share names the job.
    return [
        "torchrun on several nodes without --rdzv-id: the ranks cannot agree on a run dir; give "
        "torchrun --rdzv-id=<job id>, or hydra.run.dir=<a dir every node shares>"
    ]


def _submitit_problems(cfg: DictConfig, wanted: int | None) -> list[str]:
    target = str(OmegaConf.select(cfg, "hydra.launcher._target_", default="") or "")
    strategy = str(cfg.trainer.get("strategy"))
    tasks = OmegaConf.select(cfg, "hydra.launcher.tasks_per_node", default=1) or 1
    if target.endswith("submitit_launcher.LocalLauncher") and int(tasks) > 1:
        # Its tasks set only SUBMITIT_LOCAL_* variables, which Lightning does not read as ranks:
        # each task would train the whole job alone, all of them into one run dir.
        return [
            f"hydra.launcher.tasks_per_node={tasks}: the tasks of hydra/launcher=submitit_local are not "
            "ranks Lightning joins (each would train the job alone); use hydra.launcher.tasks_per_node=1 "
            "with trainer.devices=N (trainer=ddp_cpu on CPU), or hydra/launcher=slurm"
        ]
    many = wanted is None or wanted > 1
    if (
        not target.endswith("submitit_launcher.LocalLauncher")
        or strategy not in _RERUN_STRATEGIES
        or not many
    ):
        return []
    return [
        f"trainer.strategy={strategy} starts each further rank by running the command line again, and "
        "a job of hydra/launcher=submitit_local has none to run; use trainer.devices=1, or "
        "trainer.strategy=ddp_spawn, or run without the submitit launcher"
    ]


# Hydra overrides that say how the sweep ran, not what its job is: a rank does not pass them on.
_SWEEP_ONLY = (
    "hydra.run.",
    "hydra.sweep.",
    "hydra.mode",
    "hydra.launcher",
    "hydra/launcher",
    "hydra.sweeper",
    "hydra/sweeper",
)

# What Lightning's subprocess launcher sets in its own process for the ranks it starts, and leaves set.
_LAUNCH_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", JOB_VARIABLE)


def _started_by_difflab_train() -> bool:
    """This process's command line, the one Lightning reruns for each rank, is difflab-train's (not
    pytest's or a notebook's): Lightning reruns ``python -m <__main__'s module>`` or ``sys.argv[0]``."""
    import __main__

    spec = getattr(__main__, "__spec__", None)
    if spec is not None:
        return spec.name == "difflab.train"
    return Path(sys.argv[0]).name == "difflab-train"


@contextmanager
def ranks_started_here(trainer: L.Trainer) -> Iterator[None]:
    """Around ``fit``: where Lightning's subprocess launcher (strategy=ddp) will start the other local
    ranks by running this command line again, they join this job (rundir.pass_job_to_ranks), and
    afterwards this process is again one that starts ranks: the next job of a -m sweep would otherwise
    find LOCAL_RANK set, take itself for a rank someone else started, start none and wait on the last
    job's process group. Called in-process (no Hydra) the command line is the caller's: one line."""
    # Lightning's launcher class is private; which launcher the strategy chose is not said otherwise.
    from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

    launcher: Any = getattr(trainer.strategy, "launcher", None)
    if (
        not isinstance(launcher, _SubprocessScriptLauncher)
        or launcher.cluster_environment.creates_processes_externally  # torchrun, srun, a started rank
        or launcher.num_processes < 2
    ):
        yield
        return
    if not HydraConfig.initialized() or not _started_by_difflab_train():
        raise DifflabError(
            "Lightning's ddp strategy (trainer=ddp, ddp_cpu) starts each further rank by running "
            "the command line again, and this process was not started by difflab-train; run "
            "difflab-train, or use trainer=ddp_spawn_cpu (trainer.strategy=ddp_spawn) when calling "
            "train in-process"
        )
    before = {k: os.environ.get(k) for k in _LAUNCH_VARIABLES}
    hydra_cfg = HydraConfig.get()
    # The job's own overrides and the user's Hydra settings (logging), not how the sweep ran.
    kept = [o for o in hydra_cfg.overrides.hydra if not o.startswith(_SWEEP_ONLY)]
    pass_job_to_ranks(hydra_cfg.runtime.output_dir, [*hydra_cfg.overrides.task, *kept])
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
