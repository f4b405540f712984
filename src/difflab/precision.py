"""Which training precision the hardware runs fastest, and which precisions it cannot run.

`trainer.precision` defaults to ``${difflab_precision:${.accelerator}}``: bf16-mixed where bf16
matrix units make it faster than fp32, else 32-true. The resolved value is what the run records in
its config.yaml. Lightning has no such choice ("auto" is not one of its precisions), and its
bf16-mixed is a loss on CPUs without AMX: there oneDNN runs bf16 on AVX512 at about half its fp32
rate (experiments/benchmarks/RESULTS.md), while with AMX bf16 matrix products run 2.7x fp32.
"""

from __future__ import annotations

import torch


def _cpu_has_amx() -> bool:
    # torch.cpu exposes the check only as a private helper; a torch without it counts as no AMX.
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe and probe())


def _on_gpu(accelerator: str) -> bool:
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def auto_precision(accelerator: str) -> str:
    """bf16-mixed on a CUDA GPU with bf16 or a CPU with AMX tiles; 32-true elsewhere (MPS, older
    GPUs and CPUs, where bf16 is slower than fp32 or missing)."""
    if _on_gpu(accelerator):
        return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "32-true"
    if accelerator in ("cpu", "auto"):
        return "bf16-mixed" if _cpu_has_amx() else "32-true"
    return "32-true"


def precision_problems(precision: str, accelerator: str) -> list[str]:
    """A precision or accelerator the hardware cannot run (the precision names are Lightning's rule)."""
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        return [f"trainer.accelerator={accelerator} but no CUDA GPU is visible; use trainer=cpu or ddp_cpu"]
    on_gpu = _on_gpu(accelerator)
    if precision.startswith("16") and not on_gpu:
        return [
            f"trainer.precision={precision} needs a GPU (accelerator={accelerator}); "
            "on CPU use bf16-mixed or 32-true"
        ]
    no_bf16 = on_gpu and torch.cuda.is_available() and not torch.cuda.is_bf16_supported()
    if precision.startswith("bf16") and no_bf16:
        return [f"trainer.precision={precision}: this GPU has no bf16; use 16-mixed or 32-true"]
    return []
