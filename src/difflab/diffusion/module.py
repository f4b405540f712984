"""The LightningModule: UNet + noise process + EMA, trained with AdamW and a warm-up LR schedule."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Annotated, Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from diffusers import UNet2DModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel

from difflab.cadence import due
from difflab.checkpoints import repair_epoch_progress, start_next_epoch_after_epoch_end
from difflab.diffusion.ema import swapped_in
from difflab.diffusion.loss_window import LossWindow
from difflab.diffusion.noise import NoiseLevels, TrainScheduler, immiscible_noise, noise_process, objective_of
from difflab.diffusion.posthoc import PowerFunctionEMA
from difflab.diffusion.trained_guide import TrainedGuide, clip_each_group
from difflab.diffusion.weighting import LearnedWeighting
from difflab.errors import DifflabError
from difflab.precision import ChannelsLast, fp32_matmul_policy, optimizer_for_precision, uses_channels_last
from difflab.rules import Above, AtLeast
from difflab.run_record import RunRecord
from difflab.seeds import derive_seed

# difflab's name → diffusers' get_scheduler name.
LR_SCHEDULES = {"constant": "constant_with_warmup", "cosine": "cosine", "linear": "linear"}
LRSchedule = Literal[tuple(LR_SCHEDULES)]  # type: ignore[valid-type]
log = logging.getLogger(__name__)


class DiffusionModule(L.LightningModule):
    """Trains ``unet`` to denoise under ``noise_scheduler`` (its class picks the objective: DDPM or
    flow matching); keeps an EMA copy of its weights."""

    def __init__(
        self,
        unet: UNet2DModel,
        noise_scheduler: TrainScheduler,
        optimizer: Callable[..., torch.optim.Optimizer],
        lr_schedule: LRSchedule = "cosine",
        warmup_steps: Annotated[int, AtLeast(0)] = 100,
        min_snr_gamma: Annotated[float, Above(0)] | None = None,
        noise_levels: NoiseLevels | None = None,
        immiscible: bool = False,
        learned_weighting: bool = False,
        ema: Callable[[torch.nn.Module], EMAModel | PowerFunctionEMA] | None = None,
        seed: int | None = 0,
        channels_last: ChannelsLast = "auto",
        compile: bool = False,
        init_from: str | None = None,
        guide: TrainedGuide | None = None,
    ) -> None:
        """``optimizer``: a partial taking the parameters; ``ema``: a partial taking the UNet (the EMA
        kept for every grid, FID and export), or None for none; ``init_from``: a trained run's checkpoint
        or an exported pipeline whose UNet weights this run starts from (inference.init_weights); ``guide``:
        a small UNet trained alongside for autoguidance (diffusion/trained_guide.py), or None."""
        super().__init__()
        if init_from is not None:  # before the EMA copies the weights
            from difflab.inference import init_weights

            init_weights(unet, dict(noise_scheduler.config), init_from)
        self.unet = unet
        self.noise_scheduler = noise_scheduler
        self.process = noise_process(noise_scheduler, noise_levels, min_snr_gamma)
        self.immiscible = immiscible
        # A submodule, so its weights are trained, checkpointed and resumed with the UNet's.
        self.weighting = LearnedWeighting() if learned_weighting else None
        self.optimizer_factory = optimizer
        self.lr_schedule, self.warmup_steps = lr_schedule, warmup_steps
        self.channels_last_setting = channels_last
        self.channels_last = False  # set by _to_channels_last(): now if true, in setup() if "auto"
        self.ema = ema(unet) if ema is not None else None
        self.guide = guide  # a submodule: its weights are checkpointed with the UNet's
        self._guide_steps: int | None = None  # how many steps it trains (configure_optimizers); None: all
        if channels_last is True:
            self._to_channels_last()
        # The base seed of the per-step noise; random when unset, and saved so a resume stays exact.
        self.noise_seed = int(seed) if seed is not None else int(torch.randint(0, 2**31, ()).item())
        self.run_config: dict = {}  # the resolved run config, stored in checkpoints (set by train)
        # (finite flags, steps, last step) of the loss window just handed to the loggers, for the
        # divergence guard (callbacks/divergence.py), which clears it.
        self.logged_window: tuple[torch.Tensor, int, int] | None = None
        if compile:
            self.unet.compile()  # in place: state_dict keys stay the same as the eager model's
        self.loss_window = LossWindow(self.process.num_timesteps)
        self._last_step = -1
        self._ema_params: list[torch.nn.Parameter] = []

    @staticmethod
    def settings_problems(settings: dict[str, Any]) -> list[str]:
        """The settings an objective cannot take together (rules.config_problems runs this at start-up)."""
        from difflab.diffusion.meanflow import meanflow_settings_problems

        if objective_of(settings.get("noise_scheduler") or {}) == "meanflow":
            return meanflow_settings_problems(settings)
        return []

    # ----------------------------------------------------------------------------------- training
    def setup(self, stage: str) -> None:
        # Every buffer here (the noise process's tables) is a function of the config, equal on every
        # rank: DDP need not broadcast rank 0's on each forward.
        torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            self, [name for name, _ in self.named_buffers()]
        )
        if self.ema is not None:
            # ddp_spawn hands each worker the module through shared memory. Lightning gives the module's
            # parameters and buffers private storage, but the EMA shadows are plain attributes: left
            # shared, every rank lerps the same storage and the EMA moves N times too fast.
            self.ema.map_shadows(lambda s: s.clone() if s.is_shared() else s)
        if self.guide is not None and self.guide.ema is not None:
            self.guide.ema.map_shadows(lambda s: s.clone() if s.is_shared() else s)
        self.loss_window.unshare()  # plain attributes too, for the same reason
        device_type = self.trainer.strategy.root_device.type
        fp32_matmul_policy(self.trainer.strategy.root_device)  # in every rank: a process-wide setting
        if not self.channels_last and uses_channels_last(
            self.channels_last_setting, self.trainer.precision, device_type
        ):
            self._to_channels_last()

    def _to_channels_last(self) -> None:
        self.channels_last = True
        guide = self.guide
        for unet, ema in [(self.unet, self.ema)] + ([(guide.unet, guide.ema)] if guide is not None else []):
            unet.to(memory_format=torch.channels_last)
            if ema is not None:  # the shadows follow, so the foreach EMA update runs over alike strides
                # Tensor.to, as Module.to converts the weights: same strides.
                ema.map_shadows(lambda s: s.to(memory_format=torch.channels_last) if s.dim() == 4 else s)

    def on_fit_start(self) -> None:
        if self.ema is not None:
            self.ema.to(self.device)
        # The same Parameter objects the optimizer holds (moving devices and loading weights update
        # them in place). unet.parameters() walks every submodule: 0.14 ms a step for the tiny UNet.
        self._ema_params = list(self.unet.parameters())
        if self.guide is not None and self.guide.ema is not None:
            self.guide.ema.to(self.device)

    def on_train_start(self) -> None:
        self._last_step = int(self.trainer.estimated_stepping_batches) - 1
        start_next_epoch_after_epoch_end(self.trainer)

    def _step_generator(self, batch_idx: int) -> torch.Generator:
        # Noise and timesteps are a pure function of (seed, epoch, batch, rank): they differ per rank
        # and a resumed run redraws exactly what an uninterrupted one would, with no RNG state to save.
        key = derive_seed(self.noise_seed, self.current_epoch, batch_idx, self.global_rank)
        return torch.Generator(self.device).manual_seed(key)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        x0 = batch
        if self.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        g = self._step_generator(batch_idx)
        noise = torch.randn(x0.shape, generator=g, device=x0.device, dtype=x0.dtype)
        if self.channels_last:
            # The NCHW draw's values (a resume redraws them), laid out as the batch: with mixed layouts
            # every elementwise op and the loss would permute one operand.
            noise = noise.contiguous(memory_format=torch.channels_last)
        t = drawn = self.process.timesteps(x0.shape[0], g, x0.device)
        if self.immiscible:
            noise = immiscible_noise(x0, noise)
        pred, target, t = self.process.prediction_and_target(self.unet, x0, noise, t, g)
        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        weighted = per_sample * self.process.loss_weights(t)
        loss = weighted.mean()
        # The loggers keep the fixed-weight loss (comparable across runs); training minimises the
        # objective's own (MeanFlow's adaptive weight) or the learned weighting's, whose u terms make
        # its value no measure of quality.
        objective = self.process.objective_loss(weighted)
        if self.weighting is not None:
            objective = self.weighting(weighted, self.process.log_snr(t)).mean()
        if self.guide is not None and (guide_loss := self._guide_objective(x0, noise, drawn, g)) is not None:
            objective = objective + guide_loss

        self.loss_window.add(loss, per_sample, t)
        if self._trainer is None:
            self._log_window()
        elif self._closes_optimizer_step(batch_idx):
            to_loggers = self._logs_this_step()
            # The final step logs its partial window too, so sweepers always read a train/loss; that
            # value reaches no logger, so the window stays open (and saved) for a run that extends it.
            if to_loggers or self.global_step >= self._last_step:
                # The window's loss reaches the host here anyway (loggers, sweepers): the divergence
                # guard (callbacks/divergence.py) checks it at no extra sync.
                self.logged_window = (self.loss_window.finite(), self.loss_window.steps, self.global_step + 1)
                self._log_window(reset=to_loggers)
        return objective

    def _guide_trains(self) -> bool:
        return self._guide_steps is None or self.global_step < self._guide_steps

    def _guide_objective(
        self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, g: torch.Generator
    ) -> torch.Tensor | None:
        """The trained guide's loss on the batch's first images, with their noise and levels (its own
        draws, MeanFlow's second time, come from ``g`` after the model's); once it is frozen, its zero
        loss under DDP and None (nothing to run) in a single process."""
        if not self._guide_trains():
            return self.guide.idle_loss() if self._trainer and self.trainer.world_size > 1 else None
        k = self.guide.batch_size(x0.shape[0])
        pred, target, t = self.process.prediction_and_target(self.guide.unet, x0[:k], noise[:k], t[:k], g)
        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        return self.process.objective_loss(per_sample * self.process.loss_weights(t))

    def _closes_optimizer_step(self, batch_idx: int) -> bool:
        """Whether this micro-batch is the last of its optimizer step (Lightning steps every
        ``accumulate_grad_batches`` batches of an epoch and on its last batch)."""
        trainer = self.trainer
        every = trainer.accumulate_grad_batches
        return (
            (batch_idx + 1) % every == 0
            or trainer.is_last_batch
            or batch_idx + 1 == trainer.num_training_batches
        )

    def _logs_this_step(self) -> bool:
        """Whether Lightning hands this optimizer step's metrics to the loggers (every
        ``log_every_n_steps`` steps, counted from 1, and when the run stops)."""
        every = self.trainer.log_every_n_steps
        return bool(every) and (due(self.global_step + 1, every) or self.trainer.should_stop)

    def _log_window(self, reset: bool = True) -> None:
        """Log the means over the steps since the last log point; ``reset`` starts a new window."""
        means = self.loss_window.means()
        self.log("train/loss", means.pop("train/loss"), prog_bar=True)
        self.log_dict(means)
        if self.ema is not None:
            self.log("train/ema_decay", float(self.ema.cur_decay_value or 0.0))
        if reset:
            self.loss_window.reset()

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        # One EMA update per real optimizer step (not per micro-batch under gradient accumulation).
        if self.ema is not None:
            self.ema.step(self._ema_params or self.unet.parameters())
            if self._is_writer():
                self.ema.snapshot()
        if self.guide is not None and self.guide.ema is not None and self._guide_trains():
            self.guide.ema.step(self.guide.unet.parameters())

    def on_train_end(self) -> None:
        if self.ema is not None and self._is_writer():
            self.ema.snapshot(end_of_run=True)

    def _is_writer(self) -> bool:
        return self._trainer is None or self.trainer.is_global_zero

    def configure_optimizers(self) -> dict:
        params = list(self.unet.parameters())
        params += list(self.weighting.parameters()) if self.weighting is not None else []
        factory = optimizer_for_precision(
            self.optimizer_factory, str(self.trainer.precision), self.trainer.gradient_clip_val
        )
        groups = [{"params": params}]
        if self.guide is not None:
            lr = {"lr": self.guide.lr} if self.guide.lr is not None else {}
            groups.append({"params": list(self.guide.unet.parameters()), **lr})
        optimizer = factory(params=groups)
        # estimated_stepping_batches counts real optimizer steps: max_steps, or epochs x batches
        # divided by accumulation and sharded over devices, which is what the schedule must span.
        total = int(self.trainer.estimated_stepping_batches)
        scheduler = get_scheduler(
            LR_SCHEDULES[self.lr_schedule],
            optimizer,
            num_warmup_steps=self.warmup_steps,
            num_training_steps=max(total, 1),
        )
        if self.guide is not None:
            # The guide follows the same schedule for its steps, then learning rate 0: frozen.
            self._guide_steps = stop = self.guide.steps(max(total, 1))
            shape = scheduler.lr_lambdas[0]
            scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer, [shape, lambda step: shape(step) if step < stop else 0.0]
            )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        if self.guide is None or not gradient_clip_val:
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        else:  # the model's norm as without a guide, the guide's its own
            clip_each_group(optimizer, float(gradient_clip_val), gradient_clip_algorithm or "norm")

    # ----------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # A diverged model never gets here: the divergence guard's on_save_checkpoint runs first.
        snapshots = self.ema.snapshot_dir if self.ema is not None else None
        RunRecord(
            unet_config=dict(self.unet.config),
            scheduler_config=dict(self.noise_scheduler.config),
            noise_seed=self.noise_seed,
            config=self.run_config,
            log_window=self.loss_window.state(),
            ema_kind=self.ema.kind if self.ema is not None else "none",
            snapshot_dir=str(snapshots) if snapshots else None,
            guide_unet_config=dict(self.guide.unet.config) if self.guide is not None else None,
        ).to_checkpoint(checkpoint)
        if self.ema is not None:
            checkpoint["ema"] = self.ema.state_dict()
        if self.guide is not None and self.guide.ema is not None:
            checkpoint["guide_ema"] = self.guide.ema.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        repair_epoch_progress(checkpoint)
        record = RunRecord.from_checkpoint(checkpoint)
        self.noise_seed = record.noise_seed if record.noise_seed is not None else self.noise_seed
        if (record.guide_unet_config is not None) != (self.guide is not None):
            raise DifflabError(
                "cannot resume: the checkpoint's run "
                + ("trained" if self.guide is None else "did not train")
                + " a guide alongside (model.guide); resume with its settings or start a new run"
            )
        if self.guide is not None and self.guide.ema is not None and "guide_ema" in checkpoint:
            self.guide.ema.load_state_dict(checkpoint["guide_ema"])
            self.guide.ema.to(self.device)
        if record.log_window is not None:  # the partly filled window, so logged means resume exactly
            self.loss_window.load_state(record.log_window)
        if self.ema is not None and "ema" in checkpoint:
            if record.ema_kind != self.ema.kind:
                raise DifflabError(
                    f"the checkpoint's EMA is {record.ema_kind} and this run's is {self.ema.kind}: "
                    f"resume with model/ema={record.ema_kind}"
                )
            self.ema.load_state_dict(checkpoint["ema"])
            self.ema.to(self.device)

    # ----------------------------------------------------------------------------------- sampling
    def sampling_unet(self) -> contextlib.AbstractContextManager[UNet2DModel]:
        """The UNet as every grid and FID evaluation samples it: EMA weights swapped in, eval mode.
        The live weights and the training mode come back afterwards, even on error."""
        return _for_sampling(self.unet, self.ema)

    def sampling_guide(self) -> contextlib.AbstractContextManager[UNet2DModel]:
        """The guide trained alongside (model.guide), as sampling_unet gives the model."""
        return _for_sampling(self.guide.unet, self.guide.ema)


@contextlib.contextmanager
def _for_sampling(unet: UNet2DModel, ema: EMAModel | PowerFunctionEMA | None) -> Iterator[UNet2DModel]:
    was_training = unet.training
    unet.eval()
    try:
        with swapped_in(ema, unet) as swapped:
            yield swapped
    finally:
        unet.train(was_training)
