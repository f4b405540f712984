"""Diffusion math at tiny shapes, EMA, training on digits, and exact checkpoint round trips."""

from __future__ import annotations

import hydra
import pytest
import torch
from diffusers import DDPMScheduler

from difflab.checkpoints import load_checkpoint
from difflab.diffusion.ema import build_ema
from difflab.diffusion.noise import NoiseProcess
from difflab.train import train
from tests.conftest import FAST_DIGITS


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_training_target_per_prediction_type(prediction_type):
    sched = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)
    process = NoiseProcess(sched)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(6, 1, 4, 4, generator=g), torch.randn(6, 1, 4, 4, generator=g)
    t = torch.tensor([0, 10, 250, 500, 750, 999])
    ac = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    alpha, sigma = ac.sqrt(), (1 - ac).sqrt()
    xt = process.add_noise(x0, eps, t)
    assert torch.allclose(xt, alpha * x0 + sigma * eps, atol=1e-6)
    expected = {"epsilon": eps, "sample": x0, "v_prediction": alpha * eps - sigma * x0}[prediction_type]
    assert torch.allclose(process.target(x0, eps, t), expected, atol=1e-6)
    # And the scheduler's own inverse: from the target, the sampler recovers x0.
    if prediction_type == "v_prediction":
        assert torch.allclose(alpha * xt - sigma * expected, x0, atol=1e-5)


def test_min_snr_weights_follow_the_paper():
    for pt in ("epsilon", "sample", "v_prediction"):
        sched = DDPMScheduler(prediction_type=pt)
        t = torch.tensor([0, 100, 500, 999])
        ac = sched.alphas_cumprod[t]
        snr = ac / (1 - ac)
        w = NoiseProcess(sched, min_snr_gamma=5.0).loss_weights(t)
        expected = {
            "epsilon": snr.clamp(max=5) / snr,
            "sample": snr.clamp(max=5),
            "v_prediction": snr.clamp(max=5) / (snr + 1),
        }[pt]
        assert torch.allclose(w, expected.float(), rtol=1e-5)
        assert torch.equal(NoiseProcess(sched).loss_weights(t), torch.ones(4))
    # Zero terminal SNR: the ε weight stays finite.
    zsnr = DDPMScheduler(rescale_betas_zero_snr=True, prediction_type="epsilon")
    assert torch.isfinite(NoiseProcess(zsnr, min_snr_gamma=5.0).loss_weights(torch.tensor([999]))).all()


def warmup_decay(
    step: int, max_decay: float, inv_gamma: float, power: float, update_after_step: int = 0
) -> float:
    """The test oracle: the decay EMAModel applies at optimisation step ``step`` (1-based), written out
    independently of diffusers."""
    k = max(0, step - update_after_step - 1)
    if k == 0:
        return 0.0
    return min(max_decay, 1 - (1 + k / inv_gamma) ** -power)


def test_ema_decay_follows_the_warmup_formula():
    model = torch.nn.Linear(3, 3)
    ema = build_ema(model, max_decay=0.9999, inv_gamma=1.0, power=0.75)
    for step in (1, 2, 10, 1000, 10_000, 300_000):
        expected = 0.0 if step == 1 else min(0.9999, 1 - (1 + (step - 1)) ** -0.75)
        assert ema.get_decay(step) == pytest.approx(expected, abs=1e-12)
        assert warmup_decay(step, 0.9999, 1.0, 0.75) == pytest.approx(expected, abs=1e-12)
    assert ema.get_decay(10_001) == pytest.approx(0.999, abs=2e-4)  # the anchors' "0.999 at ~10k"


def fit(make_cfg, tmp_path, *overrides, run="run"):
    cfg = make_cfg(*FAST_DIGITS, *overrides, run_dir=tmp_path / run)
    return train(cfg), cfg


def test_loss_falls_and_ema_differs_on_digits(make_cfg, tmp_path):
    cfg = make_cfg(
        *FAST_DIGITS,
        "trainer.max_steps=150",
        "trainer.log_every_n_steps=10",
        "logger=csv",
        run_dir=tmp_path / "run",
    )
    train(cfg)
    import csv

    with open(tmp_path / "run" / "csv" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["train/loss"]]
    losses = [float(r["train/loss"]) for r in rows]
    assert len(losses) >= 10
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.6 * first, (first, last)
    for q in range(4):  # quartile losses are logged, and late timesteps (noisy inputs) are easier for ε
        assert rows[-1][f"train/loss_q{q}"]
    assert float(rows[-1]["perf/images_per_sec"]) > 0 and float(rows[-1]["train/kimg"]) > 0
    assert rows[-1]["train/ema_decay"] and [int(r["step"]) for r in rows][:3] == [9, 19, 29]
    assert float(rows[-1]["train/loss_q3"]) < float(rows[-1]["train/loss_q0"])
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    live = [v for k, v in ckpt["state_dict"].items() if k.startswith("unet.")]
    ema = ckpt["ema"]["shadow_params"]
    assert ckpt["optimizer_states"][0]["param_groups"][0]["fused"] is True  # the fp32 default
    assert len(live) == len(ema)
    assert max((a - b).abs().max().item() for a, b in zip(live, ema, strict=True)) > 1e-4
    assert ckpt["ema"]["optimization_step"] == 150 == ckpt["global_step"]


