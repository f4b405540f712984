"""Which training precision the hardware runs fastest, which precisions difflab cannot run, and what
follows from the precision: the memory format, the optimizer's kernels, the fp32 matmul policy on CUDA.

`trainer.precision` defaults to ``${difflab_precision:${.accelerator}}``: bf16-mixed where it was
measured faster than fp32 on that class of hardware, else 32-true. The resolved value is what the run
records in its config.yaml. Lightning has no such choice ("auto" is not one of its precisions).

CPUs: one table, ``CPU_CLASSES``, maps each CPU class to its precision and names the measurement it
rests on. The instruction set alone does not decide it: an Intel Xeon VM with AVX512-BF16 but no AMX
ran a bf16 matmul at half its fp32 rate and the default job at 0.63-0.77x (oneDNN's avx512_core_bf16
kernels), while an AMD EPYC (Zen 4) with the same flag and no AMX runs bf16 faster than fp32
(experiments/benchmarks/RESULTS.md, "precision"); so the class is vendor + flags. A CPU of a class
nobody measured keeps 32-true.

GPUs: only compute capability 8.0+ (Ampere on) has bf16 units: torch's plain ``is_bf16_supported()``
also counts the emulation a V100 or T4 can run, slower than fp32.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

log = logging.getLogger(__name__)
# NHWC memory layout: on, off, or chosen by device and precision (uses_channels_last).
ChannelsLast = bool | Literal["auto"]

# Lightning's precisions in which the weights themselves are not fp32 ("-true" other than 32, and
# Transformer Engine's): the EMA shadows, the loss window's sums and the learned weighting's Fourier
# features are fp32 by design, and the batch reaches the UNet as fp32, so these fail at step 1.
_WEIGHT_DTYPES = {
    "16-true": "fp16",
    "bf16-true": "bf16",
    "64-true": "fp64",
    "64": "fp64",
    "transformer-engine": "bf16",
    "transformer-engine-float16": "fp16",
}


@dataclass(frozen=True)
class CpuClass:
    """A class of CPUs, the precision its training runs fastest in, and the measurement that says so."""

    name: str
    vendor: str | None  # /proc/cpuinfo's vendor_id (GenuineIntel, AuthenticAMD); None: any vendor
    needs: frozenset[str]  # /proc/cpuinfo flags the class has ("amx_tile" stands for torch's AMX probe)
    precision: str
    evidence: str


# First match wins. Where the class's evidence changes, change the row: nothing else picks a CPU precision.
CPU_CLASSES: tuple[CpuClass, ...] = (
    CpuClass(
        "AMX tiles (Intel Xeon, Sapphire Rapids on)",
        None,
        frozenset({"amx_tile"}),
        "bf16-mixed",
        "docs/benchmark-notes.md, 'bf16 where the CPU has AMX': 2048^2 matmul bf16 883 vs fp32 326 "
        "GFLOP/s, a `small` training step 1.2-1.75x faster (2 vCPUs; measured before the protocol)",
    ),
    CpuClass(
        "AMD with AVX512-BF16, no AMX (EPYC Zen 4 on)",
        "AuthenticAMD",
        frozenset({"avx512_bf16"}),
        "bf16-mixed",
        "experiments/benchmarks/RESULTS.md, 'precision' (precision_bench.py): the default job's step "
        "speed bf16-mixed / 32-true and the matmul ratio, interleaved, on a 2-core AMD EPYC (Zen 4)",
    ),
    CpuClass(
        "Intel with AVX512-BF16, no AMX",
        "GenuineIntel",
        frozenset({"avx512_bf16"}),
        "32-true",
        "docs/benchmark-notes.md, 'Notes' of the first table: an 'Intel(R) Xeon(R) Processor' VM (the "
        "hypervisor hid the generation: Cooper Lake, or a later Xeon with AMX not passed through), "
        "matmul bf16 164 vs fp32 283-312 GFLOP/s, `small` bf16-mixed 0.63-0.77x fp32 (3 repeats, "
        "measured before the protocol)",
    ),
    CpuClass(
        "any other CPU",
        None,
        frozenset(),
        "32-true",
        "not measured: without bf16 instructions bf16 is converted in software, and no measured class "
        "vouches for bf16 there",
    ),
)


def _cpu_has_amx() -> bool:
    # torch.cpu exposes the check only as a private helper; a torch without it counts as no AMX. It also
    # asks the OS (a kernel may not enable AMX state), which the flag in /proc/cpuinfo does not.
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe and probe())


@functools.cache
def cpu_info() -> tuple[str, frozenset[str]]:
    """(vendor_id, flags) of the first CPU in /proc/cpuinfo; ("", {}) where there is none (macOS,
    Windows): such a CPU falls to the last class unless torch finds AMX."""
    vendor, flags = "", frozenset()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return vendor, flags
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "vendor_id" and not vendor:
            vendor = value.strip()
        elif key == "flags" and not flags:
            flags = frozenset(value.split())
        if vendor and flags:
            break
    return vendor, flags


def cpu_class() -> CpuClass:
    """The row of ``CPU_CLASSES`` this machine's CPU falls in."""
    vendor, flags = cpu_info()
    flags = (flags - {"amx_tile"}) | ({"amx_tile"} if _cpu_has_amx() else set())
    return next(c for c in CPU_CLASSES if c.vendor in (None, vendor) and c.needs <= flags)


