"""Derived seeds: each random stream of difflab is a pure function of a base seed and a position."""

from __future__ import annotations


def derive_seed(*parts: int) -> int:
    """A seed for ``torch.Generator.manual_seed`` from integers, e.g. (seed, epoch, index).

    Python's hash of a tuple of ints is the same in every process and every run (PYTHONHASHSEED
    randomises str and bytes only), so another rank, a worker or a resumed run derives the same
    value with no random state to save. Masked to 63 bits: manual_seed takes a non-negative int64.
    """
    return hash(tuple(parts)) & 0x7FFF_FFFF_FFFF_FFFF
