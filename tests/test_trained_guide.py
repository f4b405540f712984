"""A guide trained alongside the model (model/guide=tiny, diffusion/trained_guide.py): it leaves the
model's training bit for bit as it was, trains for its duration and then stays frozen, resumes exactly
after kill -9 (across its stop and an epoch end), trains under DDP, and guides difflab-sample, -eval,
-export (a MeanFlow model's too) and the FID callback as guide=alongside."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from difflab.checkpoints import load_checkpoint
from difflab.evaluate import COMMAND as EVAL
from difflab.export import COMMAND as EXPORT
from difflab.sample import COMMAND as SAMPLE
from tests.conftest import DIGITS_70, FAST_DIGITS
from tests.helpers import difflab_cli, refused_line
from tests.test_preemption import assert_identical_end, kill_chain_then_rerun, uninterrupted

# 40 steps (digits: 28 an epoch), checkpoints at 20 and 40; the guide trains for steps 0-19.
RUN_40 = (
    *FAST_DIGITS,
    "trainer.max_steps=40",
    "model.warmup_steps=5",
    "callbacks.model_checkpoint.every_n_train_steps=20",
    "callbacks.model_checkpoint.save_top_k=-1",
)
GUIDE = ("model/guide=tiny", "model.guide.duration=0.5")


def part(ckpt: dict, prefix: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}


def test_the_guide_leaves_the_model_bit_identical_and_stops_after_its_duration(trained_runs):
    plain = trained_runs(*RUN_40) / "checkpoints"
    guided = trained_runs(*RUN_40, *GUIDE) / "checkpoints"
    a, b = load_checkpoint(plain / "last.ckpt"), load_checkpoint(guided / "last.ckpt")
    # The model: live weights, EMA and its optimizer moments exactly as without a guide (gradient
    # clipping at 1.0, the default, clips each network's gradients on its own).
    assert part(a, "unet.").keys() == part(b, "unet.").keys()
    assert all(torch.equal(v, part(b, "unet.")[k]) for k, v in part(a, "unet.").items())
    assert all(
        torch.equal(x, y) for x, y in zip(a["ema"]["shadow_params"], b["ema"]["shadow_params"], strict=True)
    )
    main_a, main_b = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert all(torch.equal(main_a[i]["exp_avg"], main_b[i]["exp_avg"]) for i in main_a)
    # The guide: its own param group, EMA and config; trained for 20 steps, then frozen at lr 0.
    assert len(b["optimizer_states"][0]["param_groups"]) == 2
    assert b["difflab"]["guide_unet_config"]["block_out_channels"] == [16, 32]
    assert b["guide_ema"]["optimization_step"] == 20
    mid = load_checkpoint(guided / "step_0000020.ckpt")
    assert mid["lr_schedulers"][0]["_last_lr"][0] > 0 and mid["lr_schedulers"][0]["_last_lr"][1] == 0
    assert all(torch.equal(v, part(b, "guide.")[k]) for k, v in part(mid, "guide.").items())
    first = load_checkpoint(guided / "step_0000020.ckpt")
    shadows = first["guide_ema"]["shadow_params"]
    assert any(not torch.equal(s, p) for s, p in zip(shadows, part(first, "guide.").values(), strict=True))


def test_a_guided_run_resumes_bit_exactly_after_kill_9(tmp_path):
    """Killed inside its first epoch and again after the guide stopped (step 35) and the epoch ended
    (28): weights, both EMAs, optimizer, LR schedule and loop state equal an uninterrupted run's."""
    args = (*DIGITS_70, "model/guide=tiny", "model.guide.duration=0.5")
    reference = uninterrupted(tmp_path / "straight", args)
    final = kill_chain_then_rerun(tmp_path / "killed", args, [(24, "step"), (45, "step")])
    assert_identical_end(reference, final)
    for x, y in zip(
        reference["guide_ema"]["shadow_params"], final["guide_ema"]["shadow_params"], strict=True
    ):
        assert torch.equal(x, y)
    assert final["guide_ema"]["optimization_step"] == 35


