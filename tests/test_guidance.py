"""Autoguidance (diffusion/guidance.py): w = 1 is unguided bit for bit, a guide identical to the model
changes nothing at any w, guidance sharpens a two-Gaussian toy with a blurred guide, MeanFlow's second time
reaches both networks; difflab-sample, -eval (the sweep and its plot), -export (a pipeline diffusers loads)
and the FID callback take a guide; bad input is one line each."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, UNet2DModel
from PIL import Image
from torch import nn

from difflab.diffusion.guidance import GuidedUNet
from difflab.diffusion.pipeline import MeanFlowScheduler
from difflab.diffusion.sampling import build_sampler, image_generators, sample_batch
from difflab.evaluate import COMMAND as EVAL
from difflab.export import COMMAND as EXPORT
from difflab.sample import COMMAND as SAMPLE
from difflab.train import train
from tests.conftest import FAST_DIGITS, POSTHOC_22, compose_config
from tests.helpers import refused_line

# A flow digits run with a checkpoint every 10 steps: its step-10 checkpoint is the weaker guide.
GUIDED_30 = (
    *FAST_DIGITS,
    "trainer.max_steps=30",
    "callbacks.model_checkpoint.every_n_train_steps=10",
    "callbacks.model_checkpoint.save_top_k=-1",
)


@pytest.fixture(scope="module")
def run(trained_runs):
    return trained_runs(*GUIDED_30)


def small_unet(**kw) -> UNet2DModel:
    """A randomly initialised 8 px UNet: a network for the tests that need no training."""
    blocks = {"down_block_types": ("DownBlock2D",) * 2, "up_block_types": ("UpBlock2D",) * 2}
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                       layers_per_block=1, norm_num_groups=8, **blocks, **kw).eval()  # fmt: skip


def pixels(paths) -> list[np.ndarray]:
    return [np.asarray(Image.open(p)).astype(int) for p in paths]


def sample(tmp_path, name, ckpt, *args) -> list[np.ndarray]:
    common = [f"ckpt={ckpt}", "num_images=6", "steps=6", "seed=3", "grid=false"]
    return pixels(SAMPLE.call([*common, f"out={tmp_path / name}", *args]))


def test_weight_one_is_unguided_and_an_identical_guide_changes_nothing(run, tmp_path):
    ckpt = run / "checkpoints" / "last.ckpt"
    plain = sample(tmp_path, "plain", ckpt)
    assert all(
        np.array_equal(a, b)
        for a, b in zip(plain, sample(tmp_path, "w1", ckpt, "guide=step:10"), strict=True)
    )
    guided = sample(tmp_path, "w2", ckpt, "guide=step:10", "guidance=2.0")
    assert any(not np.array_equal(a, b) for a, b in zip(plain, guided, strict=True))  # the guide acts
    for w in (0.5, 2.0, 3.0):  # D_bad + w·(D − D_bad) = D when D_bad = D, whatever w
        same = sample(tmp_path, f"self{w}", ckpt, f"guide={ckpt}", f"guidance={w}")
        assert all(np.array_equal(a, b) for a, b in zip(plain, same, strict=True)), w

    class Refuses(nn.Module):
        def forward(self, *args, **kwargs):
            raise AssertionError("the guide ran at w = 1")

    unet = small_unet()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor(500)
    assert torch.equal(GuidedUNet(unet, Refuses(), 1.0)(x, t).sample, unet(x, t).sample)


class MixtureVelocity(nn.Module):
    """The exact flow velocity E[ε − x | z_t] for data ½N(−m, s²) + ½N(m, s²) per pixel (z_t = (1−t)x + tε):
    for a component of mean μ, var_t = (1−t)²s² + t², E[x | z_t] = μ + (1−t)s²/var_t·(z_t − (1−t)μ) and
    E[ε | z_t] = t/var_t·(z_t − (1−t)μ), weighted by the components' posterior probabilities."""

    def __init__(self, std: float, mean: float = 0.6, size: int = 2) -> None:
        super().__init__()
        self.std, self.means = std, torch.tensor([-mean, mean])
        self.config = SimpleNamespace(in_channels=1, sample_size=size)

    def forward(self, z: torch.Tensor, timestep: torch.Tensor, **kwargs) -> SimpleNamespace:
        t = (timestep.float() / 1000).clamp(1e-4, 1)
        var = (1 - t) ** 2 * self.std**2 + t**2
        diff = z[None] - (1 - t) * self.means.view(2, 1, 1, 1, 1)  # (component, n, 1, H, W)
        resp = torch.softmax(-(diff**2).sum((2, 3, 4)) / (2 * var), dim=0).view(2, -1, 1, 1, 1)
        v = (t / var) * diff - (self.means.view(2, 1, 1, 1, 1) + (1 - t) * self.std**2 / var * diff)
        return SimpleNamespace(sample=(resp * v).sum(0))


