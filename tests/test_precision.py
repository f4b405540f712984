"""The default precision follows the hardware; CPU bf16 attention runs on the math kernel."""

from __future__ import annotations

import hydra
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from difflab import precision
from difflab.diffusion.unet import UNet2DModel
from tests.conftest import FAST_DIGITS


@pytest.mark.parametrize(
    ("accelerator", "cuda", "cuda_bf16", "amx", "expect"),
    [
        ("cpu", False, False, True, "bf16-mixed"),  # AMX: bf16 matrix products run 2.7x fp32
        ("cpu", False, False, False, "32-true"),  # AVX512 only: bf16 is slower than fp32
        ("cpu", True, True, False, "32-true"),  # the CPU asked for although a GPU is there
        ("auto", False, False, True, "bf16-mixed"),
        ("auto", False, False, False, "32-true"),
        ("auto", True, True, False, "bf16-mixed"),  # auto picks the GPU: its bf16 counts
        ("gpu", True, True, False, "bf16-mixed"),
        ("gpu", True, False, True, "32-true"),  # a GPU without bf16 (pre-Ampere)
        ("mps", False, False, True, "32-true"),
    ],
)
def test_auto_precision_follows_the_hardware(monkeypatch, accelerator, cuda, cuda_bf16, amx, expect):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: cuda_bf16)
    monkeypatch.setattr(precision, "_cpu_has_amx", lambda: amx)
    assert precision.auto_precision(accelerator) == expect


@pytest.mark.parametrize("amx", [True, False])
def test_default_trainer_precision_is_resolved_at_composition(make_cfg, monkeypatch, amx):
    monkeypatch.setattr(precision, "_cpu_has_amx", lambda: amx)
    cfg = make_cfg("experiment=digits", "trainer.accelerator=cpu")  # FAST_DIGITS pins 32-true
    assert cfg.trainer.precision == ("bf16-mixed" if amx else "32-true")
    # An explicit value is taken as given, either way.
    for value in ("32-true", "bf16-mixed"):
        assert make_cfg(*FAST_DIGITS, f"trainer.precision={value}").trainer.precision == value


def test_cpu_bf16_attention_runs_on_the_math_kernel(make_cfg):
    # The `small` preset (attention at its lowest level), the UNet the kernel timings were taken on.
    torch.manual_seed(0)
    unet = hydra.utils.instantiate(make_cfg(*FAST_DIGITS, "model/unet=small").model.unet)
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([1, 200, 500, 900])

    def run(backend: SDPBackend | None) -> torch.Tensor:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            if backend is None:
                return unet(x, t).sample
            with sdpa_kernel(backend):  # the class's own choice is made inside, so force it from outside
                return super(UNet2DModel, unet).forward(x, t).sample

    chosen, math, flash = run(None), run(SDPBackend.MATH), run(SDPBackend.FLASH_ATTENTION)
    assert torch.equal(chosen, math)
    assert not torch.equal(math, flash)  # the two kernels round differently, so the check can fail
    # fp32 keeps the default (flash) kernel: faster there (3.1 vs 5.2 ms fwd+bwd).
    with torch.no_grad():
        fp32 = unet(x, t).sample
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            assert torch.equal(fp32, super(UNet2DModel, unet).forward(x, t).sample)
