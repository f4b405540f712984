"""What `model.immiscible=true` costs per training step: the noise-to-image assignment alone.

    .venv/bin/python experiments/benchmarks/immiscible_cost.py

Times `difflab.diffusion.noise.immiscible_noise` (distances by torch.cdist, Hungarian assignment by
scipy on the host) for batch sizes and image shapes from the CPU default up to large GPU batches; prints a
markdown table for RESULTS.md. The assignment is O(B^3) in the batch and linear in the pixels; its share
of a step is this time over the step time of the run it is added to (RESULTS.md gives both).
"""

from __future__ import annotations

import statistics
import time

import torch
from scipy.optimize import linear_sum_assignment

from difflab.diffusion.noise import immiscible_noise

CASES = [  # (per-device batch, channels, size): data=fashion_mnist / twemoji, the flowers recipe, GPU batches
    (32, 1, 28),
    (32, 3, 32),
    (16, 3, 64),
    (64, 3, 64),
    (128, 3, 64),
    (256, 3, 64),
    (512, 3, 64),
]


def median_seconds(fn, repeats: int = 7) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_case(batch: int, channels: int, size: int) -> tuple[float, float, float]:
    """Median seconds of: the whole call, its distance matrix, its Hungarian assignment."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(batch, channels, size, size, generator=g) * 2 - 1
    noise = torch.randn(batch, channels, size, size, generator=g)
    dist = torch.cdist(x0.flatten(1), noise.flatten(1)).numpy()
    return (
        median_seconds(lambda: immiscible_noise(x0, noise)),
        median_seconds(lambda: torch.cdist(x0.flatten(1), noise.flatten(1))),
        median_seconds(lambda: linear_sum_assignment(dist)),
    )


def main() -> None:
    print(f"torch threads: {torch.get_num_threads()}\n")
    print("| batch | image | ms per step | of which distances | of which assignment |")
    print("| --- | --- | --- | --- | --- |")
    for batch, channels, size in CASES:
        total, dist, assign = (s * 1000 for s in time_case(batch, channels, size))
        print(f"| {batch} | {channels}x{size}x{size} | {total:.2f} | {dist:.2f} | {assign:.2f} |", flush=True)


if __name__ == "__main__":
    main()
