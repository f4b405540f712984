"""Sampling with a diffusers scheduler (a "sampler" here): image i depends on (seed, i), not the batch.

Each image gets its own ``torch.Generator`` seeded by (seed, i); diffusers' ``randn_tensor`` draws
per-sample noise from a list of generators, both for the initial noise and for stochastic steps,
exactly as ``DDPMPipeline`` does, so an exported pipeline reproduces these images.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import diffusers
import torch
from diffusers.utils.torch_utils import randn_tensor

from difflab.diffusion.noise import objective_of
from difflab.errors import DifflabError
from difflab.precision import fp32_matmul_policy
from difflab.seeds import derive_seed

# name → (diffusers class, extra config). All are built from the training scheduler's config, so
# the beta schedule (or flow shift), prediction type and timestep count match what the network learned.
SAMPLERS: dict[str, tuple[str, dict]] = {
    "ddpm": ("DDPMScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    # First-order-style DPM-Solver cannot end at sigma 0 (diffusers refuses "zero" for it).
    "dpmsolver": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver", "solver_order": 2, "final_sigmas_type": "sigma_min"},
    ),
    "sde-dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    # Flow matching (model=flow): diffusers' flow Euler and Heun, plus the two multistep solvers above,
    # which diffusers runs on flow sigmas with a velocity ("flow_prediction") network.
    "flow_euler": ("FlowMatchEulerDiscreteScheduler", {}),
    "flow_heun": ("FlowMatchHeunDiscreteScheduler", {}),
    # MeanFlow (model=meanflow): jumps of the learned average velocity, 1-4 steps (diffusion/meanflow.py).
    "meanflow": ("MeanFlowScheduler", {}),  # difflab's: diffusion/pipeline.py
}
# The names as a type, for the signatures that take one (the start-up check reads it: rules.py).
SamplerName = Literal[tuple(SAMPLERS)]  # type: ignore[valid-type]
FLOW_SAMPLERS = ("flow_euler", "flow_heun", "dpmsolver++", "unipc")


def sampler_problem(name: str, train_scheduler_config: dict) -> str | None:
    """Why sampler ``name`` cannot sample a model trained under this noise schedule, or None. Measured
    over every sampler x prediction type x zero-terminal-SNR (tests/test_every_choice.py): diffusers'
    PNDM and Euler-ancestral have no x0 ("sample") parameterisation, and Heun and PNDM divide by
    the zero terminal ᾱ of a rescaled schedule (NaN images). Flow models take the flow samplers only,
    MeanFlow models their own: an ODE sampler would integrate u as if it were the instantaneous velocity."""
    objective = objective_of(train_scheduler_config)
    if objective == "meanflow":
        if name != "meanflow":
            return f"the {name} sampler cannot sample a MeanFlow model (model=meanflow); use sampler=meanflow"
        return None
    if name == "meanflow":
        return f"the meanflow sampler is for MeanFlow models (model=meanflow); this is a {objective} model"
    if objective == "flow":
        if name not in FLOW_SAMPLERS:
            return (
                f"the {name} sampler is for DDPM models; a flow-matching model (model=flow) samples with "
                + ", ".join(FLOW_SAMPLERS)
            )
        return None
    if name.startswith("flow_"):
        return f"the {name} sampler is for flow-matching models (model=flow); this model is a DDPM one"
    prediction = train_scheduler_config.get("prediction_type", "epsilon")
    if name in ("euler_a", "pndm") and prediction == "sample":
        return (
            f"the {name} sampler cannot sample a model with prediction_type=sample; "
            "use ddim, dpmsolver++ or unipc"
        )
    if name in ("heun", "pndm") and train_scheduler_config.get("rescale_betas_zero_snr"):
        return (
            f"the {name} sampler cannot sample a zero-terminal-SNR schedule (rescale_betas_zero_snr=true); "
            "use ddim, dpmsolver++ or unipc"
        )
    return None


class EulerAncestralDiscreteScheduler(diffusers.EulerAncestralDiscreteScheduler):
    """diffusers' Euler-ancestral sampler with its noise split computed so it cannot be NaN.

    diffusers computes σ_up = sqrt(σ_to²(σ_from² − σ_to²)/σ_from²) and σ_down = sqrt(σ_to² − σ_up²);
    in float32 σ_up² can round above σ_to², and σ_down becomes the root of a negative number: NaN
    images (e.g. squaredcos_cap_v2 at 3 steps, zero-terminal-SNR at ≥ 286 steps). Here, with
    r = σ_to/σ_from: σ_down = σ_to·r and σ_up = σ_to·sqrt(1 − r²), the same values in exact math.
    """

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        return_dict: bool = True,
    ) -> object:
        if self.step_index is None:
            self._init_step_index(timestep)
        sigma, sigma_to = self.sigmas[self.step_index], self.sigmas[self.step_index + 1]
        x = sample.to(torch.float32)
        if self.config.prediction_type == "epsilon":
            x0 = x - sigma * model_output
        elif self.config.prediction_type == "v_prediction":
            x0 = model_output * (-sigma / (sigma**2 + 1) ** 0.5) + (x / (sigma**2 + 1))
        else:
            raise DifflabError(
                f"the euler_a sampler cannot sample prediction_type={self.config.prediction_type}"
            )
        r = (sigma_to / sigma).clamp(max=1.0)
        sigma_down, sigma_up = sigma_to * r, sigma_to * (1 - r**2).clamp(min=0).sqrt()
        x = x + (x - x0) / sigma * (sigma_down - sigma)
        noise = randn_tensor(
            model_output.shape, dtype=model_output.dtype, device=model_output.device, generator=generator
        )
        x = (x + noise * sigma_up).to(model_output.dtype)
        self._step_index += 1
        out = diffusers.schedulers.scheduling_euler_ancestral_discrete.EulerAncestralDiscreteSchedulerOutput(
            prev_sample=x, pred_original_sample=x0
        )
        return out if return_dict else (x,)


# Samplers that step through continuous time: any number of steps is valid (more is only slower).
CONTINUOUS_SAMPLERS = ("flow_euler", "flow_heun")


def steps_problem(name: str, train_scheduler_config: dict, steps: int) -> str | None:
    """Why ``steps`` steps of sampler ``name`` cannot sample this model, or None. The training schedule
    has ``num_train_timesteps`` discrete noise levels, and diffusers' samplers look a step up by its
    rounded timestep: past that many steps DDPM models get NaN images (ddpm and ddim refuse with a
    ValueError), and flow models under dpmsolver++ or unipc, whose shifted timesteps repeat sooner,
    fail deep in the sampler (IndexError, a bare AssertionError) from a shift-dependent count
    (501 and 334 at shift 3). Measured over every sampler: tests/test_bad_inference_inputs.py. MeanFlow
    jumps between noise levels of the training scale: at most num_train_timesteps of them."""
    if name in CONTINUOUS_SAMPLERS or sampler_problem(name, train_scheduler_config):
        return None
    levels = int(train_scheduler_config.get("num_train_timesteps", 1000))
    if name == "meanflow":
        if steps <= levels:
            return None
        return (
            f"steps={steps} is more than the model's num_train_timesteps={levels} (the time scale of its "
            f"jumps); give steps<={levels} (MeanFlow models sample in 1-4)"
        )
    if objective_of(train_scheduler_config) != "flow":
        if steps <= levels:
            return None
        return (
            f"steps={steps} is more than the model's num_train_timesteps={levels} (the noise levels it was "
            f"trained on; the {name} sampler cannot take more steps than that); give steps<={levels}"
        )
    if steps <= levels and _runs(name, train_scheduler_config, steps):
        return None
    low, high = 1, min(steps, levels)  # the largest count that runs (failures are contiguous above it)
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if _runs(name, train_scheduler_config, mid) else (low, mid - 1)
    return (
        f"steps={steps} is too many for the {name} sampler on this flow model (it fails above {low} steps "
        f"at this schedule's shift); give steps<={low}, or sampler=flow_euler for more"
    )


def _runs(name: str, train_scheduler_config: dict, steps: int) -> bool:
    """Whether the sampler gets through ``steps`` steps: a dry run on one pixel with a constant network
    output (milliseconds per hundred steps). Any exception counts as "no": it is diffusers' own
    failure on these settings, the one this probe exists to find before the real run meets it."""
    sampler = build_sampler(name, train_scheduler_config)
    x = torch.full((1, 1, 1, 1), 0.5)
    try:
        sampler.set_timesteps(steps)
        for t in sampler.timesteps:
            x = sampler.step(torch.full_like(x, 0.1), t, x).prev_sample
    except Exception:
        return False
    return bool(torch.isfinite(x).all())


def time_estimate(
    unet: torch.nn.Module,
    sampler: diffusers.SchedulerMixin,
    steps: int,
    num_images: int,
    batch_size: int,
    device: torch.device | str,
) -> str:
    """How long sampling ``num_images`` takes, from one timed network evaluation of a batch: said
    up front when a run's step count is beyond the training schedule's (no progress bar moves until
    a whole batch is done)."""
    import time

    sampler.set_timesteps(min(steps, 2))
    per_step = len(sampler.timesteps) / min(steps, 2)  # Heun: two evaluations a step
    cfg = unet.config
    batch = min(batch_size, num_images)
    x = torch.zeros(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, device=device)
    with torch.inference_mode():
        unet(x, sampler.timesteps[0])  # warm-up: the first call pays one-off set-up
        t0 = time.perf_counter()
        unet(x, sampler.timesteps[0])
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    total = seconds * per_step * steps * -(-num_images // batch)
    hours, rest = divmod(round(total), 3600)
    return f"about {hours} h {rest // 60} min" if hours else f"about {rest // 60} min {rest % 60} s"


def network_evaluations(sampler: diffusers.SchedulerMixin, steps: int) -> int:
    """Network evaluations per image of ``steps`` steps of ``sampler`` (Heun: two a step but the last)."""
    sampler.set_timesteps(steps)
    return len(sampler.timesteps)


def build_sampler(name: str, train_scheduler_config: dict, **overrides: object) -> diffusers.SchedulerMixin:
    """A diffusers scheduler named ``name`` configured like the training noise schedule."""
    if name not in SAMPLERS:
        raise DifflabError(f"unknown sampler {name!r}; allowed: {', '.join(SAMPLERS)}")
    problem = sampler_problem(name, train_scheduler_config)
    if problem:
        raise DifflabError(problem)
    if name == "meanflow":
        from difflab.diffusion.pipeline import MeanFlowScheduler

        return MeanFlowScheduler.from_config(dict(train_scheduler_config))
    cls_name, extra = SAMPLERS[name]
    cls = EulerAncestralDiscreteScheduler if name == "euler_a" else getattr(diffusers, cls_name)
    # Private keys go: diffusers drops the `_use_default_values` keys from a config, so a checkpoint's
    # config and the same config re-read from an exported pipeline would give different samplers.
    config = {k: v for k, v in dict(train_scheduler_config).items() if not k.startswith("_")}
    if objective_of(config) == "flow":
        if name.startswith("flow_"):  # Heun takes fewer settings than the Euler config holds
            params = inspect.signature(cls.__init__).parameters
            return cls.from_config({k: v for k, v in config.items() if k in params}, **overrides)
        flow = {"use_flow_sigmas": True, "flow_shift": config["shift"], "prediction_type": "flow_prediction"}
        return cls(num_train_timesteps=config["num_train_timesteps"], **{**extra, **flow, **overrides})
    # Few-step sampling must start at the last training timestep (pure noise): "trailing" spacing
    # does; DDPM's default "leading" starts 10% early at 10 steps (Lin et al. 2023, table 2).
    config["timestep_spacing"] = "trailing"
    # The exact betas the network was trained with (DDPMScheduler computes every beta_schedule; most
    # samplers lack "sigmoid"). Zero-terminal-SNR rescaling, if set, is idempotent on these.
    config["trained_betas"] = diffusers.DDPMScheduler.from_config(config).betas.tolist()
    params = inspect.signature(cls.__init__).parameters
    if config.get("clip_sample", False) and "clip_sample" not in params and "thresholding" in params:
        # Multistep solvers cannot clip x0 like DDPM/DDIM; without it, few-step samples of a pixel-space
        # model saturate into noise blobs. Dynamic thresholding (Imagen) is their equivalent.
        extra = {"thresholding": True, "sample_max_value": config.get("clip_sample_range", 1.0), **extra}
    return cls.from_config(config, **{**extra, **overrides})


@contextmanager
def batch_fits(batch_size: int, device: torch.device | str, key: str = "batch_size") -> Iterator[None]:
    """Out of memory while sampling becomes one line naming the setting that sizes the batch (torch
    raises it from deep inside the network, after the set-up)."""
    try:
        yield
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if not isinstance(e, torch.OutOfMemoryError) and "can't allocate memory" not in str(e):
            raise
        raise DifflabError(
            f"out of memory sampling batches of {batch_size} images on {device}; give a smaller {key} "
            "(the images do not depend on it)"
        ) from None


def image_generators(seed: int, indices: range, device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One generator per image; image i's stream is seeded by (seed, i) alone."""
    return [torch.Generator(device).manual_seed(derive_seed(seed, i)) for i in indices]


