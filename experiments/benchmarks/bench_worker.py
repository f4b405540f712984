"""One benchmark measurement in a fresh process; prints one JSON line. Driven by run_benchmarks.py.

Modes:
  difflab  -- a real difflab-train run of the default objective (flow; datamodule, Lightning, EMA, logging,
              callbacks at default cadence); --precision auto keeps the hardware's default
  bare     -- a hand-written PyTorch loop with the same UNet, objective, batch, AdamW and EMA update
  sample   -- difflab's sampler vs diffusers DDPMPipeline on the same model
  startup  -- seconds from process start to the first optimizer step of `difflab-train`
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

T0 = time.time()
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from protocol import code_env  # noqa: E402


def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def compose(overrides: list[str], run_dir: Path):
    from difflab.compose import compose_run

    return compose_run(run_dir, overrides)


def real_batches(cfg, device="cpu"):
    """The prepared (decoded, resized) training images as one tensor in [-1, 1]."""
    import hydra

    dm = hydra.utils.instantiate(cfg.data)
    dm.setup()
    prepared = dm.train_set.prepared
    return prepared.float().div(127.5).sub(1) if prepared.dtype == torch.uint8 else prepared * 2 - 1


class StepTimer:
    """Lightning callback: wall time of optimizer steps after a warm-up."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.times, self.cpu, self.start = warmup, [], [], 0.0

    def on_train_start(self, *args) -> None:
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, *args) -> None:
        self.times.append(time.perf_counter())
        self.cpu.append(time.process_time())


def run_difflab(args) -> dict:
    import lightning as L

    from difflab.train import train

    overrides = [
        f"model/unet={args.preset}",  # the default objective (flow), as the bare loop's
        f"data={args.data}",
        f"data.batch_size={args.batch}",
        f"trainer.max_steps={args.warmup + args.steps}",
        "trainer.accelerator=cpu",
        "trainer.devices=1",
        "trainer.enable_model_summary=false",
        # The grid every 500 steps never falls in the timed steps, but the one at the end of training
        # does run: minutes of sampling per figure on a busy 2-core machine, timing nothing.
        "callbacks.sample_grid=null",
    ]
    if args.precision != "auto":  # auto: the hardware's default, as a user's run gets it
        overrides.append(f"trainer.precision={args.precision}")
    if args.resolution:
        overrides += [f"data.resolution={args.resolution}", f"data.channels={args.channels}"]
    cfg = compose(overrides + args.override, Path(args.tmp) / "run")
    if args.synthetic:
        from omegaconf import OmegaConf, open_dict

        with open_dict(cfg):
            cfg.data.source = OmegaConf.create(
                {
                    "_target_": "experiments.benchmarks.bench_worker.synthetic_source",
                    "_partial_": True,
                    "n": args.batch * (args.warmup + args.steps + 2),
                    "size": cfg.data.resolution,
                    "channels": cfg.data.channels,
                }
            )
    timer = StepTimer(args.warmup)

    class Timer(L.Callback):
        def on_train_start(self, *a) -> None:
            timer.on_train_start()

        def on_train_batch_end(self, trainer, *a) -> None:
            timer.on_train_batch_end(trainer)

    import difflab.train as dt

    original = dt.instantiate_group

    def with_timer(group):
        out = original(group)
        return [*out, Timer()] if group is cfg.get("callbacks") else out

    dt.instantiate_group = with_timer
    train(cfg)
    t = timer.times
    dt_s = t[-1] - t[args.warmup - 1]
    cpu_s = timer.cpu[-1] - timer.cpu[args.warmup - 1]
    return {
        "images_per_sec": args.batch * (len(t) - args.warmup) / dt_s,
        "images_per_cpu_sec": args.batch * (len(t) - args.warmup) / cpu_s,
        "precision": str(cfg.trainer.precision),
        "threads": torch.get_num_threads(),
        "max_rss_mb": max_rss_mb(),
        "first_step_s": t[0] - timer.start,  # includes torch.compile's compilation when enabled
    }


def synthetic_source(n: int, size: int, channels: int):
    from difflab.data.sources import InMemorySource

    g = torch.Generator().manual_seed(0)
    return InMemorySource(
        torch.randint(0, 256, (n, channels, size, size), generator=g, dtype=torch.uint8),
        identity=f"synthetic:{n}:{size}:{channels}",
    )


