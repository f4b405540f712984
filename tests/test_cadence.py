"""cadence.due: the one rule of every periodic callback (steps counted from 1, never at step 0)."""

from __future__ import annotations

import pytest

from difflab.cadence import due


@pytest.mark.parametrize(
    ("step", "every", "expected"),
    [
        (0, 5, False),  # before any training
        (4, 5, False),
        (5, 5, True),
        (10, 5, True),
        (11, 5, False),
        (7, 1, True),
        (5, 0, False),  # 0: never
        (5, None, False),  # None: never
    ],
)
def test_due(step: int, every: int | None, expected: bool) -> None:
    assert due(step, every) is expected