def test_guidance_by_a_blurred_guide_sharpens_a_two_gaussian_toy():
    """The model is exact (modes of std 0.1); the guide believes std 0.3. Unguided samples have the
    data's spread; guided ones (w = 2, 3) sit measurably closer to the modes, still split between both."""
    good, blurred = MixtureVelocity(0.1), MixtureVelocity(0.3)

    def spread(w: float) -> tuple[float, float]:
        sampler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
        img = sample_batch(GuidedUNet(good, blurred, w), sampler, range(400), 0, 40, device="cpu")
        x = img * 2 - 1  # back to data units (the means ±0.6 are far inside the clamp)
        dist = (x[None] - good.means.view(2, 1, 1, 1, 1)).pow(2).mean((2, 3, 4)).sqrt()  # RMS to each mode
        return dist.min(0).values.mean().item(), (dist[1] < dist[0]).float().mean().item()

    unguided, share = spread(1.0)
    assert 0.06 < unguided < 0.12 and 0.4 < share < 0.6  # the data's std 0.1 (RMS over 4 pixels ~ 0.09)
    for w in (2.0, 3.0):
        sharp, share = spread(w)
        assert sharp < 0.7 * unguided and 0.4 < share < 0.6, (w, sharp, unguided)


def test_meanflow_second_time_reaches_the_model_and_the_guide():
    """The MeanFlow sampler's extra input (class_labels = (t − r)·T) goes to both networks: a guide equal
    to the model changes nothing, another guide changes the images."""
    torch.manual_seed(0)

    model, other = small_unet(class_embed_type="timestep"), small_unet(class_embed_type="timestep")
    draw = lambda net: sample_batch(net, MeanFlowScheduler(), range(3), 0, 2, device="cpu")  # noqa: E731
    plain = draw(model)
    assert torch.equal(draw(GuidedUNet(model, model, 2.5)), plain)
    assert not torch.allclose(draw(GuidedUNet(model, other, 2.5)), plain)


def test_eval_sweeps_guides_and_weights(run, tmp_path, capsys):
    out = tmp_path / "eval"
    rows = EVAL.call(
        [
            f"ckpt={run / 'checkpoints' / 'last.ckpt'}",
            "guide=[step:10,step:20]",
            "guidance=[1.0,2.0]",
            "steps=[3]",
            "num_samples=30",
            "num_real=200",
            "batch_size=30",
            f"metrics.cache_dir={tmp_path / 'cache'}",
            f"out={out}",
        ]
    )
    # Unguided once, then each guide at w = 2; the guide's evaluations are counted.
    assert [(r["guide"], r["guidance"], r["evaluations"]) for r in rows] == [
        (None, 1.0, 3),
        ("step:10", 2.0, 6),
        ("step:20", 2.0, 6),
    ]
    fids = [r["val/fid_classifier_30"] for r in rows]
    assert len(set(fids)) == 3 and all(f > 0 for f in fids)
    assert json.loads((out / "results.json").read_text()) == rows
    assert (out / "fid_vs_guidance.png").stat().st_size > 1000
    best = min(rows, key=lambda r: r["val/fid_classifier_30"])
    assert f"best: guide={best['guide']} guidance={best['guidance']}" in capsys.readouterr().out