def _accepts(fn: object, name: str) -> bool:
    return name in inspect.signature(fn).parameters


@torch.inference_mode()
def sample_batch(
    unet: torch.nn.Module,
    sampler: diffusers.SchedulerMixin,
    indices: range,
    seed: int,
    steps: int,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Images ``indices`` of the (seed)-stream, as float in [0, 1], shape (len(indices), C, H, W)."""
    device = torch.device(device) if device is not None else next(unet.parameters()).device
    fp32_matmul_policy(device)  # sample/eval: training set it in DiffusionModule.setup
    cfg = unet.config
    shape = (len(indices), cfg.in_channels, cfg.sample_size, cfg.sample_size)
    gens = image_generators(seed, indices, "cpu" if device.type != "cuda" else device)
    x = randn_tensor(shape, generator=gens, device=device, dtype=dtype)
    sampler.set_timesteps(steps, device=device)
    # Flow samplers start from unit noise and scale no model input.
    x = x * getattr(sampler, "init_noise_sigma", 1.0)
    scale = getattr(sampler, "scale_model_input", lambda x, t: x)
    step_kwargs = {"generator": gens} if _accepts(sampler.step, "generator") else {}
    # What the network takes beside (x, t): MeanFlow's second time (diffusion/meanflow.py).
    more = getattr(sampler, "model_inputs", lambda t, n: {})
    for t in sampler.timesteps:
        model_in = scale(x, t)
        out = unet(model_in, t, **more(t, len(indices))).sample
        x = sampler.step(out, t, x, **step_kwargs).prev_sample
    return (x.float() / 2 + 0.5).clamp(0, 1)


def sample_images(
    unet: torch.nn.Module,
    sampler: diffusers.SchedulerMixin,
    num_images: int,
    seed: int,
    steps: int,
    batch_size: int = 64,
    start: int = 0,
    device: torch.device | str | None = None,
) -> Iterator[tuple[range, torch.Tensor]]:
    """Yield (indices, images) for images start..start+num_images-1 in batches of ``batch_size``."""
    for lo in range(start, start + num_images, batch_size):
        idx = range(lo, min(lo + batch_size, start + num_images))
        yield idx, sample_batch(unet, sampler, idx, seed, steps, device)
