"""Objectives: flow matching beside DDPM, the timestep densities, min-SNR-γ weighting per target,
immiscible noise; flow models through sample and eval (export: test_export.py); mismatches refused at
start-up."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from difflab.diffusion.noise import (
    FlowProcess,
    NoiseLevels,
    NoiseProcess,
    flow_schedule,
    immiscible_noise,
    noise_process,
    objective_of,
)
from difflab.diffusion.sampling import FLOW_SAMPLERS, SAMPLERS, build_sampler, sample_batch
from difflab.diffusion.weighting import LearnedWeighting
from difflab.errors import DifflabError
from difflab.export import COMMAND as EXPORT
from difflab.sample import COMMAND as SAMPLE
from difflab.train import train
from tests.conftest import FAST, FAST_DIGITS

FLOW = dict(flow_schedule(num_train_timesteps=1000, shift=1.0).config)
POINT = torch.linspace(-0.8, 0.8, 64).view(1, 1, 8, 8)  # the whole "data set": one image


class _Out:
    def __init__(self, sample: torch.Tensor) -> None:
        self.sample = sample


class FlowOracle(torch.nn.Module):
    """The exact velocity field of a one-image data set: x_σ = (1−σ)·c + σ·ε ⇒ v = ε − c = (x_σ − c)/σ."""

    config = type("Config", (), {"in_channels": 1, "sample_size": 8})()

    def __init__(self) -> None:
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> _Out:
        sigma = (torch.as_tensor(t, dtype=torch.float32) / 1000).clamp(min=1e-6)
        return _Out((x - POINT) / sigma)


@pytest.mark.parametrize("name", FLOW_SAMPLERS)
@pytest.mark.parametrize("steps", [4, 10])
def test_every_flow_sampler_follows_the_exact_velocity_to_the_data(name, steps):
    """Timestep conventions checked end to end: with the exact velocity every flow sampler must land
    on the data (the multistep solvers see timesteps rounded to integers: within 1/255)."""
    x = sample_batch(FlowOracle(), build_sampler(name, FLOW), range(3), seed=0, steps=steps)
    assert (x - (POINT / 2 + 0.5)).abs().max() < 2e-3, name


def test_flow_process_interpolates_and_targets_the_velocity():
    process = noise_process(flow_schedule(num_train_timesteps=1000, shift=1.0))
    assert isinstance(process, FlowProcess) and process.objective == "flow"
    x0, noise = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    t = torch.tensor([0.0, 250.0, 1000.0])
    xt = process.add_noise(x0, noise, t)
    assert torch.allclose(xt[0], x0[0]) and torch.allclose(xt[2], noise[2])
    assert torch.allclose(xt[1], 0.75 * x0[1] + 0.25 * noise[1])
    assert torch.equal(process.target(x0, noise, t), noise - x0)
    g = torch.Generator().manual_seed(0)
    ts = process.timesteps(10_000, g, torch.device("cpu"))
    assert ts.dtype == torch.float32 and ts.min() > 0 and ts.max() <= 1000


def test_logit_normal_density_favours_mid_noise_levels():
    g = torch.Generator().manual_seed(0)
    uniform = NoiseLevels("uniform").draw(20_000, g, torch.device("cpu"))
    logit = NoiseLevels("logit_normal").draw(20_000, g, torch.device("cpu"))
    mid = lambda u: ((u > 0.25) & (u < 0.75)).float().mean()  # noqa: E731
    assert abs(mid(uniform) - 0.5) < 0.02 and mid(logit) > 0.7
    ddpm = NoiseProcess(DDPMScheduler(), NoiseLevels("logit_normal"))
    t = ddpm.timesteps(20_000, g, torch.device("cpu"))
    assert t.dtype == torch.int64 and t.min() >= 0 and t.max() <= 999 and abs(t.float().mean() - 500) < 15


def test_stratified_levels_cover_every_quantile_and_keep_the_density():
    g, cpu = torch.Generator().manual_seed(0), torch.device("cpu")
    u = NoiseLevels("uniform", stratified=True).draw(32, g, cpu)
    # One level in each of the 32 equal bins of [0, 1) (i.i.d. draws leave ~12 bins empty).
    assert torch.equal(torch.sort((u * 32).long()).values, torch.arange(32))
    # Over many batches the marginal is still the density: logit-normal's quartiles at sigmoid(±0.674).
    levels = torch.cat([NoiseLevels("logit_normal", stratified=True).draw(32, g, cpu) for _ in range(500)])
    quartiles = torch.quantile(levels, torch.tensor([0.25, 0.5, 0.75]))
    assert torch.allclose(quartiles, torch.sigmoid(torch.tensor([-0.6745, 0.0, 0.6745])), atol=0.01)
    # Each batch spans the density: its logit-normal levels sorted are the 32 quantiles, one shift apart.
    one = torch.sort(NoiseLevels("logit_normal", stratified=True).draw(32, g, cpu)).values
    assert one[0] < torch.sigmoid(torch.special.ndtri(torch.tensor(1 / 32))) < one[1]
    # The step's generator alone decides the draw (an exact resume redraws it).
    again = [
        NoiseLevels("logit_normal", stratified=True).draw(8, torch.Generator().manual_seed(7), cpu)
        for _ in "ab"
    ]
    assert torch.equal(*again)
    for process in (
        NoiseProcess(DDPMScheduler(), NoiseLevels(stratified=True)),
        FlowProcess(flow_schedule(num_train_timesteps=1000, shift=1.0), NoiseLevels(stratified=True)),
    ):
        t = process.timesteps(10, g, cpu)
        assert torch.equal(torch.sort((t / 100).long()).values, torch.arange(10))  # one per tenth of [0, T)


def test_learned_weighting_learns_each_levels_mean_loss():
    # Per-sample losses whose mean depends on the noise level (a 7x range, like flow's v-error from
    # mid to extreme levels) and that scatter around it (unit-mean χ²): u(λ) must find log E[L | λ].
    torch.manual_seed(0)
    weighting = LearnedWeighting()
    mean_at = lambda lam: torch.exp(torch.sin(lam / 3))  # noqa: E731
    g = torch.Generator().manual_seed(0)
    lam = 4 * torch.randn(256, generator=g)
    loss = mean_at(lam) * torch.randn(256, 8, generator=g).pow(2).mean(dim=1)
    assert torch.equal(weighting(loss, lam), loss)  # u = 0 at the start: the plain loss
    optimizer = torch.optim.Adam(weighting.parameters(), lr=1e-2)
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 1500)  # so the end is not Adam's noise
    for _ in range(1500):
        lam = 4 * torch.randn(256, generator=g)
        loss = mean_at(lam) * torch.randn(256, 8, generator=g).pow(2).mean(dim=1)
        optimizer.zero_grad()
        weighting(loss, lam).mean().backward()
        optimizer.step()
        decay.step()
    probe = torch.linspace(-6, 6, 13)
    with torch.no_grad():
        u = weighting.log_variance(probe)
    assert (u - mean_at(probe).log()).abs().max() < 0.06, u - mean_at(probe).log()  # measured 0.02
    # Infinite log-SNR (σ = 0 or 1, a zero-terminal-SNR step) gives a finite weight, not NaN.
    assert weighting.log_variance(torch.tensor([-float("inf"), float("inf")])).isfinite().all()


def test_log_snr_of_both_objectives():
    ddpm = NoiseProcess(DDPMScheduler())
    t = torch.tensor([0, 250, 999])
    abar = ddpm.scheduler.alphas_cumprod[t]
    assert torch.allclose(ddpm.log_snr(t), (abar / (1 - abar)).log(), rtol=1e-4)
    flow = FlowProcess(flow_schedule(num_train_timesteps=1000, shift=3.0))
    sigma = torch.tensor([0.2, 0.5, 0.8])  # SNR = ((1−σ)/σ)²: 16, 1, 1/16 (the shift is for sampling only)
    assert torch.allclose(flow.log_snr(sigma * 1000), torch.tensor([16.0, 1.0, 1 / 16]).log(), atol=1e-5)
    zero_snr = NoiseProcess(DDPMScheduler(rescale_betas_zero_snr=True))
    assert zero_snr.log_snr(torch.tensor([999])).item() == -float("inf")  # clamped by the weighting


def test_learned_weighting_trains_with_the_unet_and_stays_out_of_samples(make_cfg, tmp_path):
    run = tmp_path / "run"
    train(make_cfg(*FAST_DIGITS, "model.learned_weighting=true", "trainer.max_steps=30", run_dir=run))
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    u = {k: v for k, v in ckpt["state_dict"].items() if k.startswith("weighting.")}
    assert u["weighting.weight"].abs().max() > 0  # the optimizer moved it away from the plain loss
    assert (
        len(ckpt["optimizer_states"][0]["param_groups"][0]["params"])
        == len([k for k in ckpt["state_dict"] if k.startswith("unet.")]) + 2
    )  # the UNet's parameters and the weighting's two
    # Samples and exports read the UNet alone: the weighting's keys do not get in their way.
    ckpt_path = run / "checkpoints" / "last.ckpt"
    images = SAMPLE.call([f"ckpt={ckpt_path}", "num_images=2", "steps=2", f"out={tmp_path / 's'}"])
    assert len(images) == 2
    assert (EXPORT.call([f"ckpt={ckpt_path}", f"out={tmp_path / 'pipe'}"]) / "unet").is_dir()


def _x0_from_target(
    process: NoiseProcess, xt: torch.Tensor, pred: torch.Tensor, t: torch.Tensor
) -> torch.Tensor:
    """The x0 a prediction implies, written from the definitions (not from the code under test)."""
    if process.objective == "flow":
        sigma = (t / 1000).view(-1, 1, 1, 1)
        return xt - sigma * pred  # x_σ = (1−σ)x0 + σε and v = ε − x0
    abar = process.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    a, s = abar.sqrt(), (1 - abar).sqrt()
    if process.prediction_type == "epsilon":
        return (xt - s * pred) / a
    if process.prediction_type == "sample":
        return pred
    return a * xt - s * pred  # v = a·ε − s·x0 ⇒ x0 = a·x_t − s·v


@pytest.mark.parametrize("kind", ["epsilon", "sample", "v_prediction", "flow"])
def test_min_snr_weights_every_target_as_min_snr_times_the_x0_error(kind):
    """min-SNR-γ means: loss = min(SNR, γ)·|x0 error|², whatever the network predicts."""
    gamma = 5.0
    if kind == "flow":
        process = noise_process(flow_schedule(num_train_timesteps=1000, shift=1.0), min_snr_gamma=gamma)
        t = torch.tensor([50.0, 300.0, 600.0, 950.0])
        snr = ((1 - t / 1000) / (t / 1000)) ** 2
    else:
        process = noise_process(DDPMScheduler(prediction_type=kind), min_snr_gamma=gamma)
        t = torch.tensor([10, 200, 500, 900])
        abar = process.scheduler.alphas_cumprod[t]
        snr = abar / (1 - abar)
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(4, 1, 8, 8, generator=g), torch.randn(4, 1, 8, 8, generator=g)
    xt = process.add_noise(x0, noise, t)
    target = process.target(x0, noise, t)
    pred = target + 0.1 * torch.randn(target.shape, generator=g)
    weighted = process.loss_weights(t) * (pred - target).pow(2).mean(dim=(1, 2, 3))
    x0_error = (_x0_from_target(process, xt, pred, t) - x0).pow(2).mean(dim=(1, 2, 3))
    assert torch.allclose(weighted, snr.clamp(max=gamma) * x0_error, rtol=1e-3), kind
    assert torch.equal(noise_process(process.scheduler).loss_weights(t), torch.ones(4))  # γ unset: plain MSE


def test_immiscible_pairs_noise_to_images_by_a_minimal_total_distance():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(16, 3, 8, 8, generator=g), torch.randn(16, 3, 8, 8, generator=g)
    paired = immiscible_noise(x0, noise)
    assert sorted(map(tuple, paired.flatten(1)[:, :2].tolist())) == sorted(
        map(tuple, noise.flatten(1)[:, :2].tolist())
    )
    total = lambda n: (x0 - n).flatten(1).norm(dim=1).sum()  # noqa: E731
    assert total(paired) < total(noise)
    for _ in range(20):  # no other pairing is closer
        assert total(paired) <= total(noise[torch.randperm(16, generator=g)]) + 1e-4


def test_objective_is_read_from_the_scheduler_config():
    assert objective_of(FLOW) == "flow" and objective_of(dict(DDPMScheduler().config)) == "ddpm"
    assert {"flow_euler", "flow_heun"} <= set(SAMPLERS)


# ---------------------------------------------------------------- a trained flow model (conftest.ckpts)


def test_flow_and_ddpm_samplers_refused_across_objectives(ckpts, tmp_path):
    with pytest.raises(
        DifflabError, match=r"the ddim sampler is for DDPM models; a flow-matching model .*flow_euler"
    ):
        SAMPLE.call([f"ckpt={ckpts['flow']}", "sampler=ddim", f"out={tmp_path / 'x'}"])
    with pytest.raises(DifflabError, match=r"the flow_euler sampler is for flow-matching models"):
        build_sampler("flow_euler", dict(DDPMScheduler().config))


MEANFLOW_GRID = ("model=meanflow", "callbacks.sample_grid.sampler=meanflow", "callbacks.sample_grid.steps=2")
BAD_OBJECTIVE_LINES = [
    (
        ["model=flow", "callbacks.sample_grid.sampler=ddpm"],
        "callbacks.sample_grid.sampler=ddpm: the ddpm sampler is for DDPM",
    ),
    (
        ["model=ddpm", "callbacks.sample_grid.sampler=flow_heun"],
        "the flow_heun sampler is for flow-matching models",
    ),
    (["model.immiscible=true", "data.batch_size=1"], "model.immiscible=true pairs the noise"),
    (["model=flw"], "did you mean flow"),
    (["model.noise_levels.density=lognormal"], "model.noise_levels.density=lognormal"),
    (["model.timesteps=uniform"], "model.timesteps is now model.noise_levels.density"),
    (["model=flow", "model.noise_scheduler.shift=0"], "model.noise_scheduler.shift=0"),
    (
        ["model=meanflow"],
        "callbacks.sample_grid.sampler=dpmsolver++: the dpmsolver++ sampler cannot sample a MeanFlow",
    ),
    (["model=flow", "callbacks.sample_grid.sampler=meanflow"], "the meanflow sampler is for MeanFlow models"),
    (
        [*MEANFLOW_GRID, "model.unet.class_embed_type=null"],
        "model.unet.class_embed_type=null has no slot for MeanFlow's second time",
    ),
    (
        [*MEANFLOW_GRID, "model.min_snr_gamma=5"],
        "model.min_snr_gamma=5: MeanFlow weights its loss adaptively",
    ),
    ([*MEANFLOW_GRID, "model.learned_weighting=true"], "model.learned_weighting=false"),
    ([*MEANFLOW_GRID, "model.noise_scheduler.ratio=1.5"], "model.noise_scheduler.ratio=1.5"),
    ([*MEANFLOW_GRID, "callbacks.sample_grid.steps=1001"], "callbacks.sample_grid.steps=1001"),
]


@pytest.mark.parametrize("args,expected", BAD_OBJECTIVE_LINES)
def test_objective_mistakes_are_one_line_at_start_up(args, expected, tmp_path):
    from difflab.train import COMMAND as TRAIN

    with pytest.raises(DifflabError, match=expected.replace("(", r"\(").replace("+", r"\+")):
        TRAIN.call([*FAST, f"hydra.run.dir={tmp_path / 'run'}", *args])
    assert not (tmp_path / "run").exists()


def test_resuming_a_flow_checkpoint_as_ddpm_is_refused(ckpts, tmp_path):
    from tests.conftest import compose_config

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(ckpts["flow"].read_bytes())
    with pytest.raises(DifflabError, match=r"trained with model=flow, this run is model=ddpm"):
        train(compose_config(run, [*FAST_DIGITS, "model=ddpm", "trainer.max_steps=40"]))