def test_posthoc_ema_guide(trained_runs, tmp_path):
    """ema:S guides a post-hoc EMA run with a shorter EMA of itself."""
    ckpt = trained_runs(*POSTHOC_22) / "checkpoints" / "last.ckpt"
    plain = sample(tmp_path, "plain", ckpt, "ema_std=0.1")
    guided = sample(tmp_path, "guided", ckpt, "ema_std=0.1", "guide=ema:0.03", "guidance=2.0")
    assert any(not np.array_equal(a, b) for a, b in zip(plain, guided, strict=True))


def test_guided_export_loads_in_diffusers_and_draws_difflab_sample_images(run, tmp_path):
    ckpt = run / "checkpoints" / "last.ckpt"
    out = EXPORT.call([f"ckpt={ckpt}", f"out={tmp_path / 'pipe'}", "guide=step:10", "guidance=2.0"])
    assert {p.name for p in out.iterdir()} >= {
        "unet",
        "guide",
        "scheduler",
        "model_index.json",
        "pipeline.py",
    }
    code = (out / "pipeline.py").read_text()
    assert "import difflab" not in code and "from difflab" not in code  # loads without difflab
    pipe = DiffusionPipeline.from_pretrained(out, custom_pipeline=str(out), trust_remote_code=True)
    assert (type(pipe).__name__, pipe.config.guidance) == ("DifflabPipeline", 2.0)
    pipe.scheduler = build_sampler("dpmsolver++", pipe.scheduler.config)  # difflab-sample's default
    ref = pipe(batch_size=4, generator=image_generators(7, range(4)), num_inference_steps=6, output_type="np")
    ours = SAMPLE.call(
        [
            f"ckpt={ckpt}",
            "num_images=4",
            "seed=7",
            "steps=6",
            "guide=step:10",
            "guidance=2.0",
            f"out={tmp_path / 's'}",
            "grid=false",
        ]
    )
    for i, img in enumerate(pixels(ours)):
        assert np.abs(img[..., 0] - np.round(ref.images[i, ..., 0] * 255)).max() <= 1.0


def cheap_fid(cache: Path) -> list[str]:
    """The FID callback every 10 steps on 20 samples of 3 steps against 100 real images."""
    return [
        "callbacks=with_fid",
        "callbacks.fid.every_n_steps=10",
        "callbacks.fid.num_samples=20",
        "callbacks.fid.num_real=100",
        "callbacks.fid.batch_size=20",
        "callbacks.fid.steps=3",
        f"metrics.cache_dir={cache}",
    ]


def test_fid_callback_guided_by_the_runs_own_earlier_weights_survives_a_resume(tmp_path):
    """callbacks.fid.guide=step:10: the EMA weights of step 10 guide every later FID (at step 10 itself
    the guide is the model: unguided values); fid.jsonl names the guide. They travel in the checkpoint: a
    run resumed from step 20 (a fresh process) logs the uninterrupted run's guided FID at step 30."""
    import shutil

    fid = [*cheap_fid(tmp_path / "cache"), "callbacks.fid.guide=step:10", "callbacks.fid.guidance=2.0"]
    args = [*GUIDED_30, *fid]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    train(compose_config(whole, args))
    lines = [json.loads(x) for x in (whole / "fid.jsonl").read_text().splitlines()]
    assert [(r["step"], r["guide"], r["guidance"]) for r in lines] == [
        (s, "step:10", 2.0) for s in (10, 20, 30)
    ]
    shutil.copytree(whole, resumed)
    for ckpt in (resumed / "checkpoints").glob("*.ckpt"):  # last, step 30, the best-FID checkpoint
        if ckpt.name not in ("step_0000010.ckpt", "step_0000020.ckpt"):
            ckpt.unlink()
    (resumed / "fid.jsonl").write_text("")
    train(compose_config(resumed, args))  # ckpt_path=last: from step 20
    again = [json.loads(x) for x in (resumed / "fid.jsonl").read_text().splitlines()]
    key = "val/fid_classifier_20"
    assert [(r["step"], r["guide"], r[key]) for r in again] == [(30, "step:10", lines[2][key])]
    # The callback's own state holds the guide: without it the resumed FID would be unguided.
    from difflab.checkpoints import load_checkpoint

    state = load_checkpoint(whole / "checkpoints" / "step_0000020.ckpt")["callbacks"]
    assert any(v.get("guide") == "step:10" and "guide_weights" in v for v in state.values())