def run_bare(args) -> dict:
    """What a user would write by hand, with difflab's default objective (flow matching: logit-normal
    noise levels, velocity target). naive: NCHW, per-tensor AdamW, EMA and clipping, diffusers' own UNet
    class (fp32 unless --precision says otherwise); matched: difflab's precision (--precision auto: the
    hardware's default), layout, kernels and UNet class (whose CPU bf16 attention runs the math kernel)."""
    import hydra

    from difflab.precision import auto_precision, uses_channels_last

    if args.precision == "auto":
        args.precision = auto_precision("cpu")
    overrides = [f"model/unet={args.preset}", f"data={args.data}"]
    if args.resolution:
        overrides += [f"data.resolution={args.resolution}", f"data.channels={args.channels}"]
    cfg = compose(overrides, Path(args.tmp) / "bare")
    naive = args.variant == "naive"
    if naive:  # what a user writes first: diffusers' own class (difflab's subclass reads dtype cheaply)
        cfg.model.unet._target_ = "diffusers.UNet2DModel"
    torch.manual_seed(0)
    unet = hydra.utils.instantiate(cfg.model.unet).train()
    res, ch = cfg.data.resolution, cfg.data.channels
    data = torch.rand(args.batch * 8, ch, res, res) * 2 - 1 if args.synthetic else real_batches(cfg)
    # matched: the memory format and optimizer kernels difflab's config uses, so the ratio isolates
    # what the framework itself costs.
    channels_last = (not naive) and uses_channels_last(cfg.model.channels_last, args.precision, "cpu")
    if channels_last:
        unet.to(memory_format=torch.channels_last)
    if naive:
        opt = torch.optim.AdamW(unet.parameters(), lr=1e-3, foreach=False)
    elif args.precision == "bf16-mixed":  # as difflab: Lightning cannot clip fused optimizers under AMP
        opt = torch.optim.AdamW(unet.parameters(), lr=1e-3, foreach=True)
    else:
        opt = torch.optim.AdamW(
            unet.parameters(), lr=1e-3, fused=cfg.model.optimizer.fused, foreach=cfg.model.optimizer.foreach
        )
    ema = [p.detach().clone() for p in unet.parameters()]
    use_bf16 = args.precision == "bf16-mixed"  # naive at bf16: the "same loop, same precision"
    times, cpu = [], []
    params = list(unet.parameters())
    for step in range(args.warmup + args.steps):
        idx = torch.randint(0, len(data), (args.batch,))
        x0 = data[idx]
        if channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        noise = torch.randn_like(x0)
        sigma = torch.sigmoid(torch.randn(args.batch)).clamp(1e-5, 1.0)  # logit-normal noise levels
        s = sigma.view(-1, 1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
            pred = unet(xt, sigma * 1000).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise - x0)  # velocity target
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=not naive)
        opt.step()
        decay = min(0.9999, 1 - (1 + step) ** -0.75)
        with torch.no_grad():
            if naive:
                for e, p in zip(ema, params, strict=True):
                    e.sub_((1 - decay) * (e - p))
            else:
                torch._foreach_lerp_(ema, params, 1 - decay)
        times.append(time.perf_counter())
        cpu.append(time.process_time())
    dt_s = times[-1] - times[args.warmup - 1]
    return {
        "images_per_sec": args.batch * args.steps / dt_s,
        "images_per_cpu_sec": args.batch * args.steps / (cpu[-1] - cpu[args.warmup - 1]),
        "max_rss_mb": max_rss_mb(),
        "precision": args.precision,
        "threads": torch.get_num_threads(),
    }


def run_flops(args) -> dict:
    """FLOPs of one training step (forward + backward) per image, by torch's FlopCounterMode."""
    import hydra
    from torch.utils.flop_counter import FlopCounterMode

    cfg = compose(
        [f"model/unet={args.preset}", f"data={args.data}"]
        + (
            [f"data.resolution={args.resolution}", f"data.channels={args.channels}"]
            if args.resolution
            else []
        ),
        Path(args.tmp) / "flops",
    )
    unet = hydra.utils.instantiate(cfg.model.unet)
    x = torch.randn(4, cfg.data.channels, cfg.data.resolution, cfg.data.resolution)
    with FlopCounterMode(display=False) as fc:
        unet(x, torch.randint(0, 1000, (4,))).sample.square().mean().backward()
    return {"train_flops_per_image": fc.get_total_flops() / 4}


