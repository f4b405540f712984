"""Bad command lines, as users type them, for each of the five commands: every one ends in one short
line on stderr naming the key (or file), a non-zero exit, and no directory left behind.

Run in this process through each command's console-script function (the same code path as the
installed script; a subprocess per line would cost ~4 s of imports each); test_cli.py runs a few
through the real scripts."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from difflab.evaluate import COMMAND as EVAL
from difflab.export import COMMAND as EXPORT
from difflab.prepare import COMMAND as PREPARE
from difflab.sample import COMMAND as SAMPLE
from difflab.train import COMMAND as TRAIN

NO_GPU = not torch.cuda.is_available()

TRAIN_LINES = [
    (["data.batch_sise=3"], "unknown key data.batch_sise; did you mean data.batch_size?"),
    (["model.ema.max_dekay=0.9"], "unknown key model.ema.max_dekay; did you mean model.ema.max_decay?"),
    (["foo=bar"], "unknown key foo"),
    (["trainer.max_steps=abc"], "trainer.max_steps=abc must be an integer"),
    (["trainer.max_steps=1.5"], "trainer.max_steps=1.5 must be an integer"),
    (["model.optimizer.lr=fast"], "model.optimizer.lr=fast must be a number"),
    (["seed=abc"], "seed=abc must be an integer or null"),
    (["data.flip=maybe"], "data.flip=maybe must be true or false"),
    (["data.batch_size=-1"], "data.batch_size=-1 must be at least 1"),
    (["data.num_workers=-1"], "data.num_workers=-1 must be at least 0"),
    (["model.warmup_steps=-5"], "model.warmup_steps=-5 must be at least 0"),
    (["model.ema.max_decay=1.5"], "model.ema.max_decay=1.5 must be between 0 and 1"),
    (
        ["data.background=[1,2,300]"],
        "data.background=[1,2,300] has an item 300 that must be between 0 and 255",
    ),
    (["data=fashon_mnist"], "data=fashon_mnist is not a choice; did you mean fashion_mnist?"),
    (["model.unet=tinyy"], "model.unet=tinyy is not a choice; did you mean tiny?"),
    (["trainer.precision=17"], "trainer.precision=17 is not valid; allowed: 64, 32, 16"),
    (["data.crop=diag"], "data.crop=diag is not valid; allowed: center, random"),
    (["model.lr_schedule=cosin"], "model.lr_schedule=cosin is not valid; allowed: constant, cosine, linear"),
    (["model=ddpm", "model.noise_scheduler.prediction_type=noise"], "allowed: epsilon, sample, v_prediction"),
    (
        ["model.noise_scheduler.prediction_type=v_prediction"],
        "model.noise_scheduler.prediction_type is a model=ddpm setting; add model=ddpm (this run's model is "
        "flow)",
    ),
    (["callbacks.sample_grid.sampler=ddmp"], "callbacks.sample_grid.sampler=ddmp is not valid"),
    (
        ["model=ddpm", "model.noise_scheduler.prediction_type=sample", "callbacks.sample_grid.sampler=pndm"],
        "callbacks.sample_grid.sampler=pndm: the pndm sampler cannot sample a model with prediction_type=",
    ),
    (["model.unet=small", "data.resolution=30"], "data.resolution=30 must be divisible by 4"),
    (["data=folder"], "data.source.path is required (give data.source.path=...)"),
    (["data=folder", "data.source.path=/no/such/dir"], "data.source.path=/no/such/dir does not exist"),
    (
        ["callbacks=with_fid", "metrics=inception", "metrics.extractor.weights_path=/no/inception.pth"],
        "metrics.extractor.weights_path=/no/inception.pth does not exist",
    ),
    (["trainer.precision=16-mixed"], "trainer.precision=16-mixed needs a GPU"),
    (
        ["model.ema=posthoc", "model.ema.stds=[0.05,0.5]"],
        "model.ema.stds=[0.05,0.5] has an item 0.5 that must be",
    ),
    (["model.ema=posthk"], "model.ema=posthk is not a choice; did you mean posthoc?"),
    # A rule tying two settings (PowerFunctionEMA.settings_problems), at start-up: no run dir yet.
    (
        ["model.ema=posthoc", "model.ema.sample_std=0.2"],
        "model.ema.sample_std=0.2 is not one of the tracked stds [0.05, 0.1]",
    ),
    (["model.ema=posthoc", "model.ema.stds=[]"], "model.ema.stds is empty"),
    pytest.param(
        ["trainer=gpu"], "no CUDA GPU is visible", marks=pytest.mark.skipif(not NO_GPU, reason="GPU")
    ),
    (["-m", "model.optimizer.lr=0.001,fast"], "model.optimizer.lr=fast must be a number"),  # each sweep value
    (["data.batch_size=[1,"], "cannot parse the command line"),
    # Found before Hydra starts (reading the file): still one line, and no run dir is left.
    (["ckpt_path=/no/such.ckpt"], "ckpt_path=/no/such.ckpt does not exist"),
    (
        ["ckpt_path={pipeline}"],
        "is an exported pipeline (weights only: no optimizer state",
    ),
    (["ckpt_path={full}"], "is a directory; give a training checkpoint"),
    # Ranges a library checks only once the run has started (numpy's seeds, torch's lr, Lightning).
    (["seed=-1"], "seed=-1 must be between 0 and 4294967295"),
    (["seed=1099511627776"], "seed=1099511627776 must be between 0 and 4294967295"),
    (["seed=4.0"], "seed=4.0 must be an integer or null"),
    (
        ["trainer.max_steps=-1"],
        "and trainer.max_epochs=-1 sets no end",
    ),
    (
        ["trainer.max_steps=0"],
        "trainer.max_steps=0 must be at least 1 (or -1 to train",
    ),
    (["trainer.max_steps=-5"], "trainer.max_steps=-5 must be at least 1"),
    (["model.optimizer.lr=-1"], "model.optimizer.lr=-1 must be above 0"),
    (["model.optimizer.lr=0"], "model.optimizer.lr=0 must be above 0"),
    (["model.optimizer.lr=inf"], "model.optimizer.lr=inf must be a finite number"),
    (["model.optimizer.lr=nan"], "model.optimizer.lr=nan must be a finite number"),
    (["trainer.accumulate_grad_batches=0"], "trainer.accumulate_grad_batches=0 must be at least 1"),
    (["trainer.gradient_clip_val=-1"], "trainer.gradient_clip_val=-1 must be above 0"),
    (
        ['data.batch_size="4"'],
        'data.batch_size="4" must be an integer (the quotes make it a string: write data.batch_size=4)',
    ),
    (
        ["data=folder", "data.source.path={dir}/a,b"],
        "is a list of values (a sweep, run with -m); for one value holding a comma, quote it: "
        "'data.source.path=\"",
    ),
    # The run dir cannot be made: refused before Hydra writes (its traceback named no key).
    (["hydra.run.dir={file}/run"], "/notes.txt is a file, not a directory; choose another hydra.run.dir"),
    (["hydra.run.dir=/proc/difflab/run"], "hydra.run.dir=/proc/difflab/run cannot be written"),
    (["hydra.run.dir="], "hydra.run.dir is empty; give a directory"),  # was: a run in the launch dir
    (["paths.log_dir={file}"], "/notes.txt is a file, not a directory; choose another paths.log_dir"),
]


def _inputs(root: Path) -> dict[str, Path]:
    """Files the bad lines point at: a non-checkpoint, a non-empty folder, an existing plain file."""
    root.mkdir(exist_ok=True)
    junk = root / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint")
    full = root / "full"
    full.mkdir(exist_ok=True)
    (full / "notes.txt").write_text("mine")
    (root / "notes.txt").write_text("mine")
    pipeline = root / "pipeline"  # what difflab-export writes
    (pipeline / "unet").mkdir(parents=True, exist_ok=True)
    (pipeline / "model_index.json").write_text("{}")
    return {"junk": junk, "full": full, "file": root / "notes.txt", "dir": root, "pipeline": pipeline}


SAMPLE_LINES = [
    ([], "ckpt is required (give ckpt=...)"),
    (["ckpt=/no/such.ckpt"], "ckpt=/no/such.ckpt does not exist"),
    (["ckpt={junk}", "num_images=0"], "num_images=0 must be at least 1"),
    (["ckpt={junk}", "num_images=1.5"], "num_images=1.5 must be an integer"),
    (["ckpt={junk}", "num_imgs=3"], "unknown key num_imgs; did you mean num_images?"),
    (["ckpt={junk}", "stepz=3"], "unknown key stepz; did you mean steps?"),
    (["ckpt={junk}", "+foo=1"], "unknown key foo"),
    (["ckpt={junk}", "sampler=ddmp"], "sampler=ddmp is not valid; allowed: ddpm, ddim"),
    (["ckpt={junk}", "sampler=[ddim]"], "sampler=[ddim] is not valid; allowed: ddpm"),
    (["ckpt={junk}", "steps=abc"], "steps=abc must be an integer"),
    (["ckpt={junk}", "steps=0"], "steps=0 must be at least 1"),
    (["ckpt={junk}", "seed=x"], "seed=x must be an integer"),
    (["ckpt={junk}", "batch_size=0"], "batch_size=0 must be at least 1"),
    (["ckpt={junk}", "device=tpu"], "device=tpu is not valid; allowed: auto, cpu, cuda, cuda:N"),
    (["ckpt={junk}", "use_ema=maybe"], "use_ema=maybe must be true or false"),
    (["ckpt={junk}", "grid=2"], "grid=2 must be true or false"),
    (
        ["ckpt={junk}", "channels_last=maybe"],
        "channels_last=maybe is not valid; allowed: auto or true or false",
    ),
    (["ckpt={junk}", "out=[a,b]"], "out=[a,b] must be a string"),
    (["ckpt={junk}", "ema_std=0.5"], "ema_std=0.5 must be between 0.01 and 0.25"),
    (["ckpt={junk}", "data=digits"], "unknown key data"),  # training's groups are not sample's
    (["-m", "ckpt={junk}", "sampler=ddim,warp"], "sampler=warp is not valid"),
    # Found after Hydra started (reading the file): one line; the out dir it made is removed.
    (["ckpt={junk}"], "is not a difflab checkpoint: it is not a PyTorch checkpoint file"),
    (["ckpt={full}"], "is neither a checkpoint file nor an exported pipeline"),
]

EVAL_LINES = [
    ([], "ckpt is required (give ckpt=...)"),
    (["ckpt=/no/such.ckpt"], "ckpt=/no/such.ckpt does not exist"),
    (["ckpt={dir}"], "is a directory, not a file"),
    (["ckpt={junk}", "sampler=warp"], "sampler=warp is not valid; allowed: ddpm"),
    (["ckpt={junk}", "sampler=[ddim,warp]"], "sampler=[ddim,warp] has an item warp that is not valid"),
    (["ckpt={junk}", "samplers=[ddim]"], "unknown key samplers; did you mean sampler?"),
    (["ckpt={junk}", "steps=0"], "steps=0 must be at least 1"),
    (["ckpt={junk}", "steps=[10,abc]"], "steps=[10,abc] has an item abc that must be an integer"),
    (["ckpt={junk}", "num_samples=1"], "num_samples=1 must be at least 2"),
    (["ckpt={junk}", "num_samples=[1000]"], "num_samples=[1000] must be an integer"),
    (["ckpt={junk}", "num_real=abc"], "num_real=abc must be an integer"),
    (["ckpt={junk}", "metrics=inceptoin"], "metrics=inceptoin is not a choice; did you mean inception?"),
    (
        ["ckpt={junk}", "metrics=inception", "metrics.extractor.weights_path=/no/w.pth"],
        "metrics.extractor.weights_path=/no/w.pth does not exist",
    ),
    (["ckpt={junk}", "metrics.extractor.epochs=0"], "metrics.extractor.epochs=0 must be at least 1"),
    (["ckpt={junk}", "metrics.extractor.widht=8"], "unknown key metrics.extractor.widht; did you mean"),
    (["ckpt={junk}", "extractor=foo"], "extractor=foo must be a Module"),
    (["ckpt={junk}", "kid=maybe"], "kid=maybe is not valid; allowed: auto or true or false"),
    (
        ["ckpt={junk}", "ema_std=[0.05,0.3]"],
        "ema_std=[0.05,0.3] has an item 0.3 that must be between 0.01 and 0.25",
    ),
    (["ckpt={junk}", "batch_size=-4"], "batch_size=-4 must be at least 1"),
    (["ckpt={junk}", "device=gpu0"], "device=gpu0 is not valid"),
    (["ckpt={junk}", "seed=1.5"], "seed=1.5 must be an integer"),
    (["ckpt={junk}", "channels_last=2"], "channels_last=2 is not valid"),
    (["-m", "ckpt={junk}", "steps=10,0"], "steps=0 must be at least 1"),
    (["ckpt={junk}", "sampler=ddim"], "is not a difflab checkpoint"),  # after Hydra started
]

EXPORT_LINES = [
    ([], "ckpt is required (give ckpt=...); out is required (give out=...)"),
    (["out=x"], "ckpt is required"),
    (["ckpt={junk}"], "out is required"),
    (["ckpt=/no/such.ckpt", "out=x"], "ckpt=/no/such.ckpt does not exist"),
    (["ckpt={dir}", "out=x"], "is a directory, not a file"),
    (["ckpt={junk}", "out={file}"], "is an existing file; give a directory for an exported pipeline"),
    (["ckpt={junk}", "out={full}"], "holds files that are not an exported pipeline (notes.txt)"),
    (["ckpt={junk}", "out=x", "push_to_hub=true"], "push_to_hub=true needs hub_repo_id=<user>/<name>"),
    (["ckpt={junk}", "out=x", "push_to_hub=yes"], "push_to_hub=yes must be true or false"),
    (["ckpt={junk}", "out=x", "push_to_hub=1"], "push_to_hub=1 must be true or false"),
    (["ckpt={junk}", "out=x", "use_ema=maybe"], "use_ema=maybe must be true or false"),
    (["ckpt={junk}", "out=x", "hub_private=2"], "hub_private=2 must be true or false"),
    (["ckpt={junk}", "out=x", "hub_repo_id=[a]"], "hub_repo_id=[a] must be a string or null"),
    (["ckpt={junk}", "out=x", "hub_repo_id=123"], "hub_repo_id=123 must be a string or null"),
    (["ckpt={junk}", "outt=x"], "unknown key outt; did you mean out?"),
    (["ckpt={junk}", "out=x", "use_emma=true"], "unknown key use_emma; did you mean use_ema?"),
    (["ckpt={junk}", "out=x", "+extra=1"], "unknown key extra"),
    (["ckpt=[a,b]", "out=x"], "ckpt=[a,b] must be a string"),
    (["ckpt={junk}", "out=[a]"], "out=[a] must be a string"),
    (["ckpt={junk}", "out=x", "ema_std=0"], "ema_std=0 must be between 0.01 and 0.25"),
    (["ckpt={junk}", "out=x", "~use_ema"], "use_ema is required"),
    (["-m", "ckpt={junk}", "out=x", "use_ema=true,maybe"], "use_ema=maybe must be true or false"),
    (["ckpt={junk}", "out=x"], "is not a difflab checkpoint"),  # after Hydra started
]


PREPARE_LINES = [
    ([], "out is required (give out=...)"),
    (["out=x", "encoding=webp"], "encoding=webp is not valid; allowed: png, raw, jpeg"),
    (["out=x", "quality=0"], "quality=0 must be between 1 and 100"),
    (["out=x", "quality=101"], "quality=101 must be between 1 and 100"),
    (["out=x", "quality=high"], "quality=high must be an integer"),
    (["out=x", "num_workers=0"], "num_workers=0 must be at least 1"),
    (["out=x", "num_workers=two"], "num_workers=two must be an integer"),
    (["out=x", "data.num_workers=8"], "data.num_workers is the training loader's setting"),
    (["out=x", "resolutoin=8"], "unknown key resolutoin; did you mean resolution?"),
    (["out=x", "resolution=-3"], "resolution=-3 must be at least 1"),
    (["out=x", "resolution=big"], "resolution=big must be an integer or null"),
    (["out=x", "overwrite=maybe"], "overwrite=maybe must be true or false"),
    (["out=x", "data=fashon_mnist"], "data=fashon_mnist is not a choice; did you mean fashion_mnist?"),
    (["out=x", "data=folder"], "data.source.path is required"),
    (
        ["out=x", "data=folder", "data.source.path=/no/such/dir"],
        "data.source.path=/no/such/dir does not exist",
    ),
    (["out=x", "data.channels=2"], "data.channels=2 is not valid; allowed: 1, 3"),
    (["out={full}"], "holds files that are not a shard set (notes.txt)"),
    (["out={full}", "overwrite=true"], "holds files that are not a shard set (notes.txt)"),
    (["out={file}"], "is an existing file; give a directory for a shard set"),
    (["out={file}/sub"], "cannot be created"),
    (["out=[a,b]"], "out=[a,b] must be a string"),
    (["out=x", "+extra=1"], "unknown key extra"),
    (["-m", "out=x", "encoding=png,webp"], "encoding=webp is not valid"),
]


def _cases(command, lines):
    for line in lines:
        if hasattr(line, "marks"):  # pytest.param
            (args, message), marks = line.values, line.marks
        else:
            (args, message), marks = line, ()
        prefix = ["experiment=digits"] if command is TRAIN else ["data=digits"] if command is PREPARE else []
        flags = [a for a in args if a.startswith("-")]  # Hydra reads flags before overrides
        ordered = [*flags, *prefix, *(a for a in args if not a.startswith("-"))]
        yield pytest.param(command, ordered, message, marks=marks, id=f"{command.name}: {' '.join(args)}")


CASES = [
    *_cases(TRAIN, TRAIN_LINES),
    *_cases(SAMPLE, SAMPLE_LINES),
    *_cases(EVAL, EVAL_LINES),
    *_cases(EXPORT, EXPORT_LINES),
    *_cases(PREPARE, PREPARE_LINES),
]


@pytest.mark.parametrize(("command", "args", "message"), CASES)
def test_bad_command_line_is_one_line_naming_the_key(command, args, message, tmp_path, monkeypatch, capsys):
    files = _inputs(tmp_path / "inputs")
    args = [a.format(**files) for a in args]
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    with pytest.raises(SystemExit) as e:
        command.main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("difflab: error:")]
    assert len(errors) == 1, err
    assert message in errors[0], errors[0]
    # short: the problem and the fix, not a list of everything (the test's own paths not counted)
    assert len(errors[0].replace(str(tmp_path), "<tmp>")) < 400
    assert "Traceback" not in err and "Error in call" not in err and "full_key" not in err
    assert list(cwd.iterdir()) == []  # no run dir, out dir or log litter
    assert (files["full"] / "notes.txt").read_text() == "mine"  # the user's files are untouched


def _raise(exc: BaseException | signal.Signals):
    def raiser(*args, **kwargs):
        if isinstance(exc, signal.Signals):
            os.kill(os.getpid(), exc)  # as `kill <pid>` from another terminal
            time.sleep(5)  # the handler raises here
        raise exc

    return raiser


@pytest.mark.parametrize(
    ("raised", "message"),
    [
        (KeyboardInterrupt(), "interrupted; nothing was written"),
        (signal.SIGTERM, "stopped by SIGTERM; nothing was written"),
        (
            PermissionError(errno.EACCES, "Permission denied", "/data/x.png"),
            "/data/x.png: Permission denied; choose a path you may write to, or fix its permissions",
        ),
        (
            OSError(errno.ENOSPC, "No space left on device"),
            "No space left on device; free space there and rerun",
        ),
        (
            ConnectionError("Connection refused"),
            "network error: Connection refused; check the connection (or work offline) and rerun",
        ),
    ],
    ids=["ctrl-c", "sigterm", "permission", "disk-full", "network"],
)
def test_what_a_users_input_raises_after_start_is_one_line(raised, message, tmp_path, monkeypatch, capsys):
    """The root: cli.Command turns these into one line, exit 2, and removes the run dir it made."""
    import difflab.train

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(difflab.train, "instantiate_group", _raise(raised))  # inside the run, Hydra started
    with pytest.raises(SystemExit) as e:
        TRAIN.main(["experiment=digits"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err, err
    assert [line for line in err.splitlines() if line.startswith("difflab:")] == [
        f"difflab: error: {message}"
    ]
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_before_the_run_starts_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(TRAIN, "start", _raise(KeyboardInterrupt()))
    with pytest.raises(SystemExit) as e:
        TRAIN.main(["experiment=digits"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == "difflab: error: interrupted; nothing was written"


def test_a_bug_keeps_its_traceback(tmp_path, monkeypatch, capsys):
    import difflab.train

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(difflab.train, "instantiate_group", _raise(ValueError("a bug in difflab")))
    with pytest.raises(SystemExit) as e:
        TRAIN.main(["experiment=digits"])
    err = capsys.readouterr().err
    assert e.value.code == 1 and "ValueError: a bug in difflab" in err and "difflab: error" not in err


@pytest.fixture
def small_fs(tmp_path):
    """Mounts a tmpfs with the given options at tmp_path/mnt (root only; skipped elsewhere)."""
    mounted: list[Path] = []

    def mount(options: str) -> Path:
        mnt = tmp_path / f"mnt{len(mounted)}"
        mnt.mkdir()
        if subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mnt)], capture_output=True
        ).returncode:
            pytest.skip("cannot mount a tmpfs here (needs root)")
        mounted.append(mnt)
        return mnt

    yield mount
    for mnt in mounted:
        subprocess.run(["umount", str(mnt)], check=False)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ("ro,size=1m", "cannot be written (Read-only file system); choose a writable hydra.run.dir"),
        (
            "size=64k",
            "cannot be written (No space left on device); free space there or choose another hydra.run.dir",
        ),
    ],
    ids=["read-only", "full"],
)
def test_run_dir_on_a_read_only_or_full_file_system_is_one_line(
    options, message, small_fs, tmp_path, monkeypatch, capsys
):
    mnt = small_fs(options)
    if "ro" not in options:
        (mnt / "filler").write_bytes(b"0" * (64 * 1024 - 4096))  # fill the disk
        with pytest.raises(OSError), open(mnt / "more", "wb") as f:
            f.write(b"0" * 8192)
            f.flush()
    before = sorted(p.name for p in mnt.iterdir())
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        TRAIN.main(["experiment=digits", f"hydra.run.dir={mnt}/run"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err, err
    assert err.strip() == f"difflab: error: hydra.run.dir={mnt}/run {message}"
    assert sorted(p.name for p in mnt.iterdir()) == before
