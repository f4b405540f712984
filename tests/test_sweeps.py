"""Multiruns, Optuna sweeps (resumable) and the SLURM launcher config."""

from __future__ import annotations

import hydra
import pytest

from difflab.checkpoints import load_checkpoint
from tests.helpers import train_cli


# The template's users report DDP + multirun breaks; ddp_cpu in the default suite: test_launchers.py.
@pytest.mark.parametrize("trainer", ["cpu", pytest.param("ddp_cpu", marks=pytest.mark.slow)])
def test_multirun_gives_each_job_its_own_dir(tmp_path, trainer):
    sweep = tmp_path / "sweep"
    p = train_cli(
        "-m",
        "experiment=digits",
        f"trainer={trainer}",
        "trainer.max_steps=3",
        "seed=1,2",
        "callbacks.sample_grid=null",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    ckpts = [load_checkpoint(sweep / job / "checkpoints" / "last.ckpt") for job in ("0", "1")]
    assert [c["global_step"] for c in ckpts] == [3, 3]
    assert {c["difflab"]["config"]["seed"] for c in ckpts} == {1, 2}


def test_optuna_search_runs_and_resumes(tmp_path):
    import optuna

    args = (
        "hparams_search=optuna",
        "experiment=digits",
        "trainer.max_steps=3",
        "callbacks.sample_grid=null",
        f"paths.log_dir={tmp_path / 'logs'}",
        "trainer.log_every_n_steps=1",
    )
    p = train_cli(*args, "hydra.sweeper.n_trials=2", cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    study = optuna.load_study(
        study_name="difflab_train", storage=f"sqlite:///{tmp_path / 'logs' / 'optuna.db'}"
    )
    assert len(study.trials) == 2 and all(t.value is not None and t.value > 0 for t in study.trials)
    p = train_cli(
        *args, "hydra.sweeper.n_trials=1", cwd=tmp_path
    )  # the same study continues: 3 trials in all
    assert p.returncode == 0, p.stderr[-3000:]
    assert (
        len(
            optuna.load_study(
                study_name="difflab_train", storage=f"sqlite:///{tmp_path / 'logs' / 'optuna.db'}"
            ).trials
        )
        == 3
    )


def test_slurm_launcher_config_composes_and_instantiates(make_cfg, tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from difflab.cli import register_resolvers
    from difflab.config import CONF_DIR

    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                "hydra/launcher=slurm",
                "trainer=multinode",
                "trainer.num_nodes=3",
                "hydra.launcher.partition=gpu",
            ],
            return_hydra_config=True,
        )
    launcher_cfg = cfg.hydra.launcher
    assert launcher_cfg.nodes == 3 and launcher_cfg.tasks_per_node == 8 and launcher_cfg.partition == "gpu"
    launcher = hydra.utils.instantiate(launcher_cfg)
    assert type(launcher).__name__ == "SlurmLauncher"
    assert cfg.trainer.strategy == "ddp" and cfg.trainer.num_nodes == 3
