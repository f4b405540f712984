"""Optuna sweeps that can be rerun: the sampler continues a stored study instead of replaying it."""

from __future__ import annotations


def study_seed(seed: int | None, storage: str, study_name: str) -> int | None:
    """``seed`` + the number of trials the stored study already holds (the config's sampler seed).

    With a fixed seed, rerunning the same command (which continues the same SQLite study) would make
    the sampler replay its first suggestions: the random start-up trials of the second invocation
    repeat those of the first. Offsetting by the stored trial count keeps a sweep reproducible (the
    same study history gives the same suggestions) and makes every invocation propose new points.
    """
    if seed is None:
        return None
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        done = len(optuna.load_study(study_name=study_name, storage=storage).trials)
    except KeyError:  # no such study yet: the sweeper creates it
        done = 0
    return int(seed) + done
