"""The default precision follows the hardware (each CPU class its measured row; emulated bf16 is not
bf16); precisions difflab cannot run are refused at start-up; the GradScaler path clips unscaled
gradients; CPU bf16 attention runs on the math kernel."""

from __future__ import annotations

from types import SimpleNamespace

import hydra
import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from omegaconf import open_dict
from torch.amp.grad_scaler import OptState

from difflab import precision
from difflab.errors import DifflabError
from difflab.train import COMMAND, train
from tests.conftest import FAST_DIGITS

# CPUs as /proc/cpuinfo and torch's AMX probe describe them: (vendor_id, flags, AMX usable).
SAPPHIRE_RAPIDS = ("GenuineIntel", {"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}, True)
INTEL_BF16_NO_AMX = ("GenuineIntel", {"avx512f", "avx512_bf16"}, False)  # the VM measured 0.63-0.77x
ZEN4 = ("AuthenticAMD", {"avx512f", "avx512_bf16"}, False)  # the EPYC measured in RESULTS.md
ZEN3 = ("AuthenticAMD", {"avx2"}, False)
INTEL_AVX2 = ("GenuineIntel", {"avx2"}, False)
NO_CPUINFO = ("", set(), False)  # macOS, Windows
AMX_HIDDEN_FROM_OS = ("GenuineIntel", {"avx512_bf16", "amx_tile"}, False)  # flag listed, probe says no


def _fake_cpu(monkeypatch, cpu: tuple[str, set[str], bool]) -> None:
    vendor, flags, amx = cpu
    monkeypatch.setattr(precision, "cpu_info", lambda: (vendor, frozenset(flags)))
    monkeypatch.setattr(precision, "_cpu_has_amx", lambda: amx)


@pytest.mark.parametrize(
    ("accelerator", "cuda", "cuda_bf16", "cpu", "expect"),
    [
        ("cpu", False, False, SAPPHIRE_RAPIDS, "bf16-mixed"),  # AMX: bf16 matrix products run 2.7x fp32
        ("cpu", False, False, INTEL_BF16_NO_AMX, "32-true"),  # bf16 at half the fp32 rate there
        ("cpu", False, False, ZEN4, "bf16-mixed"),  # the same flag, measured faster in bf16
        ("cpu", False, False, ZEN3, "32-true"),  # classes nobody measured keep fp32
        ("cpu", False, False, INTEL_AVX2, "32-true"),
        ("cpu", False, False, NO_CPUINFO, "32-true"),
        ("cpu", False, False, AMX_HIDDEN_FROM_OS, "32-true"),  # torch's probe, not the flag, decides AMX
        ("cpu", True, True, INTEL_BF16_NO_AMX, "32-true"),  # the CPU asked for although a GPU is there
        ("cpu", True, True, ZEN4, "bf16-mixed"),
        ("auto", False, False, SAPPHIRE_RAPIDS, "bf16-mixed"),
        ("auto", False, False, ZEN4, "bf16-mixed"),
        ("auto", False, False, INTEL_BF16_NO_AMX, "32-true"),
        ("auto", True, True, INTEL_BF16_NO_AMX, "bf16-mixed"),  # auto picks the GPU: its bf16 counts
        ("auto", True, False, ZEN4, "32-true"),  # ... and so does its lack of bf16
        ("gpu", True, True, INTEL_AVX2, "bf16-mixed"),
        ("gpu", True, False, SAPPHIRE_RAPIDS, "32-true"),  # a GPU without bf16 (pre-Ampere)
        ("mps", False, False, SAPPHIRE_RAPIDS, "32-true"),
    ],
)
def test_auto_precision_follows_the_hardware(monkeypatch, accelerator, cuda, cuda_bf16, cpu, expect):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: cuda_bf16)
    _fake_cpu(monkeypatch, cpu)
    assert precision.auto_precision(accelerator) == expect


def test_every_cpu_class_names_its_evidence_and_the_last_catches_all():
    assert precision.CPU_CLASSES[-1].vendor is None and not precision.CPU_CLASSES[-1].needs
    for c in precision.CPU_CLASSES:
        assert c.precision in ("bf16-mixed", "32-true") and c.evidence
        assert (
            "RESULTS.md" in c.evidence or "benchmark-notes.md" in c.evidence or "not measured" in c.evidence
        )


def test_cpu_info_reads_this_machine():
    vendor, flags = precision.cpu_info()
    assert isinstance(vendor, str) and isinstance(flags, frozenset)
    assert precision.cpu_class() in precision.CPU_CLASSES


@pytest.mark.parametrize(("cpu", "expect"), [(ZEN4, "bf16-mixed"), (INTEL_BF16_NO_AMX, "32-true")])
def test_default_trainer_precision_is_resolved_at_composition(make_cfg, monkeypatch, cpu, expect):
    _fake_cpu(monkeypatch, cpu)
    cfg = make_cfg("experiment=digits", "trainer.accelerator=cpu")  # FAST_DIGITS pins 32-true
    assert cfg.trainer.precision == expect
    # An explicit value is taken as given, either way.
    for value in ("32-true", "bf16-mixed"):
        assert make_cfg(*FAST_DIGITS, f"trainer.precision={value}").trainer.precision == value


def test_cpu_bf16_attention_runs_on_the_math_kernel(make_cfg, monkeypatch):
    """The kernel PyTorch may use at each attention call, read from its own switches (which
    sdpa_kernel sets): math only under CPU bf16 autocast, PyTorch's own choice in fp32."""
    torch.manual_seed(0)
    unet = hydra.utils.instantiate(make_cfg(*FAST_DIGITS, "model/unet=small").model.unet)
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([1, 200, 500, 900])
    seen: list[tuple[bool, bool]] = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append((torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.math_sdp_enabled()))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        unet(x, t)
    assert seen and all(s == (False, True) for s in seen), seen  # flash off, math on
    seen.clear()
    with torch.no_grad():
        unet(x, t)
    assert seen and all(s == (True, True) for s in seen), seen  # fp32: PyTorch's choice, flash allowed


def _fake_cuda_gpu(monkeypatch, major: int, name: str) -> None:
    """A visible CUDA GPU of compute capability ``major``.x whose bf16 runs at least emulated (torch's
    own probe, creating a bf16 tensor on it, succeeds on a V100 or T4)."""
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *a: SimpleNamespace(major=major, minor=0))
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda *a: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: name)


