"""A training step makes no host sync, no host<->device copy and no CPU tensor (issue 28, item 7).

On a GPU each of those stalls the step until the device catches up: a ``.item()``, ``bool(t)`` or
``float(t)`` (``aten._local_scalar_dense``), a data-dependent shape (``nonzero``), or a table copied
from pageable host memory every step (``self.snr.to(t.device)``, as it was). No GPU runs the tests,
so the step runs on the ``meta`` device: tensors with shapes and no data, where every tensor the step
should hold is ``meta`` and anything on the CPU is a host tensor that a GPU step would copy or read.
A dispatch mode sees every aten op and records:
- the ops that read a value back to the host or sync on a GPU;
- any op taking or making a CPU tensor of one element or more (a host<->device copy or a host
  tensor mixed into device work); 0-dim CPU tensors are Python numbers torch wraps, not copies.
What this cannot see: syncs inside CUDA kernels or libraries (cuDNN autotuning, the caching
allocator), Python-side waits, and cost: experiments/gpu_check.py runs the real step under
``torch.cuda.set_sync_debug_mode("warn")`` on a GPU. The first step is not recorded: diffusers moves
its ``alphas_cumprod`` table to the batch's device on its first ``add_noise`` call, once per run.
The optimizer's step is torch's own (non-fused AdamW keeps its step counter on the host by design)
and is not part of this check; the EMA update and the loss window are.
"""

from __future__ import annotations

import hydra
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from difflab.diffusion.posthoc import PowerFunctionEMA
from tests.conftest import FAST_DIGITS

aten = torch.ops.aten
# Ops that hand a value to the host or whose output shape depends on data (a device sync each).
SYNCING = {
    aten._local_scalar_dense,
    aten.is_nonzero,
    aten.equal,
    aten.nonzero,
    aten.masked_select,
    aten.unique_consecutive,
    aten._unique2,
    aten.repeat_interleave,
}


class HostTraffic(TorchDispatchMode):
    """Records every op that syncs with the host or touches a CPU tensor while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket in SYNCING:
            self.found.append(f"{func}: a host sync")
        out = func(*args, **kwargs)
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        for role, tensors in (("takes", inputs), ("makes", outputs)):
            for t in tensors:
                if t.device.type == "cpu" and t.dim() > 0:
                    self.found.append(f"{func} {role} a CPU tensor of shape {tuple(t.shape)}")
        return out


OBJECTIVES = {
    "flow": ("model=flow",),
    "epsilon": ("model=ddpm", "model.noise_scheduler.prediction_type=epsilon"),
    "sample": ("model=ddpm", "model.noise_scheduler.prediction_type=sample"),
    "v_prediction": ("model=ddpm", "model.noise_scheduler.prediction_type=v_prediction"),
}
WEIGHTINGS = {
    "plain": (),
    "min_snr": ("model.min_snr_gamma=5.0",),
    "learned": ("model.learned_weighting=true",),
    "min_snr+learned+logit_normal+stratified": (
        "model.min_snr_gamma=5.0",
        "model.learned_weighting=true",
        "model.noise_levels.density=logit_normal",
        "model.noise_levels.stratified=true",
    ),
}


def _meta_module(make_cfg, *overrides: str):
    cfg = make_cfg(*FAST_DIGITS, *overrides)
    module = hydra.utils.instantiate(cfg.model).to("meta")
    module.ema.to("meta")
    # A meta device has no random generator; the values drawn do not matter here, only the devices.
    module._step_generator = lambda batch_idx: None
    unet = cfg.model.unet
    batch = torch.zeros(4, unet.in_channels, cfg.data.resolution, cfg.data.resolution, device="meta")
    return module, batch


def _step(module, batch: torch.Tensor, batch_idx: int) -> None:
    objective = module.training_step(batch, batch_idx)
    objective.backward()
    module.ema.step(module.unet.parameters())


@pytest.mark.parametrize(
    ("objective", "weighting", "extra"),
    [(o, w, ()) for o in OBJECTIVES for w in WEIGHTINGS] + [("flow", "plain", ("model/ema=posthoc",))],
)
def test_a_training_step_stays_on_the_device(make_cfg, objective, weighting, extra):
    module, batch = _meta_module(make_cfg, *OBJECTIVES[objective], *WEIGHTINGS[weighting], *extra)
    _step(module, batch, 0)  # diffusers moves its alphas_cumprod table once, here
    with HostTraffic() as traffic:
        _step(module, batch, 1)
    assert traffic.found == []
    assert module.loss_window.q_sum.device.type == "meta"  # the window's sums stayed on the device


def test_the_check_sees_a_host_sync_and_a_host_tensor(make_cfg):
    """The mode is not blind: an .item() and a CPU table indexed per step are both reported."""
    module, batch = _meta_module(make_cfg, *OBJECTIVES["epsilon"], *WEIGHTINGS["min_snr"])
    cpu_snr = module.process.snr.new_empty(module.process.snr.shape, device="cpu")
    with HostTraffic() as traffic:
        module.process.snr = cpu_snr.to(batch.device)  # the old per-step copy
        torch.zeros(3).sum()
    assert any("_to_copy" in f and "takes a CPU tensor" in f for f in traffic.found)
    with pytest.raises(Exception), HostTraffic() as traffic:  # noqa: B017 (meta refuses the value)
        batch.sum().item()
    assert any("_local_scalar_dense" in f for f in traffic.found)


def test_noise_is_laid_out_like_an_nhwc_batch(make_cfg, monkeypatch):
    """Under channels_last the noise has the batch's layout: NCHW noise made every elementwise op and
    the loss run over mixed strides (issue 28, item 7). Its values are the NCHW draw's."""
    rgb = ("model.unet.in_channels=3", "model.unet.out_channels=3")  # 1 channel: NCHW is NHWC too
    module, batch = _meta_module(make_cfg, *OBJECTIVES["epsilon"], *rgb, "model.channels_last=true")
    seen = {}
    real = type(module.process).add_noise

    def spy(self, x0, noise, t):
        seen.update(x0=x0, noise=noise)
        return real(self, x0, noise, t)

    monkeypatch.setattr(type(module.process), "add_noise", spy)
    module.training_step(batch, 0)
    assert seen["x0"].is_contiguous(memory_format=torch.channels_last)
    assert seen["noise"].is_contiguous(memory_format=torch.channels_last)


def test_a_posthoc_snapshot_copies_to_the_host_once(tmp_path):
    """Post-hoc EMA snapshots (every 100 steps, inside optimizer_step on rank 0) made one synchronous
    device-to-host copy per tensor per profile; now all profiles travel in one. Counted as the copies
    that name a device (on the CPU the one ``.cpu()`` is a no-op)."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Linear(5, 4))
    ema = PowerFunctionEMA(model, str(tmp_path), stds=(0.05, 0.1, 0.2))

    class DeviceCopies(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            DeviceCopies.count += func.overloadpacket is aten._to_copy and "device" in kwargs
            return func(*args, **kwargs)

    with DeviceCopies():
        path = ema.write_snapshot()
    assert DeviceCopies.count <= 1  # was 12: 4 tensors x 3 profiles
    assert path.is_file()