def test_checkpoint_round_trip_restores_ema_optimizer_and_step(make_cfg, tmp_path):
    fit(make_cfg, tmp_path, "trainer.max_steps=12")
    path = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt = load_checkpoint(path)
    cfg = make_cfg(*FAST_DIGITS, "trainer.max_steps=12", run_dir=tmp_path / "again")
    model = hydra.utils.instantiate(cfg.model)
    model.on_load_checkpoint(ckpt)
    model.load_state_dict(ckpt["state_dict"])
    for a, b in zip(model.ema.shadow_params, ckpt["ema"]["shadow_params"], strict=True):
        assert torch.equal(a, b)
    assert model.ema.optimization_step == 12
    # Optimizer state (Adam moments, step count) and the LR schedule are in the file, complete.
    opt = ckpt["optimizer_states"][0]
    assert len(opt["state"]) == len(list(model.unet.parameters()))
    assert all(float(s["step"]) == 12 for s in opt["state"].values())
    assert ckpt["lr_schedulers"][0]["last_epoch"] == 12
    assert ckpt["global_step"] == 12
    assert ckpt["difflab"]["config"]["data"]["resolution"] == 8


def test_lr_schedule_spans_the_real_optimizer_steps_under_accumulation(make_cfg, tmp_path):
    # 1,797 digits / 64 = 28 batches an epoch; 2 epochs with accumulation 2 = 28 optimizer steps.
    fit(
        make_cfg,
        tmp_path,
        "trainer.max_steps=-1",
        "trainer.max_epochs=2",
        "trainer.accumulate_grad_batches=2",
        "model.lr_schedule=cosine",
        "model.warmup_steps=4",
    )
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    sched = ckpt["lr_schedulers"][0]
    assert ckpt["global_step"] == 28 and sched["last_epoch"] == 28
    assert sched["_last_lr"][0] == pytest.approx(0.0, abs=1e-9)  # cosine reached its end exactly at the end
    assert ckpt["ema"]["optimization_step"] == 28  # one EMA update per optimizer step, not per micro-batch


@pytest.mark.parametrize("accumulate", [1, 2])
def test_logged_loss_is_the_mean_over_each_logging_window(make_cfg, tmp_path, accumulate):
    import csv

    from difflab.train import instantiate_group

    cfg = make_cfg(
        *FAST_DIGITS,
        "trainer.max_steps=12",
        "trainer.log_every_n_steps=5",
        f"trainer.accumulate_grad_batches={accumulate}",
        "logger=csv",
        "+callbacks.record._target_=tests.helpers.RecordStepLosses",
        run_dir=tmp_path / "run",
    )
    recorder = {}
    import difflab.train as dt

    def keep(group):  # find the recorder among the instantiated callbacks
        out = instantiate_group(group)
        recorder.update({type(c).__name__: c for c in out})
        return out

    dt.instantiate_group, original = keep, dt.instantiate_group
    try:
        returned = train(cfg)  # cfg.optimized_metric = train/loss, what sweepers read
    finally:
        dt.instantiate_group = original
    per_batch = recorder["RecordStepLosses"].losses
    assert len(per_batch) == 12 * accumulate
    with open(tmp_path / "run" / "csv" / "metrics.csv") as f:
        rows = {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}
    # Windows close at steps 4 and 9 (every 5, written to the log) and at the final step 11: that
    # partial window is what the run returns to sweepers.
    assert sorted(rows) == [4, 9]
    rows[11] = returned
    k = accumulate
    for step, lo, hi in ((4, 0, 5), (9, 5, 10), (11, 10, 12)):
        window = per_batch[lo * k : hi * k]  # Lightning hands callbacks the loss divided by k
        assert rows[step] == pytest.approx(k * sum(window) / len(window), rel=1e-5)


