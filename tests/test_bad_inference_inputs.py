"""Bad inputs to difflab-sample, -eval and -export that need a real checkpoint, a disk or a signal:
each ends in one line ``difflab: error: ...`` naming the key or file, exit status 2, no run dir
left behind and nothing of the user's lost (issue 27's traceback cases and their kind).

In this process through each command's console-script function, as tests/test_bad_command_lines.py
does. Each command's own failure paths (Ctrl-C, a full disk, kill -9, the Hub) are in test_sample.py,
test_evaluate.py and test_export.py."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from difflab.evaluate import COMMAND as EVAL
from difflab.export import COMMAND as EXPORT
from difflab.sample import COMMAND as SAMPLE
from tests.helpers import refused_line, user_files

SAMPLE_CASES = [
    (["ckpt={flow}", "out={file}"], "out={file} is an existing file; give a directory for sampled images"),
    (["ckpt={flow}", "out={full}"], "out={full} holds files that are not sampled images (notes.txt)"),
    (["ckpt={flow}", "out={file}/sub"], "is a file, not a directory; choose another out"),
    (
        ["ckpt={ddpm}", "sampler=ddim", "steps=100000"],
        "steps=100000 is more than the model's num_train_timesteps=1000",
    ),
    # dpmsolver++ ran on and wrote NaN (black) images past the training schedule.
    (["ckpt={ddpm}", "sampler=dpmsolver++", "steps=1001"], "give steps<=1000"),
    # diffusers failed with an IndexError / a bare AssertionError mid-sampling.
    (["ckpt={flow}", "sampler=dpmsolver++", "steps=100000"], "too many for the dpmsolver++ sampler"),
    (["ckpt={flow}", "sampler=unipc", "steps=400"], "give steps<=333, or sampler=flow_euler"),  # 333 ran
    (["ckpt={full}"], "is neither a checkpoint file nor an exported pipeline"),
    (["ckpt={truncated}"], "is truncated or corrupt"),
    (["ckpt={damaged}"], "{damaged} is a damaged exported pipeline (Unable to load weights"),
    (["ckpt={pipe}", "ema_std=0.05"], "ema_std=0.05 needs a training checkpoint"),
    (["ckpt={flow}", "ema_std=0.05"], "snapshot"),  # a standard-EMA run has no post-hoc snapshots
]

EVAL_CASES = [
    (["ckpt={flow}", "steps=[]"], "steps=[] is empty; give one value or a list of them"),
    (["ckpt={flow}", "sampler=[]"], "sampler=[] is empty"),
    (["ckpt={flow}", "ema_std=[]"], "ema_std=[] is empty"),
    (
        ["ckpt={ddpm}", "sampler=ddim", "steps=[10,100000]"],
        "steps=100000 is more than the model's num_train_timesteps=1000",
    ),
    (["ckpt={flow}", "sampler=[flow_euler,unipc]", "steps=[500]"], "too many for the unipc sampler"),
    (["ckpt={flow}", "metrics.cache_dir={file}/fid"], "metrics.cache_dir={file}/fid cannot be created"),
    (["ckpt={flow}", "real_split=test"], "real_split=test: the data source of"),
    (["ckpt={pipe}"], "is a directory, not a file"),
    (["ckpt={moved}"], "the training images of {moved} cannot be read (data.source.path="),
    (["ckpt={truncated}"], "is truncated or corrupt"),
    (["ckpt={flow}", "out={file}"], "is an existing file; give a directory for evaluation results"),
    (["ckpt={flow}", "out={full}"], "holds files that are not evaluation results (notes.txt)"),
]

EXPORT_CASES = [
    (["ckpt={flow}", "out={file}"], "is an existing file; give a directory for an exported pipeline"),
    (["ckpt={flow}", "out={file}/sub"], "is a file, not a directory"),
    (["ckpt={flow}", "out={full}"], "holds files that are not an exported pipeline (notes.txt)"),
    (["ckpt={pipe}", "out=x"], "is a directory, not a file"),
    (["ckpt={truncated}", "out=x"], "is truncated or corrupt"),
    (
        ["ckpt={flow}", "out=x", "push_to_hub=true", "hub_repo_id=my/model/v1"],
        "hub_repo_id=my/model/v1 is not a valid Hub repo id: Repo id must be in the form",
    ),
]


def _cases(command, cases):
    for args, message in cases:
        yield pytest.param(command, args, message, id=f"{command.name}: {' '.join(args)}")


@pytest.mark.parametrize(
    ("command", "args", "message"),
    [*_cases(SAMPLE, SAMPLE_CASES), *_cases(EVAL, EVAL_CASES), *_cases(EXPORT, EXPORT_CASES)],
)
def test_bad_input_is_one_line(command, args, message, ckpts, tmp_path, monkeypatch, capsys):
    line = refused_line(command, args, tmp_path, monkeypatch, capsys, ckpts)
    files = {**user_files(tmp_path / "inputs"), **ckpts}
    assert message.format(**files) in line, line
    assert len(line) < 400


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["model=ddpm", "callbacks.sample_grid.sampler=ddim", "callbacks.sample_grid.steps=2000"],
            "give steps<=1000",
        ),
        (
            ["callbacks.sample_grid.steps=600"],
            "callbacks.sample_grid.steps=600 is too many for the dpmsolver++ sampler on this flow model",
        ),
        (
            ["callbacks=with_fid", "callbacks.fid.sampler=unipc", "callbacks.fid.steps=400"],
            "callbacks.fid.steps=400 is too many for the unipc sampler",
        ),
    ],
)
def test_training_callbacks_steps_refused_at_start_up(args, message, tmp_path, monkeypatch, capsys):
    """The same rule for training's sample grids and FID: they crashed (or drew NaN grids) when they
    first sampled, after the training steps before them."""
    from difflab.train import COMMAND as TRAIN

    line = refused_line(TRAIN, ["experiment=digits", *args], tmp_path, monkeypatch, capsys, {})
    assert message in line, line


@pytest.mark.parametrize("command", [SAMPLE, EVAL, EXPORT], ids=["sample", "eval", "export"])
def test_unreadable_checkpoint_is_refused_at_start_up(command, ckpts, tmp_path, monkeypatch, capsys):
    """ckpt= a file behind chmod 000 was a PermissionError traceback from inside torch.load."""
    import difflab.files

    locked = tmp_path / "locked.ckpt"
    shutil.copy(ckpts["flow"], locked)
    locked.chmod(0)
    if os.geteuid() == 0:  # root reads any file: the check's own question is answered "no" instead
        real = os.access
        monkeypatch.setattr(
            difflab.files.os, "access", lambda p, mode: False if Path(p) == locked else real(p, mode)
        )
    extra = ["out=x"] if command is EXPORT else []
    line = refused_line(
        command, ["ckpt={locked}", *extra], tmp_path, monkeypatch, capsys, {**ckpts, "locked": locked}
    )
    assert f"ckpt={locked} cannot be read (permission denied); fix its permissions" in line


@pytest.mark.parametrize("command", [SAMPLE, EVAL], ids=["sample", "eval"])
def test_out_of_memory_names_batch_size(command, ckpts, tmp_path, monkeypatch, capsys):
    import difflab.diffusion.sampling
    import difflab.evaluate
    from difflab.metrics.features import ClassifierFeatures

    def too_big(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 96.00 GiB")

    monkeypatch.setattr(difflab.diffusion.sampling, "sample_batch", too_big)
    # eval's set-up (a feature classifier trained, real features) is not what this test is about
    monkeypatch.setattr(ClassifierFeatures, "prepare", lambda self, dm: None)
    monkeypatch.setattr(
        difflab.evaluate, "real_features", lambda dm, ext, *a: torch.zeros(4, ext.num_features)
    )
    steps = "steps=[2]" if command is EVAL else "steps=2"
    line = refused_line(
        command, ["ckpt={flow}", "batch_size=4096", steps], tmp_path, monkeypatch, capsys, ckpts
    )
    assert "out of memory sampling batches of 4096 images on cpu; give a smaller batch_size" in line
