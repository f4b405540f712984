"""Big datasets: difflab-prepare writes LitData shards; data=streaming trains from them, disjoint across
DDP ranks, exact under kill -9, with one line for every bad shard set."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections import Counter

import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from difflab.checkpoints import load_checkpoint
from difflab.data.shards import ShardSource
from difflab.data.transforms import normalize_batch
from difflab.errors import DifflabError
from difflab.prepare import COMMAND as PREPARE
from tests.conftest import SMALL_CHUNKS, streaming_run
from tests.helpers import CliProcess, difflab_cli, image_digest, user_env


def digits_uint8() -> torch.Tensor:
    return torch.from_numpy((load_digits().images * (255 / 16)).round().astype("uint8")).unsqueeze(1)


# ------------------------------------------------------------------------------------------ prepare
def test_prepare_writes_lossless_shards_with_labels(digit_shards):
    assert len(list(digit_shards.glob("chunk-*.bin"))) >= 6
    source = ShardSource(str(digit_shards))
    assert len(source) == 1797 and source.channels == 1 and source.size == 0
    real = digits_uint8()
    # LitData may store items in worker order: compare as multisets of exact images, and by label.
    stored = Counter(source[i].numpy().tobytes() for i in range(len(source)))
    assert stored == Counter(img.numpy().tobytes() for img in real)
    assert Counter(source.labels.tolist()) == Counter(load_digits().target.tolist())


def test_prepare_is_repeatable_byte_for_byte(tmp_path, digit_shards):
    """The same source and settings write the same files (LitData's shared work queue put images in
    chunks by timing, and index.json carried the time it was written: two runs trained 7.9e-2 apart)."""
    again = tmp_path / "again"
    PREPARE.call(["data=digits", f"out={again}", SMALL_CHUNKS, "num_workers=2"])
    names = sorted(f.name for f in digit_shards.iterdir())
    assert names == sorted(f.name for f in again.iterdir()) and "index.json" in names
    for name in names:
        assert (digit_shards / name).read_bytes() == (again / name).read_bytes(), name


def _session_processes(sid: int) -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid=,sid=,stat=,args="], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if int(line.split()[1]) == sid and "Z" not in line.split()[2]]


@pytest.mark.parametrize(
    "sig",
    [
        signal.SIGTERM,
        pytest.param(signal.SIGINT, marks=pytest.mark.slow),
        pytest.param(signal.SIGKILL, marks=pytest.mark.slow),  # no message possible, but no orphans
    ],
    ids=["TERM", "INT", "KILL"],
)
def test_a_signal_mid_write_is_one_line_and_leaves_no_process(tmp_path, sig):
    """SIGTERM (or Ctrl-C's SIGINT to the foreground group, or even kill -9) while an overwrite=true
    is writing chunks: one line, exit 2, every LitData worker gone, and the earlier set in out= intact
    (the new one is written beside it and swapped in at the end); the rerun writes it."""
    out = tmp_path / "shards"
    PREPARE.call(["data=digits", "data.source.max_items=50", f"out={out}"])
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    args = ["data=fashion_mnist", f"out={out}", "chunk_bytes=20KB", "num_workers=2", "overwrite=true"]
    proc = CliProcess("prepare", *args, cwd=tmp_path, env=user_env(OMP_NUM_THREADS="1"))
    partial = tmp_path / ".shards.partial"
    deadline = time.monotonic() + 120
    while not list(partial.glob("chunk-*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    os.killpg(proc.pid, sig) if sig == signal.SIGINT else proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    if sig != signal.SIGKILL:
        assert proc.returncode == 2, stderr[-2000:]
        assert stderr.strip().splitlines() == [
            f"difflab: error: stopped by {sig.name} while writing shards to out={out}; out= is unchanged; "
            "run the command again"
        ]
        assert not partial.exists()
    time.sleep(1.5)
    assert _session_processes(proc.pid) == []  # no orphaned writer or worker
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before
    PREPARE.call([*args, "data.source.max_items=300"])
    assert len(ShardSource(str(out))) == 300 and not partial.exists()


def test_a_signal_while_reading_the_source_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    import difflab.data.sources

    def interrupted(**kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # as if sent while a large folder is being checked
        time.sleep(5)

    monkeypatch.setattr(difflab.data.sources, "digits_source", interrupted)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(
        DifflabError, match=r"stopped by SIGTERM before writing shards to out=.*run the command again"
    ):
        PREPARE.call(["data=digits", f"out={tmp_path / 'new'}"])
    assert not (tmp_path / "new").exists()
    assert signal.getsignal(signal.SIGTERM) == before  # the handler lives only as long as prepare


@pytest.mark.parametrize(
    "error,expected",
    [
        (
            OSError(28, "No space left on device"),
            "no space left on the device; free space or choose another out",
        ),
        (DifflabError("cannot read image /x/a.png: image file is truncated"), "cannot read image /x/a.png"),
    ],
    ids=["disk_full", "bad_image"],
)
def test_a_worker_error_is_one_line(tmp_path, monkeypatch, error, expected):
    """An error in one of LitData's workers (LitData re-raises it as a traceback inside a RuntimeError)."""
    from difflab.data.shards import ShardItems

    real = ShardItems.__call__

    def fail_at_50(self, index: int):
        if index == 50:
            raise error
        return real(self, index)

    monkeypatch.setattr(ShardItems, "__call__", fail_at_50)  # the writer and its workers fork: they see it
    out = tmp_path / "s"
    with pytest.raises(DifflabError) as e:
        PREPARE.call(["data=digits", f"out={out}", SMALL_CHUNKS])
    assert str(e.value).startswith(f"writing shards to out={out} failed: {expected}"), str(e.value)
    assert "\n" not in str(e.value) and str(e.value).endswith("; out= is unchanged; run the command again")
    assert not out.exists()  # made by the run, removed with the partial set


def test_prepare_resizes_and_encodes_jpeg(tmp_path):
    out = tmp_path / "jpeg"
    summary = PREPARE.call(
        ["data=digits", "data.channels=3", f"out={out}", "resolution=16", "encoding=jpeg", "quality=90"]
    )
    assert summary["images"] == 1797 and summary["bytes"] > 0 and summary["img_per_s"] > 0
    source = ShardSource(str(out))
    assert source.size == 16 and source.channels == 3
    assert tuple(source[0].shape) == (3, 16, 16) and source[0].dtype == torch.uint8


def test_prepare_refuses_a_non_empty_out_and_overwrites_only_shards(tmp_path, digit_shards):
    with pytest.raises(DifflabError, match=r"out=.*digits is not empty; .*overwrite=true"):
        PREPARE.call(["data=digits", f"out={digit_shards}"])
    other = tmp_path / "mine"
    other.mkdir()
    (other / "thesis.tex").write_text("keep me")
    with pytest.raises(DifflabError, match=r"holds files that are not a shard set \(thesis.tex\)"):
        PREPARE.call(["data=digits", f"out={other}", "overwrite=true"])
    assert (other / "thesis.tex").read_text() == "keep me"
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(DifflabError, match=r"out=.*a_file/shards cannot be created"):
        PREPARE.call(["data=digits", f"out={blocker / 'shards'}"])


@pytest.mark.parametrize(
    "chunk_bytes,message",
    [
        ("abc", "is not a size; give a number and a unit"),
        ("0KB", "must be above 0 bytes"),
        ("-3", "must be above 0 bytes"),
    ],
)
def test_a_bad_chunk_size_is_refused_before_anything_is_written(tmp_path, chunk_bytes, message):
    with pytest.raises(DifflabError, match=rf"chunk_bytes={chunk_bytes} {message}"):
        PREPARE.call(["data=digits", f"out={tmp_path / 's'}", f"chunk_bytes={chunk_bytes}"])
    assert not (tmp_path / "s").exists()


def test_prepare_overwrite_replaces_a_shard_set(tmp_path):
    out = tmp_path / "s"
    PREPARE.call(["data=digits", "data.source.max_items=100", f"out={out}"])
    PREPARE.call(["data=digits", "data.source.max_items=50", f"out={out}", "overwrite=true"])
    assert len(ShardSource(str(out))) == 50


def test_prepare_command_line_errors_as_the_console_script(tmp_path):
    """The bad lines themselves are tests/test_bad_command_lines.py's PREPARE_LINES (in-process); two
    through the installed script: one line on stderr, exit 2, nothing written."""
    for args, expected in (
        (["data=digits", "out=x", "encoding=webp"], "encoding=webp"),
        (["data=folder", "out=x", "data.source.path=nope"], "data.source.path"),
    ):
        p = difflab_cli("prepare", *args, cwd=tmp_path)
        assert p.returncode == 2, (args, p.stderr[-1000:])
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], (args, p.stderr)
    assert not any(tmp_path.iterdir())


