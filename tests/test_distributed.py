"""DDP on CPU (gloo, two spawned ranks, in-process) and mixed precision on CPU; the launch paths
(trainer=ddp_cpu under difflab-train, torchrun, SLURM, submitit) are in test_launchers.py."""

from __future__ import annotations

import csv
from pathlib import Path

import torch

from difflab.checkpoints import load_checkpoint
from difflab.train import train
from tests.conftest import FAST, FAST_DIGITS


def losses(run: Path) -> list[float]:
    with open(run / "csv" / "metrics.csv") as f:
        return [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]


def test_ddp_cpu_two_ranks(make_cfg, tmp_path):
    run = tmp_path / "ddp"
    cfg = make_cfg(
        *FAST,
        "trainer=ddp_spawn_cpu",  # in-process: trainer=ddp_cpu's ranks rerun difflab-train's command line
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


def test_a_spawned_rank_adds_into_its_own_loss_window():
    # ddp_spawn hands each worker the module in shared memory: a shared window summed every rank's
    # losses into one and logged N times the loss (test_ddp_cpu_two_ranks' ratio, intermittently).
    from difflab.diffusion.loss_window import LossWindow

    window = LossWindow(1000)
    received = [window.loss_sum.share_memory_(), window.q_sum.share_memory_(), window.q_count.share_memory_()]
    window.unshare()
    window.add(torch.tensor(2.0), torch.tensor([1.0, 3.0]), torch.tensor([10, 900]))
    assert all(float(t.sum()) == 0 for t in received)  # the shared copies stay untouched
    assert float(window.means()["train/loss"]) == 2.0