def run_matmul(args) -> dict:
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
        for _ in range(3):
            a @ b
        t0, c0 = time.perf_counter(), time.process_time()
        n = 10
        for _ in range(n):
            a @ b
        out[f"matmul_{name}_gflops"] = 2 * 2048**3 * n / (time.perf_counter() - t0) / 1e9
        out[f"matmul_{name}_gflops_cpu"] = 2 * 2048**3 * n / (time.process_time() - c0) / 1e9
    return out


def run_sample(args) -> dict:
    from diffusers import DDPMPipeline

    from difflab.diffusion.sampling import build_sampler, image_generators, sample_images
    from difflab.inference import load_trained_unet

    n, steps = args.batch, args.steps
    if args.variant == "difflab":  # as difflab-sample loads it (channels_last: true)
        unet, sched_cfg, _ = load_trained_unet(args.ckpt, channels_last=True)
        sampler = build_sampler("dpmsolver++", sched_cfg)
        t0 = time.perf_counter()
        for _ in sample_images(unet, sampler, n, 0, steps, n):
            pass
    else:  # what a user runs: diffusers' own UNet class, the pipeline's own loop
        from diffusers import UNet2DModel

        unet, sched_cfg, _ = load_trained_unet(args.ckpt, unet_class=UNet2DModel)
        pipe = DDPMPipeline(unet=unet, scheduler=build_sampler("dpmsolver++", sched_cfg))
        pipe.set_progress_bar_config(disable=True)
        t0 = time.perf_counter()
        pipe(
            batch_size=n, generator=image_generators(0, range(n)), num_inference_steps=steps, output_type="pt"
        )
    return {"images_per_sec": n / (time.perf_counter() - t0)}


def run_fid(args) -> dict:
    import hydra

    from difflab.diffusion.sampling import build_sampler
    from difflab.inference import load_trained_unet
    from difflab.metrics.features import ClassifierFeatures
    from difflab.metrics.fid import FIDEvaluator, real_features

    cfg = compose([f"data={args.data}"], Path(args.tmp) / "fid")
    dm = hydra.utils.instantiate(cfg.data)
    ext = ClassifierFeatures(cache_dir=str(Path(args.tmp) / "fidcache"))
    ext.prepare(dm)
    feats = real_features(dm, ext, 10000, str(Path(args.tmp) / "fidcache"), torch.device("cpu"))
    unet, sched_cfg, _ = load_trained_unet(args.ckpt)
    ev = FIDEvaluator(ext, num_samples=1000)
    ev.set_real_features(feats)
    t0 = time.perf_counter()
    value = ev.evaluate(unet.eval(), build_sampler("dpmsolver++", sched_cfg), 20, seed=1234, batch_size=250)
    return {"fid_seconds": time.perf_counter() - t0, **value}


