"""FID (and KID) during training: every N steps and at the last step, from the EMA weights, on all ranks;
against the training images or a held-out split of the run's data source."""

from __future__ import annotations

import copy
import json
import logging
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated

import lightning as L
from torch import nn

from difflab.cadence import due
from difflab.diffusion.guidance import EMA, STEP, GuidedUNet, load_guide, mismatch
from difflab.diffusion.sampling import SamplerName, build_sampler
from difflab.diffusion.trained_guide import ALONGSIDE
from difflab.errors import DifflabError
from difflab.inference import configs_of
from difflab.metrics.fid import FIDEvaluator, prepare_extractor, real_features
from difflab.rules import AtLeast
from difflab.rundir import make_writable_dir

log = logging.getLogger(__name__)


class FIDCallback(L.Callback):
    """Logs ``val/fid_<extractor>_<n>`` (e.g. ``val/fid_classifier_1k``) and appends to ``results_file``.

    Every rank samples ``num_samples / world_size`` images with per-image seeds, so the image set (and
    the FID) does not depend on the number of ranks; torchmetrics sums the statistics across ranks.
    Rank 0 prepares the extractor (trains the classifier on its device when it has none) and sends it
    to the others; the real features are extracted in shards by all ranks on their devices, gathered,
    and cached under ``cache_dir`` (each rank whose dir lacks them writes them: shared or node-local).

    ``real_split``: null, the reference is the training images; a split name (``test``), that split of
    the run's data source (held-out images: a model that memorises its training set gains nothing);
    ``auto``, ``test`` where the source has it, else the training images. The feature extractor is
    prepared on the training images either way.

    ``guide`` / ``guidance``: autoguidance (diffusion/guidance.py) by a checkpoint or exported pipeline,
    by ``alongside``, the guide this run trains alongside (model/guide=tiny; its EMA weights as they
    are at each evaluation), or by ``step:N``, this run's own EMA weights at step N: until then FID is
    unguided (each fid.jsonl line names the guide it used).
    """

    def __init__(
        self,
        extractor: nn.Module,
        every_n_steps: Annotated[int, AtLeast(0)] = 1000,
        num_samples: Annotated[int, AtLeast(2)] = 1000,
        num_real: Annotated[int, AtLeast(2)] = 10000,
        sampler: SamplerName = "dpmsolver++",
        steps: Annotated[int, AtLeast(1)] = 20,
        seed: int = 1234,
        batch_size: Annotated[int, AtLeast(1)] = 250,
        kid: bool = False,
        cache_dir: str = "data_cache/fid",
        results_file: str | None = None,
        real_split: str | None = None,
        guide: str | None = None,
        guidance: Annotated[float, AtLeast(0)] = 1.0,
    ) -> None:
        if guide is None and guidance != 1.0:
            raise DifflabError(
                f"callbacks.fid.guidance={guidance} needs a guide: give callbacks.fid.guide=PATH, step:N or "
                f"{ALONGSIDE} "
                "(guidance=1.0 is unguided)"
            )
        if guide is not None and EMA.fullmatch(guide):
            raise DifflabError(
                f"callbacks.fid.guide={guide}: a run's post-hoc EMA exists once it has trained; guide its "
                "FID with step:N or a checkpoint here, and with ema:S in difflab-eval afterwards"
            )
        self.guide, self.guidance = guide, float(guidance)
        self.guide_unet: nn.Module | None = None
        self._pending: dict | None = None  # step:N's weights from a resumed checkpoint
        self.extractor = extractor
        self.every_n_steps, self.num_samples, self.num_real = every_n_steps, num_samples, num_real
        self.sampler_name, self.steps, self.seed, self.batch_size = sampler, steps, seed, batch_size
        self.kid, self.cache_dir = kid, cache_dir
        self.results_file = Path(results_file) if results_file else None
        self.real_split = real_split
        self.reference = ""  # the identity of the reference images (set in setup)
        self.evaluator: FIDEvaluator | None = None
        self.last_step = -1

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.evaluator is not None:
            return
        # Every rank checks its own dir: on several nodes it may be node-local (one line, not a traceback
        # from the file lock).
        make_writable_dir(self.cache_dir, "metrics.cache_dir")
        dm, world = trainer.datamodule, trainer.strategy
        device = world.root_device  # the module is not on it yet in setup()
        prepare_extractor(self.extractor, dm, device, world)
        reference = self.reference_data(dm, getattr(pl_module, "run_config", None))
        feats = real_features(
            reference, self.extractor, self.num_real, self.cache_dir, device, self.batch_size, world
        )
        self.reference = str(getattr(reference, "identity", ""))  # set up by real_features
        self.evaluator = FIDEvaluator(self.extractor, self.num_samples, kid=self.kid)
        self.evaluator.set_real_features(feats, rank=trainer.global_rank, world_size=trainer.world_size)
        if self.guide == ALONGSIDE and getattr(pl_module, "guide", None) is None:
            raise DifflabError(
                f"callbacks.fid.guide={ALONGSIDE}: this run trains no guide; add model/guide=tiny or give "
                "a checkpoint path or step:N"
            )
        if self.guide is not None and not STEP.fullmatch(self.guide) and self.guide != ALONGSIDE:
            # A fixed guide is checked before the first step (step:N is this run's own model).
            key = f"callbacks.fid.guide={self.guide}"
            if not Path(self.guide).exists():
                raise DifflabError(f"{key} does not exist; give a checkpoint, an exported pipeline or step:N")
            mine = (dict(pl_module.unet.config), dict(pl_module.noise_scheduler.config))
            if problem := mismatch(key, configs_of(self.guide, "callbacks.fid.guide"), mine, "this run"):
                raise DifflabError(problem)

    def reference_data(self, datamodule: object, run_config: dict | None) -> object:
        """The datamodule whose images form the FID reference (``real_split``, see the class)."""
        if self.real_split is None:
            return datamodule
        data_cfg = (run_config or {}).get("data") or {}
        if "split" not in data_cfg.get("source", {}):
            if self.real_split == "auto":
                log.info("FID reference: the training images (the data source has no splits)")
                return datamodule
            raise DifflabError(
                f"callbacks.fid.real_split={self.real_split}: the data source "
                f"({data_cfg.get('source', {}).get('_target_')}) has no splits; use real_split=null "
                "(the training images) or auto"
            )
        from difflab.evaluate import reference_split

        split = "test" if self.real_split == "auto" else self.real_split
        try:
            reference = reference_split(data_cfg, split, "this run")
        except DifflabError as e:
            if self.real_split != "auto":
                raise
            log.warning("FID reference: the training images (no %s split: %s)", split, e)
            return datamodule
        log.info("FID reference: the %s split (%s)", split, reference.identity)
        return reference

    def guide_network(self, trainer: L.Trainer, pl_module: L.LightningModule) -> nn.Module | None:
        """The guide (EMA weights, on the module's device), or None while FID is unguided."""
        if self.guide is None or self.guidance == 1.0:
            return None
        if self.guide_unet is None and not STEP.fullmatch(self.guide) and self.guide != ALONGSIDE:
            self.guide_unet = load_guide(self.guide, self.guide, use_ema=True)
        if self.guide_unet is None and self._pending is not None:  # resumed past step N
            self.guide_unet = copy.deepcopy(pl_module.unet)
            self.guide_unet.load_state_dict(self._pending)
        return None if self.guide_unet is None else self.guide_unet.to(pl_module.device).eval()

    def keep_step_guide(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """At step N of ``step:N``, a copy of the EMA weights (what that step's checkpoint holds): kept
        here and in this callback's checkpoint state, so it guides whatever checkpoints are deleted later
        (save_top_k) and after a resume."""
        m = STEP.fullmatch(self.guide or "")
        if m and self.guide_unet is None and trainer.global_step == int(m.group(1)):
            with pl_module.sampling_unet() as unet:
                self.guide_unet = copy.deepcopy(unet)

    def state_dict(self) -> dict:
        if STEP.fullmatch(self.guide or "") and self.guide_unet is not None:
            return {"guide": self.guide, "guide_weights": self.guide_unet.state_dict()}
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict.get("guide") == self.guide:
            self._pending = state_dict["guide_weights"]

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        step = trainer.global_step
        self.keep_step_guide(trainer, pl_module)
        final = 0 < trainer.max_steps <= step
        if (due(step, self.every_n_steps) or final) and step > 0 and step != self.last_step:
            self.evaluate(trainer, pl_module)

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        self.last_step = trainer.global_step
        t0 = time.perf_counter()
        self.evaluator.to(pl_module.device)
        sampler = build_sampler(self.sampler_name, dict(pl_module.noise_scheduler.config))
        guide = self.guide_network(trainer, pl_module)
        alongside = self.guide == ALONGSIDE and self.guidance != 1.0
        with (
            pl_module.sampling_unet() as unet,
            pl_module.sampling_guide() if alongside else nullcontext(guide) as guide,
        ):
            model = unet if guide is None else GuidedUNet(unet, guide, self.guidance)
            values = self.evaluator.evaluate(model, sampler, self.steps, self.seed, self.batch_size)
        seconds = time.perf_counter() - t0
        pl_module.log_dict(values, rank_zero_only=False)
        pl_module.log("perf/fid_seconds", seconds)
        if trainer.is_global_zero and self.results_file is not None:
            record = {
                "step": trainer.global_step,
                **values,
                "extractor": self.extractor.identity,
                "num_samples": self.num_samples,
                "num_real": self.num_real,
                "reference": self.reference,  # training images or a held-out split (real_split)
                "sampler": self.sampler_name,
                "steps": self.steps,
                **(
                    {"guide": self.guide if guide is not None else None, "guidance": self.guidance}
                    if self.guide is not None
                    else {}
                ),
                "seconds": round(seconds, 2),
            }
            self.results_file.parent.mkdir(parents=True, exist_ok=True)
            with open(self.results_file, "a") as f:
                f.write(json.dumps(record) + "\n")
        log.info("FID at step %d: %s (%.1f s)", trainer.global_step, values, seconds)
        return values
