"""Bad inputs to difflab-sample, -eval and -export that need a real checkpoint, a disk or a signal:
each ends in one line ``difflab: error: ...`` naming the key or file, exit status 2, no run dir
left behind and nothing of the user's lost (issue 27's traceback cases and their kind).

In this process through each command's console-script function, as tests/test_bad_command_lines.py
does; a full disk, Ctrl-C and a dropped network are simulated where a test cannot make them."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch

from difflab.evaluate import COMMAND as EVAL
from difflab.export import COMMAND as EXPORT
from difflab.files import DiskFullError, atomic_dir
from difflab.metrics.fid import RealFeatureCache
from difflab.sample import COMMAND as SAMPLE
from tests.conftest import DDPM_2, FLOW_30


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, trained_runs) -> dict[str, Path]:
    """Digits checkpoints: the flow default, a DDPM one, one without EMA weights (from the flow one),
    one trained on a folder that has moved, an exported pipeline, a truncated file and a pipeline
    with truncated weights."""
    root = tmp_path_factory.mktemp("ckpts")
    flow = trained_runs(*FLOW_30) / "checkpoints" / "last.ckpt"
    state = torch.load(flow, weights_only=True)
    del state["ema"]
    torch.save(state, root / "noema.ckpt")
    (root / "truncated.ckpt").write_bytes(flow.read_bytes()[:5000])
    folder = {"_target_": "difflab.data.sources.FolderSource", "_partial_": True, "path": str(root / "moved")}
    state["difflab"]["config"]["data"]["source"] = folder  # trained on a folder since moved away
    torch.save(state, root / "moved.ckpt")
    EXPORT.call([f"ckpt={flow}", f"out={root / 'pipe'}"])
    damaged = root / "damaged"
    shutil.copytree(root / "pipe", damaged)
    weights = damaged / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:3000])
    return {
        "flow": flow,
        "ddpm": trained_runs(*DDPM_2) / "checkpoints" / "last.ckpt",
        "noema": root / "noema.ckpt",
        "pipe": root / "pipe",
        "truncated": root / "truncated.ckpt",
        "damaged": damaged,
        "moved": root / "moved.ckpt",
    }


def _inputs(root: Path) -> dict[str, Path]:
    root.mkdir(exist_ok=True)
    full = root / "full"
    full.mkdir(exist_ok=True)
    (full / "notes.txt").write_text("mine")
    (root / "notes.txt").write_text("mine")
    return {"full": full, "file": root / "notes.txt", "dir": root}


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


def _run(command, args, tmp_path, monkeypatch, capsys, ckpts) -> str:
    """``difflab-<command> args`` in a fresh cwd: returns its one error line (asserting exit 2, one
    line, no traceback, no litter in the cwd and the user's files untouched)."""
    files = {**_inputs(tmp_path / "inputs"), **ckpts}
    cwd = tmp_path / "cwd"
    cwd.mkdir(exist_ok=True)
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit) as e:
        command.main([a.format(**files) for a in args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("difflab: error:")]
    assert len(errors) == 1, err
    assert "Traceback" not in err, err
    assert list(cwd.iterdir()) == [], list(cwd.iterdir())  # no run dir, out dir or temporary dir
    assert (files["full"] / "notes.txt").read_text() == "mine"
    assert files["file"].read_text() == "mine"
    return errors[0].format(**files)


@pytest.mark.parametrize(
    ("command", "args", "message"),
    [*_cases(SAMPLE, SAMPLE_CASES), *_cases(EVAL, EVAL_CASES), *_cases(EXPORT, EXPORT_CASES)],
)
def test_bad_input_is_one_line(command, args, message, ckpts, tmp_path, monkeypatch, capsys):
    line = _run(command, args, tmp_path, monkeypatch, capsys, ckpts)
    files = {**_inputs(tmp_path / "inputs"), **ckpts}
    assert message.format(**files) in line, line
    assert len(line) < 400


def test_a_sweep_with_one_bad_steps_value_is_refused_before_any_job_runs(
    ckpts, tmp_path, monkeypatch, capsys
):
    args = ["-m", "ckpt={ddpm}", "sampler=ddim", "steps=2,100000", "num_images=1", "out=sweep"]
    line = _run(SAMPLE, args, tmp_path, monkeypatch, capsys, ckpts)
    assert "steps=100000 is more than the model's num_train_timesteps=1000" in line  # no job's dir left


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

    line = _run(TRAIN, ["experiment=digits", *args], tmp_path, monkeypatch, capsys, {})
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
    line = _run(
        command, ["ckpt={locked}", *extra], tmp_path, monkeypatch, capsys, {**ckpts, "locked": locked}
    )
    assert f"ckpt={locked} cannot be read (permission denied); fix its permissions" in line


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


def test_ctrl_c_mid_eval_keeps_the_finished_rows(ckpts, tmp_path, monkeypatch, capsys):
    """The table was written at the end only: Ctrl-C after hours of FIDs kept none of them."""
    import json

    import difflab.evaluate
    from difflab.metrics.features import ClassifierFeatures

    calls = []

    def one_then_ctrl_c(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return {"val/fid_classifier_2": 1.0}

    monkeypatch.setattr(ClassifierFeatures, "prepare", lambda self, dm: None)
    monkeypatch.setattr(
        difflab.evaluate, "real_features", lambda dm, ext, *a: torch.zeros(4, ext.num_features)
    )
    monkeypatch.setattr(difflab.evaluate.FIDEvaluator, "evaluate", one_then_ctrl_c)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        EVAL.main([f"ckpt={ckpts['flow']}", "steps=[1,2]", "num_samples=2", f"out={out}"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == f"difflab: error: interrupted; what was written so far is in {out}"
    assert [row["steps"] for row in json.loads((out / "results.json").read_text())] == [1]


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
    line = _run(command, ["ckpt={flow}", "batch_size=4096", steps], tmp_path, monkeypatch, capsys, ckpts)
    assert "out of memory sampling batches of 4096 images on cpu; give a smaller batch_size" in line


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


def test_real_split_the_source_lacks_is_one_line_before_any_data_is_read():
    from difflab.errors import DifflabError
    from difflab.evaluate import split_config

    data = {"source": {"_target_": "difflab.data.sources.fashion_mnist_source", "split": "train"}}
    with pytest.raises(DifflabError) as e:
        split_config(data, "validation", "r.ckpt")
    assert str(e.value) == (
        "real_split=validation is not valid; allowed: train, test (the splits of r.ckpt's data source)"
    )
    assert split_config(data, "test", "r.ckpt").source.split == "test"


def test_fid_cache_on_a_full_disk_is_one_line_naming_the_key(tmp_path, monkeypatch):
    import difflab.metrics.fid as fid

    def full(path, write, shared=False, sync=True):
        raise DiskFullError(Path(path))

    monkeypatch.setattr(fid, "atomic_write", full)
    with pytest.raises(fid.DifflabError) as e:
        RealFeatureCache(tmp_path / "fid").save("k", torch.zeros(2, 3), {})
    assert str(e.value) == (
        f"cannot write the FID real-feature cache in {tmp_path / 'fid'} (no space left on device); free "
        "space there or move the cache with metrics.cache_dir=<dir> (checkpoints are untouched)"
    )


def test_damaged_fid_cache_is_recomputed(tmp_path, caplog):
    cache = RealFeatureCache(tmp_path)
    cache.save("k", torch.ones(2, 3), {})
    cache.path("k").write_bytes(cache.path("k").read_bytes()[:100])  # damaged by a copy, not by difflab
    with caplog.at_level(logging.WARNING):
        assert cache.load("k") is None
    assert "cannot be read" in caplog.text


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
    line = _run(EXPORT, ["ckpt={flow}", "out=pipe"], tmp_path, monkeypatch, capsys, ckpts)
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
    line = _run(
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