# ------------------------------------------------------------------------------------- bad shard sets
def test_bad_shard_sets_are_one_line_naming_the_path(tmp_path, digit_shards, make_cfg):
    from difflab.train import train

    with pytest.raises(DifflabError, match=r"data.source.path=.*nope is not a directory"):
        ShardSource(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DifflabError, match=r"empty is empty: not a shard set; .*difflab-prepare"):
        ShardSource(str(tmp_path / "empty"))
    # A folder of images: the line says data=folder, and the prepare line it suggests works as given.
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, img in enumerate(digits_uint8()[:8]):
        Image.fromarray(img[0].numpy()).save(photos / f"{i}.png")
    with pytest.raises(DifflabError, match=r"holds images, not shards: train on them with data=folder") as e:
        ShardSource(str(photos))
    suggested = re.search(r"`difflab-prepare (.*)`", str(e.value))[1].split()
    PREPARE.call(suggested)
    assert len(ShardSource(f"{photos}_shards")) == 8
    # A truncated chunk (a copy cut short) is named, never a silent short epoch or a hang.
    cut = tmp_path / "cut"
    cut.mkdir()
    for f in digit_shards.iterdir():
        (cut / f.name).write_bytes(f.read_bytes())
    victim = sorted(cut.glob("chunk-*.bin"))[1]
    victim.write_bytes(victim.read_bytes()[:100])
    with pytest.raises(DifflabError, match=rf"shard chunk .*{victim.name} is truncated: 100 bytes"):
        ShardSource(str(cut))
    victim.unlink()
    with pytest.raises(DifflabError, match=rf"shard chunk .*{victim.name} is missing"):
        ShardSource(str(cut))
    (cut / "index.json").write_text('{"chunks": [{"filename": "chunk-0-0.bin"}]}')
    with pytest.raises(DifflabError, match=r"index.json is not a LitData index"):
        ShardSource(str(cut))
    # Shards of other channels or a smaller size than the config: one line at set-up.
    base = ("data=streaming", f"data.source.path={digit_shards}", "model/unet=tiny", "trainer.max_steps=1")
    with pytest.raises(DifflabError, match=r"have 1 channel\(s\) but data.channels=3"):
        train(make_cfg(*base, "data.resolution=8", "logger=none"))
    resized = tmp_path / "resized"
    PREPARE.call(["data=digits", f"out={resized}", "resolution=8"])
    with pytest.raises(DifflabError, match=r"were resized to 8 px but data.resolution=16"):
        train(
            make_cfg(
                *base[:1],
                f"data.source.path={resized}",
                *base[2:],
                "data.channels=1",
                "data.resolution=16",
                "logger=none",
            )
        )


