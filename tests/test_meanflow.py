"""MeanFlow (diffusion/meanflow.py): the JVP target, one-step sampling on a data set whose average
velocity is known, the sampler and its refusals, and a trained model through sample and eval."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from difflab.diffusion.meanflow import MeanFlowProcess
from difflab.diffusion.noise import NoiseLevels, objective_of
from difflab.diffusion.pipeline import MeanFlowScheduler
from difflab.diffusion.sampling import build_sampler, sample_batch, sampler_problem, steps_problem
from difflab.diffusion.unet import UNet2DModel
from difflab.errors import DifflabError
from difflab.evaluate import COMMAND as EVAL
from difflab.export import COMMAND as EXPORT
from difflab.sample import COMMAND as SAMPLE
from tests.conftest import FAST_DIGITS

MEANFLOW = dict(MeanFlowScheduler().config)
FLOW = {"num_train_timesteps": 1000, "shift": 3.0}
DDPM = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_schedule": "linear"}


def tiny_meanflow_unet(seed: int = 0) -> UNet2DModel:
    """tests/test_sampling.py's tiny UNet with attention (the JVP through SDPA too) and the second
    time's slot."""
    from tests.test_sampling import tiny_unet

    config = tiny_unet(
        seed,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        class_embed_type="timestep",
    ).config
    torch.manual_seed(seed)
    return UNet2DModel.from_config(config)  # difflab's class (its bf16/float64 fix), in train mode


def test_jvp_target_equals_reverse_mode_derivatives_of_the_network():
    """target = v − (t−r)·du/dt with du/dt = ∂u/∂z·v + ∂u/∂t (r fixed), from one forward-mode pass:
    checked against the same derivative from reverse mode (w·du/dt = ∇_z(w·u)·v + T·∂(w·u)/∂(tT) +
    T·∂(w·u)/∂((t−r)T) for a random w), in float64. A finite difference is too coarse here: diffusers
    projects the timestep in float32, whose rounding a small step h amplifies."""
    unet = tiny_meanflow_unet().double()
    process = MeanFlowProcess(MeanFlowScheduler())
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 1, 8, 8, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64)
    w = torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([900.0, 600.0, 300.0, 800.0], dtype=torch.float64)
    r = torch.tensor([100.0, 600.0, 50.0, 790.0], dtype=torch.float64)  # one r = t: target v
    u, target = process.average_velocity_and_target(unet, x0, noise, t, r)

    sigma = (t / 1000).view(-1, 1, 1, 1)
    z = ((1 - sigma) * x0 + sigma * noise).requires_grad_()
    v = noise - x0
    times, gaps = t.clone().requires_grad_(), (t - r).requires_grad_()
    out = unet(z, times, class_labels=gaps).sample
    dz, dt, dgap = torch.autograd.grad((w * out).sum(), (z, times, gaps))
    expected = (dz * v).sum(dim=(1, 2, 3)) + 1000 * (dt + dgap)  # w·du/dt, per sample
    moved = (t - r) > 0
    got = (w * (v - target)).sum(dim=(1, 2, 3))[moved] / ((t - r)[moved] / 1000)
    assert torch.allclose(u, out, atol=1e-10)
    assert torch.allclose(got, expected[moved], rtol=1e-4), (got, expected[moved])
    assert torch.equal(target[1], v[1])  # r = t: plain flow matching
    assert (target - v).abs().max() > 1e-2  # the JVP term is not negligible here: the check can fail
    assert not target.requires_grad and u.requires_grad


def test_samples_at_r_equal_t_take_a_plain_pass_with_the_jvp_passs_results():
    """The first round(ratio·n) samples go through the JVP pass; the rest (r = t) through a plain pass,
    which must give what the JVP pass would: the prediction, and the velocity as the target."""
    unet = tiny_meanflow_unet()
    process = MeanFlowProcess(MeanFlowScheduler(ratio=0.5))
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.rand(8, 1, 8, 8, generator=g) * 2 - 1, torch.randn(8, 1, 8, 8, generator=g)
    t = process.timesteps(8, g, "cpu")
    pred, target, t_used = process.prediction_and_target(unet, x0, noise, t, torch.Generator().manual_seed(1))
    other = process.timesteps(8, torch.Generator().manual_seed(1), "cpu")
    hi, lo = torch.maximum(t, other), torch.minimum(t, other)
    r = torch.cat([lo[:4], hi[4:]])
    u, expected = process.average_velocity_and_target(unet, x0, noise, hi, r)
    assert torch.equal(t_used, hi) and (r[:4] < hi[:4]).all()
    assert torch.allclose(pred, u, atol=1e-5) and torch.allclose(target, expected, atol=1e-5)
    assert torch.equal(target[4:], noise[4:] - x0[4:])