def run_kernels(args) -> dict:
    """The `small` UNet's kernel choices, CPU time per call at the environment's threads, the rows' calls
    alternated within the process (--steps timed calls each after --warmup): the bf16 training step's
    attention kernel (difflab's UNet class, math kernel, against diffusers' forward with PyTorch's own
    kernel choice) and the fp32 sampling forward's memory format (NHWC against NCHW); each default row
    twice (the second: its A/A noise floor)."""
    import copy

    import diffusers
    import hydra

    cfg = compose([f"data={args.data}"], Path(args.tmp) / "kernels")
    unet = hydra.utils.instantiate(cfg.model.unet)
    c, size = cfg.data.channels, cfg.data.resolution
    x, t = torch.randn(args.batch, c, size, size), torch.rand(args.batch) * 1000
    xs, ts = torch.randn(64, c, size, size), torch.full((64,), 500.0)

    def train_call(forward) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = forward(unet, x, t).sample
        out.float().square().mean().backward()

    nhwc = copy.deepcopy(unet).to(memory_format=torch.channels_last).eval()  # same weights, NHWC

    def sample_call(fmt: torch.memory_format) -> None:
        with torch.no_grad():
            (nhwc if fmt == torch.channels_last else unet)(xs.contiguous(memory_format=fmt), ts)

    phases = [
        (
            unet.train,
            {
                "attention_math": lambda: train_call(type(unet).forward),
                "attention_default": lambda: train_call(diffusers.UNet2DModel.forward),
                "attention_math_again": lambda: train_call(type(unet).forward),
            },
        ),
        (
            unet.eval,
            {
                "sample_nhwc": lambda: sample_call(torch.channels_last),
                "sample_nchw": lambda: sample_call(torch.contiguous_format),
                "sample_nhwc_again": lambda: sample_call(torch.channels_last),
            },
        ),
    ]
    out = {"threads": torch.get_num_threads()}
    for mode, rows in phases:
        mode()
        times = dict.fromkeys(rows, 0.0)
        for k in range(args.warmup + args.steps):
            for name, call in rows.items():
                c0 = time.process_time()
                call()
                if k >= args.warmup:
                    times[name] += time.process_time() - c0
        out.update({f"{name}_cpu_ms": 1000 * v / args.steps for name, v in times.items()})
    return out


def run_startup(args) -> dict:
    import subprocess

    exe = Path(sys.executable).parent / "difflab-train"
    t0 = time.time()
    p = subprocess.run(
        [
            str(exe),
            "trainer.max_steps=1",
            "callbacks.sample_grid=null",
            "logger=none",
            "callbacks.progress_bar=null",
            f"hydra.run.dir={Path(args.tmp) / 'startup'}",
            "+callbacks.first_step._target_=experiments.benchmarks.bench_worker.FirstStepClock",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=code_env(),
    )
    import re

    stamp = re.search(r"FIRST_STEP_AT=([0-9.]+)", p.stdout)
    if not stamp:
        raise RuntimeError(p.stderr[-2000:])
    return {"startup_seconds": float(stamp.group(1)) - t0}


class FirstStepClock:
    """Prints the wall-clock time of the first completed optimizer step."""

    def __new__(cls):
        import lightning as L

        class _Clock(L.Callback):
            def on_train_batch_end(self, trainer, *a) -> None:
                if trainer.global_step == 1:
                    print(f"FIRST_STEP_AT={time.time()}", flush=True)

        return _Clock()


class StepClock:
    """Prints, when training ends, the wall-clock and process CPU time after every optimizer step and the
    thread count (on a machine shared with other work, CPU time is the figure the others disturb least):
    added to a real `difflab-train` run as ``+callbacks.step_clock._target_=...StepClock`` (a fresh process
    of the job itself, nothing composed by hand)."""

    def __new__(cls):
        import lightning as L

        class _Clock(L.Callback):
            def __init__(self) -> None:
                self.times: list[float] = []
                self.cpu: list[float] = []

            def on_train_batch_end(self, trainer, *a) -> None:
                self.times.append(time.perf_counter())
                self.cpu.append(time.process_time())

            def on_train_end(self, trainer, *a) -> None:
                clock = {"times": self.times, "cpu": self.cpu, "threads": torch.get_num_threads()}
                print("STEP_CLOCK=" + json.dumps(clock), flush=True)

        return _Clock()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode")
    ap.add_argument("--variant", default="naive")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--data", default="fashion_mnist")
    ap.add_argument("--resolution", type=int, default=0)
    ap.add_argument("--channels", type=int, default=1)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--precision", default="32-true")
    ap.add_argument("--synthetic", action="store_true")
    ap.add_argument("--ckpt", default="")
    ap.add_argument("--tmp", required=True)
    ap.add_argument("--override", action="append", default=[], help="extra difflab-train override")
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    fn = {
        "difflab": run_difflab,
        "bare": run_bare,
        "flops": run_flops,
        "matmul": run_matmul,
        "sample": run_sample,
        "fid": run_fid,
        "startup": run_startup,
        "kernels": run_kernels,
    }[args.mode]
    print("RESULT " + json.dumps(fn(args)), flush=True)


if __name__ == "__main__":
    main()