def test_shards_not_written_by_difflab_prepare_are_one_line(tmp_path, monkeypatch):
    from litdata import optimize

    monkeypatch.setenv("DATA_OPTIMIZER_CACHE_FOLDER", str(tmp_path / "cache"))
    out = tmp_path / "other"
    optimize(
        fn=_plain_item,
        inputs=[0, 1],
        output_dir=str(out),
        chunk_bytes="1MB",
        num_workers=1,
        start_method="fork",
    )
    with pytest.raises(DifflabError, match=r"were not written by difflab-prepare"):
        ShardSource(str(out))


def _plain_item(i: int) -> dict:
    return {"x": i}


# ---------------------------------------------------------------------------------------- training


def test_ddp_ranks_read_disjoint_shards_that_cover_the_epoch(tmp_path):
    shards = tmp_path / "shards"
    PREPARE.call(["data=digits", "data.source.max_items=1024", f"out={shards}", SMALL_CHUNKS])
    p = difflab_cli(
        "train",
        *streaming_run(shards, "data.flip=false", "data.batch_size=32", "trainer.max_steps=16"),
        "trainer=ddp_cpu",  # Lightning's launcher: rank 1 reruns this command line
        "+callbacks.dump._target_=tests.helpers.DumpRankState",
        f"+callbacks.dump.path={tmp_path / 'dump'}",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / "dump" / f"rank{r}.pt") for r in (0, 1))
    assert r0["world_size"] == 2 and len(r0["seen"]) == len(r1["seen"]) == 16  # 1024 / 2 ranks / 32
    per_rank = [Counter(h for batch in r["seen"] for h in batch) for r in (r0, r1)]
    assert sum(per_rank[0].values()) == sum(per_rank[1].values()) == 512
    real = Counter(image_digest(img) for img in normalize_batch(digits_uint8()[:1024]))
    assert per_rank[0] + per_rank[1] == real  # together: every image once