@pytest.mark.parametrize(
    ("setting", "precision", "expect_nhwc"),
    [
        ("auto", "32-true", True),
        ("auto", "bf16-mixed", False),
        ("true", "bf16-mixed", True),
        ("false", "32-true", False),
    ],
)
def test_channels_last_follows_setting_and_precision(make_cfg, tmp_path, setting, precision, expect_nhwc):
    import lightning as L

    cfg = make_cfg(*FAST_DIGITS, f"model.channels_last={setting}", run_dir=tmp_path / "run")
    model = hydra.utils.instantiate(cfg.model)
    model.trainer = L.Trainer(accelerator="cpu", devices=1, precision=precision, logger=False)
    model.setup("fit")  # "auto" is decided here: NHWC, except bf16/16-mixed on CPU (measured slower)
    convs = [p for p in model.unet.parameters() if p.dim() == 4]
    fmt = torch.channels_last if expect_nhwc else torch.contiguous_format
    assert convs and all(p.is_contiguous(memory_format=fmt) for p in convs)
    assert any(p.is_contiguous() != expect_nhwc for p in convs)  # not only layout-ambiguous shapes
    assert model.channels_last is expect_nhwc
    assert all(  # the EMA shadows follow the weights' layout
        e.stride() == p.stride()
        for e, p in zip(model.ema.shadow_params, model.unet.parameters(), strict=True)
    )
    # The layout changes speed only: the same weights give the same output in either layout.
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10, 500])
    nchw = hydra.utils.instantiate(cfg.model.unet)
    nchw.load_state_dict(model.unet.state_dict())
    with torch.no_grad():
        assert torch.allclose(model.unet(x, t).sample, nchw(x, t).sample, atol=1e-5)


def test_one_pass_ema_matches_diffusers_update():
    from diffusers.training_utils import EMAModel

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Linear(4, 4))
    net[1].bias.requires_grad_(False)  # frozen parameters are copied, not averaged
    kw = dict(decay=0.999, use_ema_warmup=True, inv_gamma=1.0, power=0.75, foreach=True)
    ours, theirs = build_ema(net, max_decay=0.999), EMAModel(net.parameters(), **kw)
    assert type(ours).__name__ == "LerpEMAModel"
    for _ in range(5):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        ours.step(net.parameters())
        theirs.step(net.parameters())
    assert ours.optimization_step == theirs.optimization_step == 5
    assert ours.cur_decay_value == theirs.cur_decay_value > 0
    for a, b in zip(ours.shadow_params, theirs.shadow_params, strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    assert torch.equal(ours.shadow_params[-1], net[1].bias)


def test_difflab_unet_reads_dtype_like_diffusers_and_saves_as_diffusers(tmp_path):
    import diffusers

    from difflab.diffusion.unet import UNet2DModel
    from tests.test_sampling import tiny_unet

    stock = tiny_unet()  # diffusers' own class
    ours = UNet2DModel.from_config(stock.config).eval()
    ours.load_state_dict(stock.state_dict())
    assert ours.dtype == stock.dtype == torch.float32
    assert ours.to(torch.bfloat16).dtype == stock.to(torch.bfloat16).dtype == torch.bfloat16
    ours.float(), stock.float()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 900])
    with torch.no_grad():
        assert torch.equal(ours(x, t).sample, stock(x, t).sample)
    # Saved weights and config load back as diffusers' own class, unchanged.
    ours.save_pretrained(tmp_path / "unet")
    again = diffusers.UNet2DModel.from_pretrained(tmp_path / "unet")
    assert type(again) is diffusers.UNet2DModel

    def plain(config):
        return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items() if not k.startswith("_")}

    assert plain(again.config) == plain(ours.config)
    assert (tmp_path / "unet" / "config.json").read_text().count('"_class_name": "UNet2DModel"') == 1
    with torch.no_grad():
        assert torch.equal(again(x, t).sample, stock(x, t).sample)


def test_ema_follows_the_live_parameters_the_optimizer_updates(make_cfg, tmp_path):
    # With decay 0 the EMA must equal the final trained weights: the module's cached parameter list
    # is the optimizer's own Parameter objects, not a stale copy.
    fit(make_cfg, tmp_path, "trainer.max_steps=6", "model.ema.max_decay=0.0")
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    live = [v for k, v in ckpt["state_dict"].items() if k.startswith("unet.")]
    first = hydra.utils.instantiate(make_cfg(*FAST_DIGITS, run_dir=tmp_path / "init").model.unet)
    assert any(not torch.equal(a, b) for a, b in zip(live, first.state_dict().values(), strict=True))
    for a, b in zip(live, ckpt["ema"]["shadow_params"], strict=True):
        assert torch.equal(a, b)


def test_sampling_unet_swaps_in_the_ema_in_eval_mode_and_restores_even_on_error(make_cfg):
    import hydra

    model = hydra.utils.instantiate(make_cfg(*FAST_DIGITS).model)
    with torch.no_grad():
        for s in model.ema.shadow_params:
            s.fill_(0.5)
    live = [p.detach().clone() for p in model.unet.parameters()]
    model.unet.train()
    with model.sampling_unet() as unet:
        assert not unet.training and all(bool((p == 0.5).all()) for p in unet.parameters())
    assert model.unet.training
    assert all(torch.equal(a, b) for a, b in zip(live, model.unet.parameters(), strict=True))
    with pytest.raises(RuntimeError, match="sampler broke"), model.sampling_unet():
        raise RuntimeError("sampler broke")
    assert model.unet.training
    assert all(torch.equal(a, b) for a, b in zip(live, model.unet.parameters(), strict=True))
