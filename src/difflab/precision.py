"""Which training precision the hardware runs fastest, which precisions difflab cannot run, and the
fp32 matmul policy on CUDA.

`trainer.precision` defaults to ``${difflab_precision:${.accelerator}}``: bf16-mixed where bf16
matrix units make it faster than fp32, else 32-true. The resolved value is what the run records in
its config.yaml. Lightning has no such choice ("auto" is not one of its precisions), and its
bf16-mixed is a loss on CPUs without AMX: there oneDNN runs bf16 on AVX512 at about half its fp32
rate (experiments/benchmarks/RESULTS.md), while with AMX bf16 matrix products run 2.7x fp32.
On GPUs only compute capability 8.0+ (Ampere on) has bf16 units: torch's plain
``is_bf16_supported()`` also counts the emulation a V100 or T4 can run, slower than fp32.
"""

from __future__ import annotations

import torch

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


def _cpu_has_amx() -> bool:
    # torch.cpu exposes the check only as a private helper; a torch without it counts as no AMX.
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe and probe())


def _on_gpu(accelerator: str) -> bool:
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def cuda_has_bf16() -> bool:
    """A visible CUDA GPU with native bf16 (compute capability 8.0+); emulated bf16 does not count."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


def auto_precision(accelerator: str) -> str:
    """bf16-mixed on a CUDA GPU with bf16 units or a CPU with AMX tiles; 32-true elsewhere (MPS,
    pre-Ampere GPUs and older CPUs, where bf16 is slower than fp32 or missing)."""
    if _on_gpu(accelerator):
        return "bf16-mixed" if cuda_has_bf16() else "32-true"
    if accelerator in ("cpu", "auto"):
        return "bf16-mixed" if _cpu_has_amx() else "32-true"
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
