"""Composing difflab's configs: the resolvers they use, the ``model.unet=`` / ``model.ema=`` spellings of
their groups, and ``compose`` (Hydra's compose API, its errors as one line naming the key), used by every
command's start-up checks, by the tests and by the benchmarks alike."""

from __future__ import annotations

import os
import re
from pathlib import Path

from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import MissingConfigException
from omegaconf import DictConfig, OmegaConf, open_dict

from difflab import config
from difflab.config import CONF_DIR
from difflab.errors import DifflabError
from difflab.rules import closest, dotted_keys


def register_resolvers() -> None:
    """The ``${difflab_...:}`` resolvers the configs use (before any config is composed)."""
    from difflab.metrics.fid import metric_name_for
    from difflab.precision import auto_precision
    from difflab.sweeps import study_seed  # imports optuna only when a sweep config resolves it

    if not OmegaConf.has_resolver("difflab_run_dir"):
        OmegaConf.register_new_resolver("difflab_run_dir", config.run_dir_once)
        OmegaConf.register_new_resolver("difflab_unique", config.unique_suffix)
        OmegaConf.register_new_resolver("difflab_fid_name", metric_name_for)
        OmegaConf.register_new_resolver("difflab_mkdir", config.make_dir)
        OmegaConf.register_new_resolver("difflab_precision", auto_precision)
        # The launch dir (hydra.job.chdir is false, so it stays the cwd); usable before HydraConfig is set.
        OmegaConf.register_new_resolver("difflab_cwd", os.getcwd)
        OmegaConf.register_new_resolver("difflab_study_seed", study_seed)


# Settings renamed since runs were recorded, old key -> new key: a command line with an old key is told
# the new one, and a resume reads its run's recorded config under the new names (rundir.changed_settings).
RENAMED = {
    "model.timesteps": "model.noise_levels.density",
    "model.logit_mean": "model.noise_levels.logit_mean",
    "model.logit_std": "model.noise_levels.logit_std",
    "model.stratified": "model.noise_levels.stratified",
}

# `model.unet=tiny`, `model.ema=posthoc` read naturally, but Hydra selects groups with a slash: accept both.
GROUP_ALIASES = {"model.unet": "model/unet", "model.ema": "model/ema", "model.guide": "model/guide"}


def rewrite_group_aliases(argv: list[str]) -> list[str]:
    """``model.unet=tiny`` -> ``model/unet=tiny`` (sweeps and ``+``/``~`` prefixes alike; ``null`` is a
    value, not a group choice), each argument read by Hydra's own override parser; flags and what it
    cannot parse pass unchanged (Hydra reports those itself)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    out = []
    for arg in argv:
        if "=" in arg and not arg.startswith("-"):
            try:
                (override,) = parser.parse_overrides([arg])
            except HydraException:
                override = None
            if (
                override is not None
                and override.key_or_group in GROUP_ALIASES
                and override.package is None
                and override.value() is not None  # model.ema=null: no EMA, a value, not a group choice
                and not isinstance(override.value(), dict)
                and arg.partition("=")[2]
            ):
                prefix = arg[: len(arg) - len(arg.lstrip("+~"))]  # the value's text as given (a sweep too)
                arg = f"{prefix}{GROUP_ALIASES[override.key_or_group]}={arg.partition('=')[2]}"
        out.append(arg)
    return out


def compose(name: str, overrides: list[str]) -> DictConfig:
    """``conf/<name>.yaml`` with ``overrides``, as Hydra composes it, or one DifflabError line."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import ConfigCompositionException, OverrideParseException

    register_resolvers()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3", job_name=name):
            return hydra_compose(name, overrides=overrides, return_hydra_config=True)
    except MissingConfigException as e:
        raise DifflabError(_missing_choice(e)) from None
    except ConfigCompositionException as e:
        bad = re.search(r"Could not override '([^']+)'", str(e))
        if bad is None:
            raise DifflabError(str(e).strip().splitlines()[0]) from None
        raise DifflabError(_unknown_key(name, overrides, bad[1])) from None
    except OverrideParseException as e:
        raise DifflabError(f"cannot parse the command line: {str(e).strip().splitlines()[0]}") from None
    finally:
        GlobalHydra.instance().clear()


def _missing_choice(e: MissingConfigException) -> str:
    found = re.search(r"Could not find '([^']+)'", str(e))
    wanted = found[1] if found else (e.missing_cfg_file or "")
    group, _, choice = wanted.rpartition("/")
    options = sorted(e.options or [])
    if not group or not options:
        return str(e).strip().splitlines()[0]
    near = closest(choice, options)
    hint = f"did you mean {near}? " if near else ""
    return f"{group.replace('/', '.')}={choice} is not a choice; {hint}(choices: {', '.join(options)})"


def _unknown_key(name: str, overrides: list[str], key: str) -> str:
    """``unknown key data.batch_sise; did you mean data.batch_size?``: the keys come from the config
    composed without that override."""
    if key in RENAMED:
        return f"{key} is now {RENAMED[key]}"
    rest = [o for o in overrides if o.lstrip("+~").partition("=")[0] != key]
    try:
        cfg = compose(name, rest)
    except DifflabError:
        return f"unknown key {key}"
    keys = [k for k in dotted_keys(cfg) if not k.startswith("hydra.")] if not key.startswith("hydra.") else []
    chosen = OmegaConf.select(cfg, "hydra.runtime.choices.model")  # None: the command has no model group
    if chosen and key.startswith("model.") and key not in keys:
        # A key of the other objective (prediction_type on the default flow model): name the choice.
        for other in sorted(p.stem for p in (Path(CONF_DIR) / "model").glob("*.yaml")):
            if other != chosen and key in _model_keys(name, rest, other):
                return f"{key} is a model={other} setting; add model={other} (this run's model is {chosen})"
    near = closest(key, keys)
    return f"unknown key {key}" + (f"; did you mean {near}?" if near else "")


def _model_keys(name: str, overrides: list[str], model: str) -> list[str]:
    """The keys of ``name``'s config with ``model=<model>`` instead of the chosen one (none if it fails)."""
    rest = [o for o in overrides if o.lstrip("+~").partition("=")[0] != "model"]
    try:
        return dotted_keys(compose(name, [*rest, f"model={model}"]))
    except DifflabError:
        return []


def compose_run(
    run_dir: Path, overrides: list[str] | tuple[str, ...] = (), name: str = "train"
) -> DictConfig:
    """The config ``difflab-<name> <overrides>`` would run with in-process (tests, benchmarks, notebooks),
    everything written under ``run_dir``: paths.output_dir is ``run_dir``, logs and data caches beside it.
    Hydra's runtime config is set for the ``${hydra:...}`` values resolved later; the caller (the test
    suite's autouse fixture) clears it."""
    cfg = compose(name, rewrite_group_aliases(list(overrides)))
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(run_dir)
        cfg.paths.log_dir = str(run_dir.parent / "logs")
        cfg.paths.data_dir = str(run_dir.parent / "data_cache")
        del cfg["hydra"]
    return cfg