@pytest.mark.parametrize("trainer", ["gpu", "ddp", "multinode"])
def test_emulated_bf16_is_not_bf16(make_cfg, monkeypatch, trainer):
    _fake_cuda_gpu(monkeypatch, 7, "Tesla V100-SXM2-16GB")
    assert torch.cuda.is_bf16_supported()  # torch's default counts the emulation: the trap
    assert precision.auto_precision("gpu") == "32-true"
    assert make_cfg(f"trainer={trainer}").trainer.precision == "32-true"  # the GPU presets pick too
    (line,) = precision.precision_problems("bf16-mixed", "gpu")
    assert "Tesla V100-SXM2-16GB has no bf16 units" in line and "trainer.precision=16-mixed" in line
    assert precision.precision_problems("16-mixed", "gpu") == []

    _fake_cuda_gpu(monkeypatch, 8, "NVIDIA A100-SXM4-80GB")
    assert precision.auto_precision("gpu") == "bf16-mixed"
    assert make_cfg(f"trainer={trainer}").trainer.precision == "bf16-mixed"
    assert precision.precision_problems("bf16-mixed", "gpu") == []


@pytest.mark.parametrize(
    ("value", "dtype"), [("bf16-true", "bf16"), ("16-true", "fp16"), ("64-true", "fp64"), ("64", "fp64")]
)
def test_precisions_without_fp32_weights_are_refused_at_start_up(make_cfg, value, dtype):
    # Before: accepted, then step 1 failed with a traceback (fp32 batch vs bf16/fp64 weights; the
    # EMA's fp32 shadows and the loss window's fp32 sums would have followed).
    cfg = make_cfg(*FAST_DIGITS, f"trainer.precision={value}")
    with pytest.raises(DifflabError) as e:
        COMMAND.check(cfg)
    assert str(e.value).startswith(f"trainer.precision={value} keeps the weights in {dtype}")
    assert "\n" not in str(e.value)


def test_16_mixed_with_clipping_unscales_before_clipping_with_foreach_adamw(make_cfg, monkeypatch):
    """The GradScaler path: Lightning refuses to clip a fused optimizer's gradients under a scaler, so
    difflab swaps in foreach AdamW; the gradients must be unscaled when they are clipped. Lightning
    turns 16-mixed on a CPU accelerator into bf16-mixed (no scaler), but its plugin given directly
    runs with torch's CPU GradScaler. Not covered here: CUDA's fp16 autocast kernels."""
    seen: list[dict] = []
    real_clip = MixedPrecision.clip_gradients

    def recording_clip(self, optimizer, clip_val=0.0, gradient_clip_algorithm=None):
        state = self.scaler._per_optimizer_states[id(optimizer)]["stage"]
        seen.append(
            {"stage": state, "fused": optimizer.defaults.get("fused"), "scale": self.scaler.get_scale()}
        )
        return real_clip(self, optimizer, clip_val, gradient_clip_algorithm)

    monkeypatch.setattr(MixedPrecision, "clip_gradients", recording_clip)
    cfg = make_cfg(
        *FAST_DIGITS, "trainer.max_steps=3", "model.optimizer.fused=true", "trainer.gradient_clip_val=1.0"
    )
    with open_dict(cfg):
        cfg.trainer.precision = None  # the plugin carries it (Lightning takes one or the other)
        scaler = {"_target_": "torch.amp.GradScaler", "device": "cpu"}
        plugin = {"_target_": "lightning.pytorch.plugins.precision.MixedPrecision", "scaler": scaler}
        cfg.trainer.plugins.append({**plugin, "precision": "16-mixed", "device": "cpu"})
    train(cfg)
    assert len(seen) == 3
    assert all(s["stage"] is OptState.UNSCALED for s in seen)  # unscaled first, then clipped
    assert not any(s["fused"] for s in seen)  # foreach, which Lightning can clip
    assert seen[0]["scale"] == 2.0**16  # the scaler was really on (scaled loss, then unscaled)


def test_fp32_matmuls_use_tf32_on_cuda_only(monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(torch, "set_float32_matmul_precision", calls.append)
    precision.fp32_matmul_policy("cpu")
    assert calls == []
    precision.fp32_matmul_policy(torch.device("cuda", 1))
    assert calls == ["high"]