BAD = [
    (["guidance=-1"], "guidance=-1 must be at least 0"),
    (["guidance=abc"], "guidance=abc must be a number"),
    (
        ["guidance=2"],
        "guidance=2 needs a guide: give guide=PATH, guide=step:N, guide=ema:S or guide=alongside",
    ),
    (
        ["guide=step:15", "guidance=2"],
        "guide=step:15: {ckpt}'s run has no checkpoint of step 15 (saved steps: 10, 20, 30)",
    ),
    (["guide={file}", "guidance=2"], "guide={file} is not a difflab checkpoint or exported pipeline"),
    (["guide={dir}/nope.ckpt", "guidance=2"], "guide={dir}/nope.ckpt does not exist"),
    (
        ["guide={ddpm}", "guidance=2"],
        "guide={ddpm} cannot guide {ckpt}: it differs in objective ddpm (the model: flow)",
    ),
    (
        ["guide={wide}", "guidance=2"],
        "guide={wide} cannot guide {ckpt}: it differs in sample_size 16 (the model: 8); "
        "in_channels 3 (the model: 1)",
    ),
    (["guide=ema:0.05", "guidance=2"], "guide=ema:0.05: {ckpt}'s run has no post-hoc EMA snapshots"),
]


@pytest.mark.parametrize("command", [SAMPLE, EVAL, EXPORT], ids=["sample", "eval", "export"])
@pytest.mark.parametrize(("args", "line"), BAD, ids=[a[0] for a, _ in BAD])
def test_bad_guides_are_one_line_at_start_up(command, args, line, run, ckpts, tmp_path, monkeypatch, capsys):
    ckpt = run / "checkpoints" / "last.ckpt"
    wide = tmp_path / "wide.ckpt"  # the same run's checkpoint, as if trained on 16 px RGB images
    state = torch.load(ckpt, weights_only=True, mmap=True)
    state["difflab"]["unet_config"] = {**state["difflab"]["unet_config"], "sample_size": 16, "in_channels": 3}
    torch.save(state, wide)
    paths = {"ckpt": ckpt, "ddpm": ckpts["ddpm"], "wide": wide}
    got = refused_line(command, ["ckpt={ckpt}", *args, "out={dir}/out"], tmp_path, monkeypatch, capsys, paths)
    expected = line.format(**paths, dir=tmp_path / "inputs", file=tmp_path / "inputs" / "notes.txt")
    assert expected in got, got


def test_readme_autoguidance_lines_as_written(tmp_path):
    """The README's autoguidance block, each line run as written and in its order, with cheap overrides
    appended (later overrides win)."""
    from tests.helpers import difflab_cli
    from tests.test_readme_sweeps import readme_commands

    def ours(args: list[str]) -> bool:
        return any(a.startswith("guide=") or a == "hydra.run.dir=logs/runs/digits_guided" for a in args)

    lines = [(c, a) for c in ("train", "sample", "eval", "export") for a in readme_commands(c) if ours(a)]
    assert [c for c, _ in lines] == ["train", "sample", "eval", "export"]
    cheap = {"train": ["logger=none"], "sample": ["num_images=8"], "eval": ["num_samples=60", "num_real=300"]}
    for command, args in lines:
        p = difflab_cli(command, *args, *cheap.get(command, []), cwd=tmp_path)
        assert p.returncode == 0, (command, p.stderr[-3000:])
    rows = json.loads((tmp_path / "eval_guidance" / "results.json").read_text())
    assert [(r["guide"], r["guidance"]) for r in rows] == [
        (None, 1.0),
        *[(g, w) for g in ("step:100", "alongside") for w in (1.5, 2.0, 2.5)],
    ]
    assert (tmp_path / "eval_guidance" / "fid_vs_guidance.png").is_file()
    assert len(list((tmp_path / "samples_guided").glob("*.png"))) == 9  # 8 images + grid.png
    index = json.loads((tmp_path / "exported" / "digits_guided" / "model_index.json").read_text())
    assert index["_class_name"] == "DifflabPipeline" and index["guidance"] == 2.0 and index["guide"][0]
