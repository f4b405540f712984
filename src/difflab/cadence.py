"""When periodic work is due: the one rule every periodic callback and the module's logging share."""

from __future__ import annotations


def due(step: int, every: int | None) -> bool:
    """Whether work done every ``every`` optimizer steps (0 or None: never) falls on ``step``.

    Steps count from 1, as Lightning's ``global_step`` reads once an optimizer step has run (inside
    ``training_step`` the step being taken is ``global_step + 1``): work every 500 steps runs after steps
    500, 1000, ... and never at step 0, which is before any training.
    """
    return bool(every) and step > 0 and step % every == 0