def test_streaming_trains_with_fid_reference_from_the_shards(tmp_path, digit_shards, make_cfg):
    """The FID callback's real images and the offline classifier read the shards too."""
    from difflab.train import train

    cfg = make_cfg(
        *streaming_run(digit_shards, "trainer.max_steps=6"),
        "callbacks=with_fid",
        "callbacks.fid.every_n_steps=6",
        "callbacks.fid.num_samples=32",
        "callbacks.fid.num_real=256",
        "callbacks.fid.steps=2",
        "callbacks.sample_grid=null",
        run_dir=tmp_path / "run",
    )
    train(cfg)
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")["global_step"] == 6


def test_readme_streaming_lines_as_written(tmp_path):
    """The README's prepare/train lines, from a fresh directory (the placeholder image folder made
    here; the training lines given 2 steps of 8 images instead of the default job's 2,000 of 64)."""
    from PIL import Image

    from tests.test_readme_sweeps import readme_commands

    folder = tmp_path / "my_images"
    folder.mkdir()
    for i, img in enumerate(digits_uint8()[:200]):
        Image.fromarray(img[0].numpy()).resize((80, 64)).convert("RGB").save(folder / f"{i}.png")
    prepares, trains = readme_commands("prepare"), readme_commands("train")
    assert len(prepares) == 2
    for args in prepares:
        args = [a.replace("/path/to/images", str(folder)) for a in args]
        p = difflab_cli("prepare", *args, cwd=tmp_path)
        assert p.returncode == 0, p.stderr[-3000:]
        assert p.stdout.strip().splitlines()[-1].startswith("wrote ")
    streaming = [a for a in trains if "data=streaming" in a]
    assert len(streaming) == 2
    for args in streaming:
        short = ["model/unet=tiny", "trainer.max_steps=2", "data.batch_size=8", "callbacks.sample_grid=null",
                 "logger=none"]  # fmt: skip
        run = tmp_path / f"run_{len(list(tmp_path.glob('run_*')))}"
        p = difflab_cli("train", *args, *short, f"hydra.run.dir={run}", cwd=tmp_path)
        assert p.returncode == 0, p.stderr[-3000:]
        assert load_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == 2
