"""Post-hoc EMA (EDM2): the profile math, snapshots, reconstruction, and its use in every command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from difflab.diffusion.posthoc import (
    PowerFunctionEMA,
    beta,
    coefficients,
    exponent,
    inner_products,
    list_snapshots,
    reconstruct,
    relative_std,
)
from difflab.errors import DifflabError
from difflab.train import train
from tests.conftest import FAST_DIGITS, POSTHOC_22, compose_config
from tests.helpers import difflab_cli


def test_exponent_and_relative_std_invert_each_other():
    for std in (0.01, 0.05, 0.08, 0.1, 0.2, 0.25):
        assert relative_std(exponent(std)) == pytest.approx(std, rel=1e-9)
    # EDM2 (sec. 3.1): γ = 16.97 and 6.94 are σ_rel 0.05 and 0.10.
    assert exponent(0.05) == pytest.approx(16.97, abs=0.01) and exponent(0.10) == pytest.approx(
        6.94, abs=0.01
    )


def test_inner_products_match_numerical_integration():
    tau = np.linspace(0, 300, 3_000_001)

    def profile(t, g):
        return np.where(tau <= t, (g + 1) * tau**g / t ** (g + 1), 0.0)

    pairs = [((100, 0.05), (300, 0.1)), ((300, 0.2), (120, 0.05)), ((200, 0.1), (200, 0.1))]
    for (ta, sa), (tb, sb) in pairs:
        ga, gb = exponent(sa), exponent(sb)
        numeric = np.trapezoid(profile(ta, ga) * profile(tb, gb), tau)
        assert inner_products(ta, ga, tb, gb) == pytest.approx(numeric, rel=1e-4)


def test_tracking_follows_the_power_function_profile():
    # θ_τ = τ: a power-function average of it at step t has mean t (γ+1)/(γ+2) (the profile's mean).
    w = torch.nn.Linear(1, 1, bias=False)
    ema = PowerFunctionEMA(w, snapshot_dir="unused", stds=[0.05, 0.1])
    for t in range(1, 2001):
        with torch.no_grad():
            w.weight.fill_(float(t))
        ema.step(w.parameters())
    for std, profile in zip(ema.stds, ema.profiles, strict=True):
        g = exponent(std)
        assert float(profile[0]) == pytest.approx(2000 * (g + 1) / (g + 2), rel=2e-3)
    assert ema.cur_decay_value == pytest.approx(beta(exponent(0.1), 2000))


def _random_walk_snapshots(tmp_path: Path, stds, steps=200, every=20, seed=0, dtype="float32"):
    """A small model whose weights follow a random walk, tracked with ``stds`` and snapshotted."""
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    ema = PowerFunctionEMA(
        model, snapshot_dir=str(tmp_path / "snaps"), stds=stds, snapshot_every=every, snapshot_dtype=dtype
    )
    for _ in range(steps):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
        ema.step(model.parameters())
        if ema.snapshot_due():
            ema.write_snapshot()
    return model, ema


def test_reconstructing_a_tracked_length_at_a_snapshot_returns_that_profile(tmp_path):
    model, ema = _random_walk_snapshots(tmp_path, [0.05, 0.10])
    names = [n for n, _ in model.named_parameters()]
    snaps = list_snapshots(tmp_path / "snaps")
    assert [s.step for s in snaps] == list(range(20, 201, 20))
    for i, std in enumerate((0.05, 0.10)):
        rec = reconstruct(snaps, std, names)  # at the last snapshot (step 200)
        for name, tracked in zip(names, ema.profiles[i], strict=True):
            torch.testing.assert_close(rec[name], tracked, rtol=0, atol=1e-5)
    # ... and at an earlier snapshot step, from the snapshots up to it
    mid = load_file(str(tmp_path / "snaps" / "phema_0000100.safetensors"))
    rec = reconstruct(snaps, 0.05, names, step=100)
    for name in names:
        torch.testing.assert_close(rec[name], mid[f"0.05/{name}"], rtol=0, atol=1e-5)
    x = coefficients([100, 100, 200, 200], [0.05, 0.1, 0.05, 0.1], 200, 0.1)
    np.testing.assert_allclose(x, [0, 0, 0, 1], atol=1e-9)


def test_float16_snapshots_reconstruct_to_float16_precision(tmp_path):
    model, ema = _random_walk_snapshots(tmp_path, [0.05, 0.10], dtype="float16")
    names = [n for n, _ in model.named_parameters()]
    rec = reconstruct(list_snapshots(tmp_path / "snaps"), 0.10, names)
    for name, tracked in zip(names, ema.profiles[1], strict=True):
        torch.testing.assert_close(rec[name], tracked, rtol=1e-3, atol=1e-3)


def test_a_length_between_the_tracked_two_is_reconstructed_between_them(tmp_path):
    # Track 0.075 too (not snapshotted into the fit): the reconstruction from the 0.05 and 0.10
    # snapshots must land near it, and between the two tracked profiles.
    model, ema = _random_walk_snapshots(tmp_path, [0.05, 0.075, 0.10])
    names = [n for n, _ in model.named_parameters()]
    snaps = list_snapshots(tmp_path / "snaps")
    for s in snaps:  # pretend only 0.05 and 0.10 were tracked
        s.stds = [0.05, 0.10]
    rec = torch.cat([reconstruct(snaps, 0.075, names)[n].flatten() for n in names])
    lo, truth, hi = (torch.cat([t.flatten() for t in profile]) for profile in ema.profiles)
    span = (hi - lo).norm()
    assert (rec - lo).norm() < span and (rec - hi).norm() < span  # between them
    assert (rec - truth).norm() < 0.1 * span  # and close to the truly tracked 0.075


def test_snapshot_problems_are_one_line_naming_the_file(tmp_path):
    model, _ = _random_walk_snapshots(tmp_path, [0.05, 0.10], steps=100)
    names = [n for n, _ in model.named_parameters()]
    with pytest.raises(DifflabError, match="outside"):
        reconstruct(list_snapshots(tmp_path / "snaps"), 0.3, names)
    with pytest.raises(DifflabError, match=r"no post-hoc EMA snapshots in .*model/ema=posthoc"):
        list_snapshots(tmp_path / "nothing")
    (tmp_path / "snaps" / "phema_0000060.safetensors").unlink()
    with pytest.raises(DifflabError, match=r"phema_0000060\.safetensors is missing \(snapshots every 20"):
        list_snapshots(tmp_path / "snaps")
    (tmp_path / "snaps" / "phema_0000020.safetensors").unlink()  # the first one too
    with pytest.raises(DifflabError, match=r"phema_0000020\.safetensors is missing"):
        list_snapshots(tmp_path / "snaps")
    bad = tmp_path / "snaps" / "phema_0000080.safetensors"
    bad.write_bytes(bad.read_bytes()[:50])
    with pytest.raises(DifflabError, match=r"phema_0000080\.safetensors is truncated or corrupt"):
        list_snapshots(tmp_path / "snaps")


POSTHOC = POSTHOC_22


@pytest.fixture(scope="module")
def posthoc_run(trained_runs) -> Path:
    return trained_runs(*POSTHOC)


def test_training_writes_snapshots_and_the_last_step(posthoc_run):
    steps = [s.step for s in list_snapshots(posthoc_run / "ema_snapshots")]
    assert steps == [5, 10, 15, 20, 22]  # every 5, and the run's last step
    meta = list_snapshots(posthoc_run / "ema_snapshots")[-1]
    assert meta.stds == [0.05, 0.1] and meta.unet_config["block_out_channels"] == [16, 32]
    ckpt = torch.load(posthoc_run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["ema"]["kind"] == "posthoc" and len(ckpt["ema"]["profiles"]) == 2


def test_sample_export_and_eval_take_ema_std(posthoc_run, tmp_path):
    from diffusers import DiffusionPipeline

    from difflab.evaluate import COMMAND as EVAL
    from difflab.export import COMMAND as EXPORT
    from difflab.sample import COMMAND as SAMPLE

    ckpt = posthoc_run / "checkpoints" / "last.ckpt"
    a = SAMPLE.call([f"ckpt={ckpt}", "ema_std=0.08", "num_images=4", "steps=3", f"out={tmp_path / 'a'}"])
    b = SAMPLE.call([f"ckpt={ckpt}", "ema_std=0.2", "num_images=4", "steps=3", f"out={tmp_path / 'b'}"])
    assert len(a) == len(b) == 4
    assert any((tmp_path / "a" / p.name).read_bytes() != (tmp_path / "b" / p.name).read_bytes() for p in a)
    out = EXPORT.call([f"ckpt={ckpt}", "ema_std=0.08", f"out={tmp_path / 'pipe'}"])
    pipe = DiffusionPipeline.from_pretrained(out)
    names = [n for n, _ in pipe.unet.named_parameters()]
    want = reconstruct(list_snapshots(posthoc_run / "ema_snapshots"), 0.08, names)
    for name, p in pipe.unet.named_parameters():
        torch.testing.assert_close(p.detach(), want[name])
    rows = EVAL.call(
        [
            f"ckpt={ckpt}",
            "ema_std=[0.03,0.08,0.15]",
            "sampler=unipc",
            "steps=3",
            "num_samples=20",
            "num_real=100",
            "batch_size=20",
            f"metrics.cache_dir={tmp_path / 'cache'}",
            f"out={tmp_path / 'eval'}",
        ]
    )
    assert [r["ema_std"] for r in rows] == [0.03, 0.08, 0.15]
    assert (tmp_path / "eval" / "fid_vs_ema.png").stat().st_size > 1000
    assert json.loads((tmp_path / "eval" / "results.json").read_text()) == rows


def test_ema_std_on_a_standard_ema_run_is_one_line(tmp_path):
    from difflab.sample import COMMAND as SAMPLE

    run = tmp_path / "std"
    train(compose_config(run, (*FAST_DIGITS, "trainer.max_steps=3")))
    with pytest.raises(DifflabError, match=r"no post-hoc EMA snapshots in .*ema_snapshots"):
        SAMPLE.call([f"ckpt={run / 'checkpoints' / 'last.ckpt'}", "ema_std=0.1", f"out={tmp_path / 's'}"])


def test_snapshots_of_another_unet_are_refused(posthoc_run, tmp_path):
    from difflab.sample import COMMAND as SAMPLE

    other = tmp_path / "other"
    train(compose_config(other, (*POSTHOC, "trainer.max_steps=5", "model.unet.block_out_channels=[8,16]")))
    ckpt = torch.load(posthoc_run / "checkpoints" / "last.ckpt", weights_only=True)
    ckpt["difflab"]["snapshot_dir"] = str(other / "ema_snapshots")  # RunRecord.snapshot_dir
    moved = tmp_path / "moved" / "checkpoints" / "last.ckpt"
    moved.parent.mkdir(parents=True)
    torch.save(ckpt, moved)
    with pytest.raises(DifflabError, match=r"were written by another UNet .*block_out_channels"):
        SAMPLE.call([f"ckpt={moved}", "ema_std=0.1", f"out={tmp_path / 's'}"])


def test_identical_snapshots_are_identical_files(tmp_path):
    # safetensors writes its metadata in a per-call random order (a Rust HashMap): 18 of 20 differed.
    model = torch.nn.Linear(3, 2)
    files = []
    for i in range(5):
        ema = PowerFunctionEMA(model, snapshot_dir=str(tmp_path / str(i)), snapshot_every=1)
        ema.step(model.parameters())
        files.append(ema.write_snapshot().read_bytes())
    assert len(set(files)) == 1
    assert [s.step for s in list_snapshots(tmp_path / "0")] == [1]  # still a readable snapshot


def test_cli_refuses_an_out_of_range_ema_std(tmp_path):
    p = difflab_cli("sample", f"ckpt={tmp_path}", "ema_std=0.5", cwd=tmp_path)
    assert p.returncode == 2 and "ema_std=0.5 must be between 0.01 and 0.25" in p.stderr
