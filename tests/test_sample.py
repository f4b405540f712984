"""difflab-sample: images that depend on the seed and their index only, whole under Ctrl-C and a full disk,
one line for bad input (its table of one-line refusals: test_bad_inference_inputs.py; the samplers
themselves: test_sampling.py; from an export: test_export.py)."""

from __future__ import annotations

import errno
import logging

import numpy as np
import pytest
from PIL import Image

from difflab.errors import DifflabError
from difflab.sample import COMMAND as SAMPLE
from tests.helpers import refused_line


def sample(**kw) -> list:
    """`difflab-sample k=v ...`, in this process."""
    return SAMPLE.call([f"{k}={v}" for k, v in kw.items()])


def test_sample_command_writes_pngs_and_grid_batch_independent(ckpts, tmp_path):
    paths = sample(ckpt=ckpts["flow"], num_images=5, out=tmp_path / "a", batch_size=5, steps=5)
    sample(ckpt=ckpts["flow"], num_images=5, out=tmp_path / "b", batch_size=2, steps=5)
    assert [p.name for p in paths] == [f"{i}.png" for i in range(5)]
    assert (tmp_path / "a" / "grid.png").is_file()
    for i in range(5):
        a = np.asarray(Image.open(tmp_path / "a" / f"{i}.png")).astype(int)
        b = np.asarray(Image.open(tmp_path / "b" / f"{i}.png")).astype(int)
        assert a.shape == (8, 8, 3) and np.abs(a - b).max() <= 1
    # channels_last (the default) is a speed setting only: NCHW weights give the same images.
    sample(ckpt=ckpts["flow"], num_images=5, out=tmp_path / "c", steps=5, channels_last="false")
    for i in range(5):
        a = np.asarray(Image.open(tmp_path / "a" / f"{i}.png")).astype(int)
        c = np.asarray(Image.open(tmp_path / "c" / f"{i}.png")).astype(int)
        assert np.abs(a - c).max() <= 1


def test_sample_command_bad_input(ckpts, tmp_path):
    with pytest.raises(DifflabError, match="num_images=0 must be at least 1"):
        sample(ckpt=ckpts["flow"], num_images=0, out=tmp_path)
    with pytest.raises(DifflabError, match="sampler=lms2 is not valid; allowed: ddpm"):
        sample(ckpt=ckpts["flow"], sampler="lms2", out=tmp_path)
    with pytest.raises(DifflabError, match=r"missing\.ckpt does not exist"):
        sample(ckpt=tmp_path / "missing.ckpt", out=tmp_path)
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(
        DifflabError, match="is not a difflab checkpoint: it is not a PyTorch checkpoint file"
    ):
        sample(ckpt=junk, out=tmp_path / "s")  # not tmp_path itself: it holds junk.ckpt, refused as out
    with pytest.raises(DifflabError, match="unknown key num_imgs; did you mean num_images"):
        sample(ckpt=ckpts["flow"], num_imgs=3)
    with pytest.raises(DifflabError, match=r"ckpt is required \(give ckpt=...\)"):
        sample()


def test_a_sweep_with_one_bad_steps_value_is_refused_before_any_job_runs(
    ckpts, tmp_path, monkeypatch, capsys
):
    args = ["-m", "ckpt={ddpm}", "sampler=ddim", "steps=2,100000", "num_images=1", "out=sweep"]
    line = refused_line(SAMPLE, args, tmp_path, monkeypatch, capsys, ckpts)
    assert "steps=100000 is more than the model's num_train_timesteps=1000" in line  # no job's dir left


def test_ctrl_c_while_sampling_keeps_whole_images(ckpts, tmp_path, monkeypatch, capsys):
    """Ctrl-C in difflab-sample was a 93-line traceback; the images written so far stay, whole."""
    import difflab.sample

    real, calls = difflab.sample.sample_images, []

    def interrupted(*args, **kwargs):
        for batch in real(*args, **kwargs):
            calls.append(batch)
            if len(calls) == 2:
                raise KeyboardInterrupt
            yield batch

    monkeypatch.setattr(difflab.sample, "sample_images", interrupted)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        SAMPLE.main([f"ckpt={ckpts['flow']}", f"out={out}", "num_images=4", "batch_size=2", "steps=2"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == f"difflab: error: interrupted; what was written so far is in {out}"
    assert sorted(p.name for p in out.iterdir()) == ["0.png", "1.png"]  # no temporary files


def test_full_disk_while_sampling_is_one_line(ckpts, tmp_path, monkeypatch, capsys):
    import difflab.sample

    def no_space(img, f, format=None):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(difflab.sample, "save_image", no_space)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        SAMPLE.main([f"ckpt={ckpts['flow']}", f"out={out}", "num_images=2", "steps=2"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"difflab: error: no space left on device writing {out / '0.png'}" in err
    assert "Traceback" not in err and not out.exists()


def test_grid_holds_the_first_images_only(ckpts, tmp_path, monkeypatch):
    """The grid held every image in memory until the end (100,000 images at 64 px: 4.9 GB)."""
    from PIL import Image

    import difflab.sample

    monkeypatch.setattr(difflab.sample, "GRID_MAX", 4)
    SAMPLE.call([f"ckpt={ckpts['flow']}", f"out={tmp_path}", "num_images=7", "batch_size=3", "steps=1"])
    assert Image.open(tmp_path / "grid.png").size == (2 * 8 + 3 * 2,) * 2  # 2 x 2 images of 8 px
    assert len(list(tmp_path.glob("?.png"))) == 7


def test_no_ema_weights_is_said(ckpts, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        SAMPLE.call([f"ckpt={ckpts['noema']}", f"out={tmp_path / 's'}", "num_images=1", "steps=1"])
    assert "holds no EMA weights (trained with ~model.ema): using its live weights" in caplog.text


def test_flow_euler_past_the_schedule_warns_with_an_estimate(caplog):
    """steps=100000 on a flow model ran for hours with no warning and a progress bar stuck at 0 (here
    a 10-level schedule: a real one would take 1,001 steps to get there)."""
    from difflab.diffusion.sampling import build_sampler
    from difflab.sample import warn_if_long
    from tests.test_sampling import tiny_unet

    config = {"num_train_timesteps": 10, "shift": 3.0}  # a flow schedule (diffusion/noise.py)
    sampler = build_sampler("flow_euler", config)
    with caplog.at_level(logging.WARNING):
        warn_if_long(tiny_unet(), sampler, config, 10, 64, 16, "cpu")
        assert caplog.text == ""
        warn_if_long(tiny_unet(), sampler, config, 100000, 64, 16, "cpu")
    assert "steps=100000 is more than the 10 noise levels the model was trained on: about" in caplog.text
    assert "for 64 images (Ctrl-C stops it)" in caplog.text
