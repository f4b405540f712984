"""difflab-export: a diffusers pipeline that draws difflab-sample's images, written whole or not at all
(a full disk, Ctrl-C, kill -9 between or inside its writes), and pushed to the Hub with one line on failure.
Its one-line refusals of bad input are in test_bad_inference_inputs.py's table with sample's and eval's."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from diffusers import DiffusionPipeline
from PIL import Image

from difflab.diffusion.sampling import build_sampler, image_generators
from difflab.export import COMMAND as EXPORT
from difflab.files import atomic_dir
from difflab.sample import COMMAND as SAMPLE
from tests.helpers import refused_line
from tests.test_sample import sample


@pytest.mark.parametrize("objective", ["flow", "ddpm"])
def test_export_round_trip_matches_difflab_sample(objective, ckpts, tmp_path):
    """diffusers' own pipeline, loaded from the export with difflab-sample's sampler, draws difflab-sample's
    images; and difflab-sample draws them from the export as from the checkpoint."""
    trained_ckpt = ckpts[objective]
    out = EXPORT.call([f"ckpt={trained_ckpt}", f"out={tmp_path / 'pipe'}"])
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert not list(out.rglob("*.ckpt"))
    index = json.loads((out / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DModel"]  # diffusers' own class, not difflab's subclass
    pipe = DiffusionPipeline.from_pretrained(out)
    pipe.scheduler = build_sampler("dpmsolver++", pipe.scheduler.config)  # what difflab-sample uses
    gens = image_generators(7, range(4))
    ref = pipe(batch_size=4, generator=gens, num_inference_steps=10, output_type="np").images  # (4, 8, 8, 1)
    ours = sample(ckpt=trained_ckpt, num_images=4, seed=7, steps=10, out=tmp_path / "s", grid="false")
    for i, p in enumerate(ours):
        mine = np.asarray(Image.open(p))[..., 0].astype(float)
        theirs = np.round(ref[i, ..., 0] * 255)
        assert np.abs(mine - theirs).max() <= 1.0
    # Sampling the export through difflab-sample gives the same images as from the checkpoint.
    again = sample(ckpt=out, num_images=4, seed=7, steps=10, out=tmp_path / "e", grid="false")
    for p, q in zip(ours, again, strict=True):
        assert (
            np.abs(np.asarray(Image.open(p)).astype(int) - np.asarray(Image.open(q)).astype(int)).max() <= 1
        )


def test_flow_export_loads_with_diffusers_and_matches_difflab_sample(ckpts, tmp_path):
    out = EXPORT.call([f"ckpt={ckpts['flow']}", f"out={tmp_path / 'pipe'}"])
    index = json.loads((out / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    pipe = DiffusionPipeline.from_pretrained(out)
    ref = pipe(
        batch_size=3, generator=image_generators(7, range(3)), num_inference_steps=8, output_type="np"
    ).images
    ours = SAMPLE.call(
        [
            f"ckpt={ckpts['flow']}",
            "num_images=3",
            "seed=7",
            "steps=8",
            "sampler=flow_euler",
            f"out={tmp_path / 's'}",
        ]
    )
    for i, p in enumerate(ours):
        assert (
            np.abs(np.asarray(Image.open(p))[..., 0].astype(float) - np.round(ref[i, ..., 0] * 255)).max()
            <= 1
        )
    again = SAMPLE.call(
        [f"ckpt={out}", "num_images=3", "seed=7", "steps=8", "sampler=flow_euler", f"out={tmp_path / 'e'}"]
    )
    for p, q in zip(ours, again, strict=True):
        assert (
            np.abs(np.asarray(Image.open(p)).astype(int) - np.asarray(Image.open(q)).astype(int)).max() <= 1
        )
    heun = SAMPLE.call(
        [f"ckpt={ckpts['flow']}", "num_images=2", "steps=4", "sampler=flow_heun", f"out={tmp_path / 'h'}"]
    )
    assert len(heun) == 2


def test_export_failure_leaves_the_earlier_export_and_no_litter(ckpts, tmp_path, monkeypatch, capsys):
    """kill -9 mid-export left a half-written dir a rerun refused, and 143 MB of unet/.tmp* files."""
    from diffusers import DDPMPipeline

    out = tmp_path / "pipe"
    EXPORT.call([f"ckpt={ckpts['flow']}", f"out={out}"])
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def half_then_full(self, path, **kwargs):
        (Path(path) / "unet").mkdir()
        (Path(path) / "unet" / ".tmp_half").write_bytes(b"x" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(DDPMPipeline, "save_pretrained", half_then_full)
    with pytest.raises(SystemExit) as e:
        EXPORT.main([f"ckpt={ckpts['flow']}", f"out={out}"])
    assert e.value.code == 2
    assert f"difflab: error: no space left on device writing {out}" in capsys.readouterr().err
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]


def test_ctrl_c_mid_export_leaves_nothing(ckpts, tmp_path, monkeypatch, capsys):
    from diffusers import DDPMPipeline

    def half_then_ctrl_c(self, path, **kwargs):
        (Path(path) / "model_index.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(DDPMPipeline, "save_pretrained", half_then_ctrl_c)
    line = refused_line(EXPORT, ["ckpt={flow}", "out=pipe"], tmp_path, monkeypatch, capsys, ckpts)
    assert line == "difflab: error: interrupted; nothing was written"  # and no pipe/ nor .pipe.partial/


def test_kill_9_mid_export_leaves_no_half_dir_and_a_rerun_repairs_it(tmp_path):
    """A real SIGKILL inside the writer (the pipeline itself is swapped for two files)."""
    code = (
        "import os, signal, sys\n"
        "from difflab.files import atomic_dir\n"
        "with atomic_dir(sys.argv[1]) as d:\n"
        "    (d / 'model_index.json').write_text('{}')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    out = tmp_path / "pipe"
    p = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, timeout=60)
    assert p.returncode == -signal.SIGKILL
    assert not out.exists()  # a rerun is not refused by a half-written pipeline
    with atomic_dir(out) as d:
        (d / "model_index.json").write_text("{}")
    assert sorted(os.listdir(tmp_path)) == ["pipe"]  # the killed writer's temporary dir is gone


def test_kill_between_the_renames_puts_the_earlier_export_back(tmp_path):
    out, old = tmp_path / "pipe", tmp_path / ".pipe.old"
    old.mkdir()
    (old / "model_index.json").write_text("earlier")
    with pytest.raises(RuntimeError), atomic_dir(out):
        raise RuntimeError("fails before the swap")
    assert (out / "model_index.json").read_text() == "earlier"
    assert sorted(os.listdir(tmp_path)) == ["pipe"]


def test_push_to_hub_without_a_token_is_refused_at_start_up(ckpts, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    line = refused_line(
        EXPORT,
        ["ckpt={flow}", "out=x", "push_to_hub=true", "hub_repo_id=me/m"],
        tmp_path,
        monkeypatch,
        capsys,
        ckpts,
    )
    assert "push_to_hub=true needs a Hugging Face token" in line


def test_push_to_hub_network_error_is_one_line_and_keeps_the_export(ckpts, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise httpx.ConnectError("[Errno -2] Name or service not known")

    monkeypatch.setenv("HF_TOKEN", "hf_test")
    monkeypatch.setattr(huggingface_hub, "create_repo", offline)
    out = tmp_path / "pipe"
    with pytest.raises(SystemExit) as e:
        EXPORT.main([f"ckpt={ckpts['flow']}", f"out={out}", "push_to_hub=true", "hub_repo_id=me/m"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "difflab: error: push_to_hub: uploading" in err and f"the pipeline is saved in {out}" in err
    assert "Traceback" not in err and (out / "model_index.json").is_file()