def _on_gpu(accelerator: str) -> bool:
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def cuda_has_bf16() -> bool:
    """A visible CUDA GPU with native bf16 (compute capability 8.0+); emulated bf16 does not count."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


def auto_precision(accelerator: str) -> str:
    """bf16-mixed on a CUDA GPU with bf16 units; on a CPU, its class's row of ``CPU_CLASSES``; 32-true
    elsewhere (MPS, pre-Ampere GPUs)."""
    if _on_gpu(accelerator):
        return "bf16-mixed" if cuda_has_bf16() else "32-true"
    if accelerator in ("cpu", "auto"):
        return cpu_class().precision
    return "32-true"


def precision_problems(precision: str, accelerator: str) -> list[str]:
    """A precision or accelerator the hardware (or difflab) cannot run; Lightning's own rule lists
    the precision names."""
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        return [f"trainer.accelerator={accelerator} but no CUDA GPU is visible; use trainer=cpu or ddp_cpu"]
    if precision in _WEIGHT_DTYPES:
        return [
            f"trainer.precision={precision} keeps the weights in {_WEIGHT_DTYPES[precision]}, and difflab "
            "keeps its EMA and loss sums in fp32; use bf16-mixed or 16-mixed (fp32 weights) or 32-true"
        ]
    on_gpu = _on_gpu(accelerator)
    if precision.startswith("16") and not on_gpu:
        return [
            f"trainer.precision={precision} needs a GPU (accelerator={accelerator}); "
            "on CPU use bf16-mixed or 32-true"
        ]
    if precision.startswith("bf16") and on_gpu and torch.cuda.is_available() and not cuda_has_bf16():
        name = torch.cuda.get_device_name()
        return [
            f"trainer.precision={precision}: {name} has no bf16 units (compute capability below 8.0: "
            "bf16 runs emulated, slower than fp32); use trainer.precision=16-mixed or 32-true"
        ]
    return []


def fp32_matmul_policy(device: torch.device | str) -> None:
    """On CUDA, fp32 matrix products run on TF32 tensor cores (Ampere on): torch's default leaves
    them at full fp32 ("highest"), while its cuDNN convolutions already use TF32 by default, so the
    UNet's attention and linear layers were the only fp32 work left off the tensor cores. A no-op
    elsewhere (CPU matmul precision is left as the user set it)."""
    if torch.device(device).type == "cuda":
        torch.set_float32_matmul_precision("high")


def uses_channels_last(setting: ChannelsLast, precision: str, device_type: str) -> bool:
    """Whether the UNet runs NHWC: ``setting`` true/false, or "auto": NHWC convolutions win in fp32 and
    on CUDA; on CPU under bf16/fp16 autocast oneDNN's NHWC kernels are the slower ones
    (experiments/benchmarks/RESULTS.md, "speed_levers")."""
    if setting != "auto":
        return bool(setting)
    return device_type != "cpu" or not str(precision).startswith(("bf16", "16"))


def optimizer_for_precision(
    factory: Callable[..., torch.optim.Optimizer], precision: str, gradient_clip_val: float | None
) -> Callable[..., torch.optim.Optimizer]:
    """The configured optimizer factory, or its foreach form where Lightning cannot clip a fused one:
    its mixed-precision plugin refuses to clip the gradients of fused optimizers (they unscale inside
    step()); foreach kernels are the next fastest."""
    keywords = getattr(factory, "keywords", {})
    if precision.endswith("-mixed") and gradient_clip_val and keywords.get("fused"):
        log.info("model.optimizer.fused=true with %s and clipping: using foreach kernels instead", precision)
        return functools.partial(factory.func, *factory.args, **{**keywords, "fused": None, "foreach": True})
    return factory
