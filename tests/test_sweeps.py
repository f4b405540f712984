"""Multiruns, Optuna sweeps (resumable) and the SLURM launcher config."""

from __future__ import annotations

import json
import math

import hydra
import pytest
from omegaconf import OmegaConf

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


# A trial's cheap FID: a few steps, 40 samples at 2 sampler steps against 200 real digits, a 1-epoch
# classifier (the sweep's own defaults are 1,000 samples at 10 steps).
CHEAP_TRIAL = (
    "hparams_search=optuna",
    "experiment=digits",
    "trainer.max_steps=3",
    "trainer.log_every_n_steps=1",
    "callbacks.sample_grid=null",
    "callbacks.fid.num_samples=40",
    "callbacks.fid.num_real=200",
    "callbacks.fid.steps=2",
    "callbacks.fid.batch_size=40",
    "metrics.extractor.epochs=1",
)


def _study(tmp_path):
    import optuna

    storage = f"sqlite:///{tmp_path / 'logs' / 'optuna.db'}"
    return optuna.load_study(study_name="difflab_train", storage=storage)


def _last_fid(run_dir) -> dict:
    return json.loads((run_dir / "fid.jsonl").read_text().splitlines()[-1])


def test_optuna_trials_return_the_end_of_trial_fid_and_a_diverging_trial_does_not_stop_the_study(tmp_path):
    import optuna

    # Three queued learning rates (one subprocess for both checks: a sweep's start-up is most of its
    # time): the first turns the loss to NaN (the divergence guard's error), then two ordinary trials.
    (tmp_path / "logs").mkdir()
    storage = f"sqlite:///{tmp_path / 'logs' / 'optuna.db'}"
    study = optuna.create_study(study_name="difflab_train", storage=storage, direction="minimize")
    for lr in (1e30, 0.002, 0.001):
        study.enqueue_trial({"model.optimizer.lr": lr})
    p = train_cli(
        *CHEAP_TRIAL,
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.params={model.optimizer.lr:'choice(1e30,0.002,0.001)'}",
        f"paths.log_dir={tmp_path / 'logs'}",
        cwd=tmp_path,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    trials = _study(tmp_path).trials
    assert [(t.state.name, t.params["model.optimizer.lr"]) for t in trials] == [
        ("FAIL", 1e30),
        ("COMPLETE", 0.002),
        ("COMPLETE", 0.001),
    ]
    assert "Failed experiment: training diverged: the loss became NaN/Inf" in p.stdout + p.stderr
    (sweep,) = (tmp_path / "logs" / "multiruns").iterdir()
    for t in trials[1:]:
        fid = _last_fid(sweep / str(t.number))
        # the value is the FID the callback measured at the last step (not the loss), on the training
        # images here (digits has no test split), and KID was measured beside it
        assert fid["step"] == 3 and math.isfinite(t.value) and t.value > 0
        assert t.value == pytest.approx(fid["val/fid_classifier_40"], rel=1e-6)
        assert "val/kid_classifier_40" in fid and fid["reference"].startswith("sklearn-digits")
        # the flow objective's own knobs reached the job, with the shared ones
        ran = OmegaConf.load(sweep / str(t.number) / "config.yaml")
        assert ran.model.noise_scheduler.shift == pytest.approx(t.params["model.noise_scheduler.shift"])
        assert ran.model.noise_levels.logit_std == pytest.approx(t.params["model.noise_levels.logit_std"])
        assert ran.model.optimizer.lr == t.params["model.optimizer.lr"]
        assert "model.min_snr_gamma" not in t.params
    assert trials[1].value != trials[2].value


def test_trial_failures_become_trial_failed_with_their_reason(make_cfg):
    from difflab.errors import DifflabError
    from difflab.sweeps import TrialFailed, in_optuna_trial, trial_value

    cfg = make_cfg("hparams_search=optuna", "experiment=digits")  # sets Hydra's config, as a trial has it
    assert in_optuna_trial()

    def raises(e: BaseException):
        def run(cfg):
            raise e

        return run

    with pytest.raises(TrialFailed, match=r"^training diverged"):
        trial_value(raises(DifflabError("training diverged: the loss became NaN/Inf")), cfg)
    with pytest.raises(TrialFailed, match=r"^RuntimeError: boom \(traceback in this trial's log\)"):
        trial_value(raises(RuntimeError("boom")), cfg)
    with pytest.raises(TrialFailed, match=r"optimized_metric=val/fid_classifier_1k was not logged"):
        trial_value(lambda cfg: None, cfg)
    with pytest.raises(TrialFailed, match=r"optimized_metric=val/fid_classifier_1k is nan"):
        trial_value(lambda cfg: float("nan"), cfg)
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C still ends the study
        trial_value(raises(KeyboardInterrupt()), cfg)
    assert trial_value(lambda cfg: 3.5, cfg) == 3.5


def test_each_objective_searches_its_own_knobs(make_cfg):
    import optuna

    from difflab.sweeps import objective_knobs

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study()
    found = {}
    for model in ("flow", "ddpm"):
        cfg = make_cfg("hparams_search=optuna", f"model={model}")
        trial = study.ask()
        objective_knobs(cfg, trial)
        found[model] = set(trial.params)
    assert found == {
        "flow": {
            "model.noise_levels.logit_mean",
            "model.noise_levels.logit_std",
            "model.noise_scheduler.shift",
        },
        "ddpm": {"model.min_snr_gamma"},
    }


def test_fid_reference_is_the_held_out_split_where_the_data_has_one(make_cfg, tmp_path):
    from difflab.errors import DifflabError
    from difflab.train import train
    from tests.conftest import FAST_DIGITS

    fid = ["callbacks=with_fid", "callbacks.best_fid_checkpoint=null", "callbacks.fid.every_n_steps=0"]
    fid += ["callbacks.fid.num_samples=20", "callbacks.fid.num_real=100", "callbacks.fid.steps=2"]
    fid += ["callbacks.fid.batch_size=20", "metrics.extractor.epochs=1", "trainer.max_steps=2"]
    fashion = ["data=fashion_mnist", "data.source.max_items=256", "data.resolution=8"]
    for name, data, split in [("f", fashion, "auto"), ("d", [], "auto")]:
        overrides = [*FAST_DIGITS, *data, *fid, f"callbacks.fid.real_split={split}"]
        train(make_cfg(*overrides, run_dir=tmp_path / name))
    assert _last_fid(tmp_path / "f")["reference"].startswith("fashion-mnist:test:")
    assert _last_fid(tmp_path / "d")["reference"].startswith("sklearn-digits")
    cfg = make_cfg(*FAST_DIGITS, *fid, "callbacks.fid.real_split=test", run_dir=tmp_path / "t")
    with pytest.raises(DifflabError, match=r"^callbacks.fid.real_split=test: the data source .* no splits"):
        train(cfg)


def test_slurm_launcher_config_composes_and_instantiates(make_cfg, tmp_path):
    from difflab.compose import compose

    cfg = compose(
        "train",
        ["hydra/launcher=slurm", "trainer=multinode", "trainer.num_nodes=3", "hydra.launcher.partition=gpu"],
    )
    launcher_cfg = cfg.hydra.launcher
    assert launcher_cfg.nodes == 3 and launcher_cfg.tasks_per_node == 8 and launcher_cfg.partition == "gpu"
    launcher = hydra.utils.instantiate(launcher_cfg)
    assert type(launcher).__name__ == "SlurmLauncher"
    assert cfg.trainer.strategy == "ddp" and cfg.trainer.num_nodes == 3
