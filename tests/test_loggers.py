"""wandb offline fallback and one wandb run across a resume."""

from __future__ import annotations

import time
from pathlib import Path

from difflab.train import train
from tests.conftest import FAST


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
    assert config["model"]["noise_scheduler"]["num_train_timesteps"] == 1000
    assert config["data"]["batch_size"] == 64 and config["seed"] == 42
    time.sleep(1.1)  # wandb names offline folders to the second: a resume within it would share one
    cfg = make_cfg(*args, "trainer.max_steps=8", run_dir=run)  # ckpt_path=last: resume this run dir
    train(cfg)
    assert (run / "wandb_run_id.txt").read_text().strip() == run_id
    assert len(list((run / "wandb").glob(f"offline-run-*-{run_id}"))) == 2  # `wandb sync` merges them


def wandb_records(path: Path, timeout: float = 60.0) -> list:
    """The records of a finished offline run's .wandb file, once it ends with the run's exit record:
    wandb's service writes the file on its own thread and may still be flushing it when finish()
    returns (seen once in CI: a read met half a record). The file: a 7-byte header, then
    LevelDB-log framing in 32 KiB blocks (crc32, little-endian length, type FULL/FIRST/MIDDLE/LAST).
    wandb 0.31 ships no Python reader."""
    from wandb.proto import wandb_internal_pb2

    deadline = time.monotonic() + timeout
    while True:
        data = path.read_bytes()
        assert data[:4] == b":W&B"
        pos, block, chunks, pending = 7, 32768, [], b""
        while pos + 7 <= len(data):
            if block - pos % block < 7:
                pos += block - pos % block
                continue
            length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
            if pos + 7 + length > len(data):
                break  # the record being written
            chunk = data[pos + 7 : pos + 7 + length]
            pos += 7 + length
            if kind == 1:
                chunks.append(chunk)
            elif kind == 2:
                pending = chunk
            elif kind == 3:
                pending += chunk
            elif kind == 4:
                chunks.append(pending + chunk)
        records = [wandb_internal_pb2.Record.FromString(chunk) for chunk in chunks]
        if records and records[-1].WhichOneof("record_type") == "exit":
            return records
        assert time.monotonic() < deadline, f"{path} has no exit record {timeout} s after the run finished"
        time.sleep(0.2)


def wandb_config(run_dir: Path) -> dict:
    import json

    config = {}
    for rec in wandb_records(next(run_dir.glob("*.wandb"))):
        if rec.WhichOneof("record_type") == "config":
            config.update({item.key: json.loads(item.value_json) for item in rec.config.update})
    return config


def wandb_history(run_dir: Path) -> list[dict]:
    """Decode the history rows of an offline wandb run from its .wandb transaction log."""
    import json

    rows = []
    for rec in wandb_records(next(run_dir.glob("*.wandb"))):
        if rec.WhichOneof("record_type") == "history":
            rows.append(
                {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json)
                    for item in rec.history.item
                }
            )
    return rows