def test_two_ddp_ranks_train_a_guide_past_its_stop(tmp_path):
    """trainer=ddp_cpu (gloo): after its duration the guide gets zero gradients, so DDP's reducer still
    sees every parameter, and its weights stay as they were at the stop."""
    run = tmp_path / "run"
    p = difflab_cli(
        "train", "experiment=digits", "model/guide=tiny", "model.guide.duration=0.5", "trainer=ddp_cpu",
        "trainer.max_steps=8", "data.batch_size=16", "callbacks.model_checkpoint.every_n_train_steps=4",
        "callbacks.model_checkpoint.save_top_k=-1", "callbacks.sample_grid=null",
        "callbacks.progress_bar=null", "logger=none", f"hydra.run.dir={run}", cwd=tmp_path,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    mid, last = (load_checkpoint(run / "checkpoints" / f"step_000000{s}.ckpt") for s in (4, 8))
    assert last["guide_ema"]["optimization_step"] == 4
    assert all(torch.equal(v, part(last, "guide.")[k]) for k, v in part(mid, "guide.").items())
    assert any(not torch.equal(v, part(last, "unet.")[k]) for k, v in part(mid, "unet.").items())


def pixels(paths) -> list[np.ndarray]:
    return [np.asarray(Image.open(p)).astype(int) for p in paths]


def test_guide_alongside_in_sample_eval_and_export(trained_runs, tmp_path):
    ckpt = trained_runs(*RUN_40, *GUIDE) / "checkpoints" / "last.ckpt"
    common = [f"ckpt={ckpt}", "num_images=4", "steps=6", "seed=7", "grid=false"]
    plain = pixels(SAMPLE.call([*common, f"out={tmp_path / 'plain'}"]))
    off = pixels(SAMPLE.call([*common, "guide=alongside", "guidance=1.0", f"out={tmp_path / 'off'}"]))
    on = pixels(SAMPLE.call([*common, "guide=alongside", "guidance=2.0", f"out={tmp_path / 'on'}"]))
    assert all(np.array_equal(a, b) for a, b in zip(plain, off, strict=True))
    assert any(not np.array_equal(a, b) for a, b in zip(plain, on, strict=True))
    # The export carries the guide's EMA weights and draws difflab-sample's images.
    from diffusers import DiffusionPipeline

    from difflab.diffusion.sampling import build_sampler, image_generators

    out = EXPORT.call([f"ckpt={ckpt}", f"out={tmp_path / 'pipe'}", "guide=alongside", "guidance=2.0"])
    pipe = DiffusionPipeline.from_pretrained(out, custom_pipeline=str(out), trust_remote_code=True)
    assert pipe.guide.config.block_out_channels == [16, 32]
    pipe.scheduler = build_sampler("dpmsolver++", pipe.scheduler.config)
    ref = pipe(batch_size=4, generator=image_generators(7, range(4)), num_inference_steps=6, output_type="np")
    for i, img in enumerate(on):
        assert np.abs(img[..., 0] - np.round(ref.images[i, ..., 0] * 255)).max() <= 1
    # difflab-eval sweeps it beside the run's own earlier checkpoint.
    eval_dir = tmp_path / "eval"
    EVAL.call(
        [f"ckpt={ckpt}", "guide=[alongside,step:20]", "guidance=[1.0,2.0]", "num_samples=40", "num_real=200",
         "steps=4", f"out={eval_dir}", "ema_std=null"]
    )  # fmt: skip
    rows = json.loads((eval_dir / "results.json").read_text())
    assert [(r["guide"], r["guidance"]) for r in rows] == [(None, 1.0), ("alongside", 2.0), ("step:20", 2.0)]


def test_a_meanflow_guide_trains_alongside_and_exports_guided(trained_runs, tmp_path):
    """A MeanFlow model's guide takes the second time too (class_embed_type follows the model's) and
    the guided MeanFlow export draws difflab-sample's guided images."""
    from diffusers import DiffusionPipeline

    from difflab.diffusion.sampling import image_generators

    run = trained_runs(*FAST_DIGITS, "model=meanflow", "trainer.max_steps=20", "model/guide=tiny")
    ckpt = run / "checkpoints" / "last.ckpt"
    assert load_checkpoint(ckpt)["difflab"]["guide_unet_config"]["class_embed_type"] == "timestep"
    out = EXPORT.call([f"ckpt={ckpt}", f"out={tmp_path / 'pipe'}", "guide=alongside", "guidance=2.0"])
    pipe = DiffusionPipeline.from_pretrained(out, custom_pipeline=str(out), trust_remote_code=True)
    assert (type(pipe).__name__, pipe.config.guidance) == ("DifflabPipeline", 2.0)
    common = ["sampler=meanflow", "steps=2", "num_images=3", "seed=7", "grid=false", f"ckpt={ckpt}"]
    guided = pixels(SAMPLE.call([*common, "guide=alongside", "guidance=2.0", f"out={tmp_path / 'g'}"]))
    plain = pixels(SAMPLE.call([*common, f"out={tmp_path / 'p'}"]))
    for w, ours in ((2.0, guided), (1.0, plain)):
        ref = pipe(
            batch_size=3, generator=image_generators(7, range(3)), num_inference_steps=2, guidance=w,
            output_type="np",
        )  # fmt: skip
        for i, img in enumerate(ours):
            assert np.abs(img[..., 0] - np.round(ref.images[i, ..., 0] * 255)).max() <= 1
    assert any(not np.array_equal(a, b) for a, b in zip(plain, guided, strict=True))


def test_fid_callback_guided_by_the_guide_alongside(tmp_path):
    from difflab.train import train
    from tests.conftest import compose_config
    from tests.test_guidance import cheap_fid

    fid = cheap_fid(tmp_path / "cache")
    runs = {}
    for name, extra in [
        ("plain", []),
        ("guided", ["callbacks.fid.guide=alongside", "callbacks.fid.guidance=2.0"]),
    ]:
        train(compose_config(tmp_path / name, [*FAST_DIGITS, "trainer.max_steps=20", *GUIDE, *fid, *extra]))
        runs[name] = [json.loads(x) for x in (tmp_path / name / "fid.jsonl").read_text().splitlines()]
    assert [(r["step"], r["guide"], r["guidance"]) for r in runs["guided"]] == [
        (10, "alongside", 2.0),
        (20, "alongside", 2.0),
    ]
    key = "val/fid_classifier_20"
    assert all(a[key] != b[key] for a, b in zip(runs["plain"], runs["guided"], strict=True))


BAD = [
    (["model/guide=tiny", "model.guide.batch_fraction=0"], "model.guide.batch_fraction=0 must be above 0"),
    (["model/guide=tiny", "model.guide.duration=1.5"], "model.guide.duration=1.5 must be between 0 and 1"),
    (
        ["callbacks=with_fid", "callbacks.fid.guide=alongside"],
        "callbacks.fid.guide=alongside: this run trains no guide",
    ),
]


@pytest.mark.parametrize(("args", "line"), BAD, ids=[a[-1] for a, _ in BAD])
def test_bad_guide_settings_are_one_line(args, line, tmp_path):
    p = difflab_cli(
        "train", *FAST_DIGITS, "trainer.max_steps=2", *args, f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path
    )
    errors = [x for x in p.stderr.splitlines() if x.startswith("difflab: error:")]
    assert p.returncode == 2 and len(errors) == 1 and line in errors[0], p.stderr[-2000:]
    assert "Traceback" not in p.stderr


def test_resuming_with_a_guide_added_or_dropped_is_one_line(trained_runs, tmp_path):
    import shutil

    for i, (trained, rerun) in enumerate(((RUN_40, (*RUN_40, *GUIDE)), ((*RUN_40, *GUIDE), RUN_40))):
        run = tmp_path / f"run{i}"
        shutil.copytree(trained_runs(*trained), run)
        p = difflab_cli("train", *rerun, "trainer.max_steps=60", f"hydra.run.dir={run}", cwd=tmp_path)
        errors = [x for x in p.stderr.splitlines() if x.startswith("difflab: error:")]
        assert p.returncode == 2 and len(errors) == 1 and "model.guide" in errors[0], p.stderr[-2000:]


def test_a_checkpoint_from_before_model_guide_is_refused_by_a_guided_run(trained_runs, make_cfg):
    """A run recorded before model.guide existed takes the new key at its value (rundir.changed_settings):
    the checkpoint itself then says it holds no guide."""
    import hydra

    from difflab.errors import DifflabError

    module = hydra.utils.instantiate(make_cfg(*RUN_40, *GUIDE).model)
    ckpt = load_checkpoint(trained_runs(*RUN_40) / "checkpoints" / "last.ckpt")
    with pytest.raises(DifflabError, match="did not train a guide alongside"):
        module.on_load_checkpoint(ckpt)


def test_guide_alongside_of_a_run_without_one_is_one_line(trained_runs, tmp_path, monkeypatch, capsys):
    ckpt = trained_runs(*RUN_40) / "checkpoints" / "last.ckpt"
    args = ["ckpt={ckpt}", "guide=alongside", "guidance=2", "out={dir}/out"]
    got = refused_line(SAMPLE, args, tmp_path, monkeypatch, capsys, {"ckpt": ckpt})
    assert f"guide=alongside: {ckpt} holds no guide trained alongside" in got, got