def test_one_step_lands_on_a_one_image_data_set():
    """With one image c every path is straight, so the exact average velocity is u = (z_t − c)/t
    and one jump from pure noise lands on c: a trained tiny network must get there in 1 and 2 steps."""
    unet = tiny_meanflow_unet()
    scheduler = MeanFlowScheduler(ratio=0.5)
    process = MeanFlowProcess(scheduler, NoiseLevels(density="logit_normal", logit_mean=-0.4))
    g = torch.Generator().manual_seed(0)
    c = torch.rand(1, 1, 8, 8, generator=g) * 2 - 1
    x0 = c.expand(32, 1, 8, 8)
    optimizer = torch.optim.Adam(unet.parameters(), lr=2e-3)
    for _ in range(120):
        noise = torch.randn(x0.shape, generator=g)
        pred, target, _ = process.prediction_and_target(unet, x0, noise, process.timesteps(32, g, "cpu"), g)
        loss = process.objective_loss((pred - target).pow(2).mean(dim=(1, 2, 3)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    unet.eval()
    image = (c / 2 + 0.5).clamp(0, 1)
    errors = {
        steps: (sample_batch(unet, build_sampler("meanflow", MEANFLOW), range(16), 1, steps) - image)
        .abs()
        .mean()
        for steps in (1, 2)
    }
    noise_error = (torch.rand(16, 1, 8, 8, generator=g) - image).abs().mean()
    assert errors[1] < 0.1 and errors[2] < 0.1 and noise_error > 0.25, (errors, noise_error)


def test_the_sampler_jumps_from_pure_noise_to_the_data_in_equal_steps():
    sampler = build_sampler("meanflow", MEANFLOW)
    sampler.set_timesteps(4)
    assert sampler.timesteps.tolist() == [1000.0, 750.0, 500.0, 250.0]
    x = torch.ones(2, 1, 2, 2)
    assert torch.equal(
        sampler.model_inputs(sampler.timesteps[0], 2)["class_labels"], torch.tensor([250.0] * 2)
    )
    x = sampler.step(torch.full_like(x, 2.0), sampler.timesteps[0], x).prev_sample  # z_r = z_t − 0.25·u
    assert torch.allclose(x, torch.full_like(x, 0.5))
    assert objective_of(MEANFLOW) == "meanflow" and objective_of(FLOW) == "flow"


@pytest.mark.parametrize(
    ("name", "config", "message"),
    [
        ("dpmsolver++", MEANFLOW, "the dpmsolver++ sampler cannot sample a MeanFlow model"),
        ("flow_euler", MEANFLOW, "use sampler=meanflow"),
        (
            "meanflow",
            FLOW,
            "the meanflow sampler is for MeanFlow models (model=meanflow); this is a flow model",
        ),
        ("meanflow", DDPM, "this is a ddpm model"),
    ],
)
def test_samplers_across_objectives_are_refused(name, config, message):
    assert message in sampler_problem(name, config)
    with pytest.raises(DifflabError, match="sampler"):
        build_sampler(name, config)


def test_steps_above_the_time_scale_are_refused():
    assert steps_problem("meanflow", MEANFLOW, 1000) is None
    assert "give steps<=1000 (MeanFlow models sample in 1-4)" in steps_problem("meanflow", MEANFLOW, 1001)


# ------------------------------------------------------------------------------ a trained MeanFlow model
@pytest.fixture(scope="module")
def meanflow_ckpt(trained_runs):
    return trained_runs(*FAST_DIGITS, "model=meanflow", "trainer.max_steps=20") / "checkpoints" / "last.ckpt"


def test_sample_and_eval_at_one_two_and_four_steps(meanflow_ckpt, tmp_path):
    """Images depend on (seed, index) alone; eval's table holds a row per step count."""
    for steps in (1, 2, 4):
        a = SAMPLE.call([f"ckpt={meanflow_ckpt}", "sampler=meanflow", f"steps={steps}", "num_images=4",
                         "batch_size=4", f"out={tmp_path / f'a{steps}'}"])  # fmt: skip
        b = SAMPLE.call([f"ckpt={meanflow_ckpt}", "sampler=meanflow", f"steps={steps}", "num_images=4",
                         "batch_size=3", f"out={tmp_path / f'b{steps}'}"])  # fmt: skip
        for p, q in zip(a, b, strict=True):
            assert (
                np.abs(np.asarray(Image.open(p)).astype(int) - np.asarray(Image.open(q)).astype(int)).max()
                <= 1
            )
    one, four = (np.asarray(Image.open(tmp_path / f"a{s}" / "0.png")).astype(int) for s in (1, 4))
    assert np.abs(one - four).max() > 0  # the step count matters
    rows = EVAL.call([f"ckpt={meanflow_ckpt}", "sampler=meanflow", "steps=[1,2,4]", "num_samples=20",
                      "num_real=100", "batch_size=20", f"metrics.cache_dir={tmp_path / 'cache'}",
                      f"out={tmp_path / 'eval'}"])  # fmt: skip
    assert [r["steps"] for r in rows] == [1, 2, 4] and all(r["val/fid_classifier_20"] > 0 for r in rows)
    assert json.loads((tmp_path / "eval" / "results.json").read_text()) == rows


@pytest.mark.parametrize("steps", [1, 2])
def test_export_loads_in_diffusers_with_its_own_pipeline_and_draws_difflab_samples_images(
    steps, meanflow_ckpt, tmp_path
):
    """The folder's pipeline.py (torch and diffusers only) loads with one documented line and draws,
    for the same per-image generators, difflab-sample's images; difflab-sample reads the folder too."""
    from diffusers import DiffusionPipeline

    from difflab.diffusion.sampling import image_generators

    out = EXPORT.call([f"ckpt={meanflow_ckpt}", f"out={tmp_path / 'pipe'}"])
    assert not re.search(r"^\s*(from|import) difflab", (out / "pipeline.py").read_text(), flags=re.M)
    pipe = DiffusionPipeline.from_pretrained(out, custom_pipeline=str(out), trust_remote_code=True)
    assert type(pipe).__name__ == "DifflabPipeline"
    ref = pipe(
        batch_size=3, generator=image_generators(7, range(3)), num_inference_steps=steps, output_type="np"
    )
    common = ["sampler=meanflow", f"steps={steps}", "num_images=3", "seed=7", "grid=false"]
    ours = SAMPLE.call([f"ckpt={meanflow_ckpt}", *common, f"out={tmp_path / 's'}"])
    again = SAMPLE.call([f"ckpt={out}", *common, f"out={tmp_path / 'e'}"])
    for i, (p, q) in enumerate(zip(ours, again, strict=True)):
        mine = np.asarray(Image.open(p))[..., 0].astype(float)
        assert np.abs(mine - np.round(ref.images[i, ..., 0] * 255)).max() <= 1
        assert np.abs(np.asarray(Image.open(q))[..., 0].astype(float) - mine).max() <= 1


def test_two_ddp_ranks_train_a_meanflow_model(tmp_path):
    """trainer=ddp_cpu (gloo, Lightning's launcher): the JVP pass under DDP's gradient hooks."""
    from difflab.checkpoints import load_checkpoint
    from tests.helpers import difflab_cli

    run = tmp_path / "run"
    p = difflab_cli(
        "train", "experiment=digits", "model=meanflow", "trainer=ddp_cpu", "trainer.max_steps=4",
        "data.batch_size=16", "callbacks.sample_grid=null", "callbacks.progress_bar=null", "logger=none",
        f"hydra.run.dir={run}", cwd=tmp_path,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    ckpt = load_checkpoint(run / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 4 and ckpt["difflab"]["scheduler_config"]["objective"] == "meanflow"


def test_readme_meanflow_lines_as_written(tmp_path):
    """The README's MeanFlow block, each line run as written and in its order, with cheap overrides
    appended (later overrides win): 20 training steps, 100 samples per FID."""
    from difflab.checkpoints import load_checkpoint
    from tests.helpers import difflab_cli
    from tests.test_readme_sweeps import readme_commands

    def ours(args: list[str]) -> bool:
        return any(a in ("model=meanflow", "sampler=meanflow", "hydra.run.dir=logs/runs/flow") for a in args)

    lines = [(c, a) for c in ("train", "sample", "eval") for a in readme_commands(c) if ours(a)]
    assert [c for c, _ in lines] == ["train", "train", "train", "sample", "eval"]
    trains = {a[-1].removeprefix("hydra.run.dir=logs/runs/"): a for c, a in lines if c == "train"}
    assert sorted(trains) == ["flow", "meanflow", "meanflow_tuned"]
    cheap = {"train": ["trainer.max_steps=20", "logger=none"], "sample": [], "eval": ["num_samples=100"]}
    runs = [("train", trains["meanflow"]), *[(c, a) for c, a in lines if c != "train"],
            ("train", trains["flow"]), ("train", trains["meanflow_tuned"])]  # fmt: skip
    for command, args in runs:
        p = difflab_cli(command, *args, *cheap[command], cwd=tmp_path)
        assert p.returncode == 0, (command, p.stderr[-3000:])
    for run in ("meanflow", "flow", "meanflow_tuned"):
        assert load_checkpoint(tmp_path / f"logs/runs/{run}/checkpoints/last.ckpt")["global_step"] == 20
    assert len(list((tmp_path / "samples_1step").glob("*.png"))) == 65  # 64 images + grid.png
    rows = json.loads((tmp_path / "eval_meanflow" / "results.json").read_text())
    assert [(r["sampler"], r["steps"]) for r in rows] == [("meanflow", 1), ("meanflow", 2), ("meanflow", 4)]


# ------------------------------------------------------------------ starting from a trained run (init_from)
def test_init_from_a_flow_run_or_its_export_is_the_flow_model_at_r_equal_t(ckpts):
    """The flow UNet's EMA weights are copied and the second time's embedding outputs zero: for every
    gap t − r the new model gives the flow model's velocity."""
    from difflab.inference import init_weights, load_trained_unet

    flow, flow_sched, _ = load_trained_unet(ckpts["flow"])
    x = torch.randn(3, flow.config.in_channels, flow.config.sample_size, flow.config.sample_size)
    t = torch.tensor([900.0, 500.0, 100.0])
    with torch.no_grad():
        expected = flow(x, t).sample
    for source in (ckpts["flow"], ckpts["pipe"]):
        unet = UNet2DModel.from_config(flow.config, class_embed_type="timestep")
        init_weights(unet, MEANFLOW, str(source))
        with torch.no_grad():
            for gap in (torch.zeros(3), torch.tensor([900.0, 250.0, 50.0])):
                assert torch.allclose(unet(x, t, class_labels=gap).sample, expected, atol=1e-6)
    assert flow_sched["num_train_timesteps"] == MEANFLOW["num_train_timesteps"]


def test_a_run_from_init_from_starts_its_own_count_and_records_the_source(ckpts, make_cfg, tmp_path):
    from difflab.checkpoints import load_checkpoint
    from difflab.train import train

    run = tmp_path / "run"
    cfg = make_cfg(*FAST_DIGITS, "model=meanflow", f"model.init_from={ckpts['flow']}", "trainer.max_steps=3",
                   run_dir=run)  # fmt: skip
    train(cfg)
    ckpt = load_checkpoint(run / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 3 and ckpt["lr_schedulers"][0]["last_epoch"] == 3
    assert ckpt["difflab"]["config"]["model"]["init_from"] == str(ckpts["flow"])


@pytest.mark.parametrize(
    ("source", "extra", "message"),
    [
        ("{tmp}/missing.ckpt", (), "model.init_from={tmp}/missing.ckpt does not exist"),
        ("{ddpm}", (), "is a ddpm model; a model=meanflow run starts from a flow or meanflow one"),
        ("{truncated}", (), "is truncated or corrupt"),
        ("{full}", (), "is neither a checkpoint file nor an exported pipeline"),
        (
            "{flow}",
            ("data.resolution=16",),
            "differs from this run in model.unet.sample_size (init_from 8, config 16)",
        ),
        ("{flow}", ("data=fashion_mnist", "data.resolution=8", "data.channels=3"), "model.unet.in_channels"),
        (
            "{flow}",
            ("model.noise_scheduler.num_train_timesteps=100",),
            "model.noise_scheduler.num_train_timesteps",
        ),
    ],
)
def test_init_from_mistakes_are_one_line_and_leave_no_run_dir(
    source, extra, message, ckpts, tmp_path, monkeypatch, capsys
):
    from difflab.train import COMMAND as TRAIN
    from tests.helpers import refused_line

    files = {**ckpts, "tmp": tmp_path}
    args = ["experiment=digits", "model=meanflow", "callbacks.sample_grid.sampler=meanflow", "logger=none",
            f"model.init_from={source}", *extra]  # fmt: skip
    line = refused_line(TRAIN, args, tmp_path, monkeypatch, capsys, files)
    assert message.format(**files) in line, line


def test_a_resume_does_not_read_init_from_again(ckpts, make_cfg, tmp_path):
    """The resumed weights come from the run's checkpoint: its source may be gone by then."""
    import shutil

    from difflab.checkpoints import load_checkpoint
    from difflab.train import train

    source = tmp_path / "source.ckpt"
    shutil.copy(ckpts["flow"], source)
    run = tmp_path / "run"
    args = (*FAST_DIGITS, "model=meanflow", f"model.init_from={source}")
    train(make_cfg(*args, "trainer.max_steps=3", run_dir=run))
    source.unlink()
    train(make_cfg(*args, "trainer.max_steps=5", run_dir=run))  # ckpt_path=last: resumes
    assert load_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == 5
