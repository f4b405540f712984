"""DDP on CPU (gloo), precision, multiruns, sweeps, SLURM config, wandb offline, preemption, atomic saves."""

from __future__ import annotations

import csv
import signal
import subprocess
import time
from pathlib import Path

import hydra
import pytest
import torch

from difflab.checkpoints import AtomicCheckpointIO, find_last_checkpoint, load_checkpoint
from difflab.train import train
from tests.conftest import FAST, FAST_DIGITS
from tests.helpers import BIN, difflab_cli


def cli(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return difflab_cli("train", *args, cwd=cwd, timeout=timeout)


def losses(run: Path) -> list[float]:
    with open(run / "csv" / "metrics.csv") as f:
        return [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]


def test_ddp_cpu_two_ranks(make_cfg, tmp_path):
    run = tmp_path / "ddp"
    cfg = make_cfg(
        *FAST,
        "trainer=ddp_cpu",
        "trainer.devices=2",
        "trainer.max_steps=30",
        "data.batch_size=32",
        "logger=csv",
        "trainer.log_every_n_steps=5",
        "callbacks.sample_grid.every_n_steps=15",
        "callbacks.sample_grid.num_images=4",
        "callbacks.sample_grid.steps=2",
        "+callbacks.dump._target_=tests.helpers.DumpRankState",
        f"+callbacks.dump.path={tmp_path / 'dump'}",
        run_dir=run,
    )
    train(cfg)
    r0, r1 = (torch.load(tmp_path / "dump" / f"rank{r}.pt") for r in (0, 1))
    assert r0["world_size"] == 2
    # Disjoint shards within each epoch (28 images/step globally: 1,797 // 64 = 28 steps an epoch).
    epoch0 = [{h for batch in r["seen"][:28] for h in batch} for r in (r0, r1)]
    assert len(epoch0[0]) > 850 and len(epoch0[0] & epoch0[1]) <= 2  # (digits holds a few duplicate images)
    # EMA weights identical on every rank, each rank updating its own copy.
    assert not r0["ema_shared"] and not r1["ema_shared"]
    for a, b in zip(r0["ema"], r1["ema"], strict=True):
        assert torch.equal(a, b)
    # Files written once, by rank 0.
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step_0000015.png", "step_0000030.png"]
    assert (run / "checkpoints" / "last.ckpt").is_file()
    ckpt = load_checkpoint(run / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 30
    # Same global batch on one process reaches a comparable loss.
    single = tmp_path / "single"
    train(
        make_cfg(
            *FAST_DIGITS,
            "trainer.max_steps=30",
            "data.batch_size=64",
            "logger=csv",
            "trainer.log_every_n_steps=5",
            run_dir=single,
        )
    )
    two, one = sum(losses(run)[-3:]) / 3, sum(losses(single)[-3:]) / 3
    assert 0.6 < two / one < 1.6, (two, one)


def test_bf16_mixed_on_cpu_trains(make_cfg, tmp_path):
    run = tmp_path / "bf16"
    train(make_cfg(*FAST_DIGITS, "trainer.precision=bf16-mixed", "trainer.max_steps=5", run_dir=run))
    ckpt = load_checkpoint(run / "checkpoints" / "last.ckpt")
    assert all(v.dtype == torch.float32 for v in ckpt["state_dict"].values())  # mixed: fp32 master weights
    assert ckpt["global_step"] == 5
    # Lightning cannot clip a fused optimizer's gradients under mixed precision: foreach is used.
    group = ckpt["optimizer_states"][0]["param_groups"][0]
    assert not group["fused"] and group["foreach"] is True


@pytest.mark.parametrize("trainer", ["cpu", "ddp_cpu"])  # the template's users report DDP + multirun breaks
def test_multirun_gives_each_job_its_own_dir(tmp_path, trainer):
    sweep = tmp_path / "sweep"
    p = cli(
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
    p = cli(*args, "hydra.sweeper.n_trials=2", cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    study = optuna.load_study(
        study_name="difflab_train", storage=f"sqlite:///{tmp_path / 'logs' / 'optuna.db'}"
    )
    assert len(study.trials) == 2 and all(t.value is not None and t.value > 0 for t in study.trials)
    p = cli(*args, "hydra.sweeper.n_trials=1", cwd=tmp_path)  # the same study continues: 3 trials in all
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


def test_wandb_offline_fallback_and_same_run_on_resume(make_cfg, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "")
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc login
    run = tmp_path / "run"
    args = (
        *FAST,
        "logger=wandb",
        "trainer.log_every_n_steps=2",
        "callbacks.sample_grid.num_images=4",
        "callbacks.sample_grid.steps=2",
        "callbacks.sample_grid.every_n_steps=4",
    )
    train(make_cfg(*args, "trainer.max_steps=4", run_dir=run))
    run_id = (run / "wandb_run_id.txt").read_text().strip()
    first = list((run / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(first) == 1
    records = wandb_history(first[0])
    assert any("train/loss" in r for r in records)
    grids = [r for r in records if r.get("samples/grid/_type") == "images/separated"]
    assert len(grids) == 1 and grids[0]["trainer/global_step"] == 4
    assert (first[0] / "files" / grids[0]["samples/grid/filenames"][0]).is_file()
    config = wandb_config(first[0])  # the resolved config, logged as hyperparameters
    assert config["model"]["noise_scheduler"]["prediction_type"] == "epsilon"
    assert config["data"]["batch_size"] == 64 and config["seed"] == 42
    time.sleep(1.1)  # wandb names offline folders to the second: a resume within it would share one
    cfg = make_cfg(*args, "trainer.max_steps=8", run_dir=run)  # ckpt_path=last: resume this run dir
    train(cfg)
    assert (run / "wandb_run_id.txt").read_text().strip() == run_id
    assert len(list((run / "wandb").glob(f"offline-run-*-{run_id}"))) == 2  # `wandb sync` merges them


def wandb_records(path: Path) -> list[bytes]:
    """The records of a .wandb file: a 7-byte header, then LevelDB-log framing in 32 KiB blocks
    (crc32, little-endian length, type FULL/FIRST/MIDDLE/LAST). wandb 0.31 ships no Python reader."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, out, pending = 7, 32768, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            out.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            out.append(pending + chunk)
    return out


def wandb_config(run_dir: Path) -> dict:
    import json

    from wandb.proto import wandb_internal_pb2

    config = {}
    for data in wandb_records(next(run_dir.glob("*.wandb"))):
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(data)
        if rec.WhichOneof("record_type") == "config":
            config.update({item.key: json.loads(item.value_json) for item in rec.config.update})
    return config


def wandb_history(run_dir: Path) -> list[dict]:
    """Decode the history rows of an offline wandb run from its .wandb transaction log."""
    import json

    from wandb.proto import wandb_internal_pb2

    rows = []
    for data in wandb_records(next(run_dir.glob("*.wandb"))):
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(data)
        if rec.WhichOneof("record_type") == "history":
            rows.append(
                {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json)
                    for item in rec.history.item
                }
            )
    return rows


def test_atomic_checkpoint_write_never_corrupts(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)

    def crash(obj, f, *a, **k):
        f.write(b"partial garbage")
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 1  # the previous checkpoint is intact


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    t0 = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() - t0 < timeout
        time.sleep(0.2)


def final_weights(run: Path) -> list[torch.Tensor]:
    ckpt = load_checkpoint(run / "checkpoints" / "last.ckpt")
    return [v for _, v in sorted(ckpt["state_dict"].items())] + list(ckpt["ema"]["shadow_params"])


ARGS = (
    "experiment=digits",
    "trainer.max_steps=60",
    "callbacks.model_checkpoint.every_n_train_steps=10",
    "callbacks.sample_grid=null",
    "data.flip=true",
    "trainer.log_every_n_steps=5",
)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_run_resumes_to_the_uninterrupted_weights(tmp_path, sig):
    straight = tmp_path / "straight"
    assert cli(*ARGS, f"hydra.run.dir={straight}", cwd=tmp_path).returncode == 0
    run = tmp_path / "killed"
    proc = subprocess.Popen(
        [str(BIN / "difflab-train"), *ARGS, f"hydra.run.dir={run}"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for(run / "checkpoints" / "step_0000010.ckpt", proc)
    proc.send_signal(sig)
    code = proc.wait(timeout=120)
    # SIGKILL may land between the step checkpoint and last.ckpt: resume takes the newest either way.
    step = load_checkpoint(find_last_checkpoint(run))["global_step"]
    if sig == signal.SIGTERM:
        assert code == 0 and 10 <= step < 60  # saved at the next step boundary, exited cleanly
    else:
        assert code == -9 and step < 60
    p = cli(*ARGS, f"hydra.run.dir={run}", cwd=tmp_path)  # ckpt_path=last by default
    assert p.returncode == 0, p.stderr[-3000:]
    assert load_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == 60
    for a, b in zip(final_weights(straight), final_weights(run), strict=True):
        assert (a - b).abs().max() <= 1e-6
