"""The benchmark reports, generated from small fixtures of raw JSON lines (no training, no sampling):
time_to_quality.py's crossing (paired by seed within one training session, "not shown" when the
interval straddles 1/3) and posthoc_ema.py's length chosen on one held-out half and scored on the other."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import pytest

from tests.helpers import BENCH_MACHINE

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments" / "benchmarks"))

import posthoc_ema
import protocol
import time_to_quality as ttq

MACHINE = BENCH_MACHINE
SESSION = "work:/bench/ttq"


def record(bench: str, **fields: object) -> dict:
    return {
        "bench": bench,
        "invocation": "eval-1",
        "time": "2026-12-07T01:00:00",
        "command": "python x.py",
        "machine": MACHINE,
        "training": SESSION,
        **fields,
    }


def point(row: str, seed: int, step: int, fid: float, seconds: float, steps: int = 20, **kw: object) -> dict:
    return record(
        "time_to_quality",
        kind="point",
        row=row,
        seed=seed,
        step=step,
        budget=1000,
        seconds=seconds,
        fid=fid,
        kid=fid / 1000,
        kid_std=0.001,
        sampler="dpmsolver++",
        sampler_steps=steps,
        eval_seed=kw.pop("eval_seed", 1234),
        num_samples=1000,
        num_real=10000,
        extractor="classifier:x",
        **kw,
    )


def run(row: str, seed: int, seconds_per_100: float) -> dict:
    ckpts = {str(s): s / 100 * seconds_per_100 for s in range(100, 1001, 100)}
    t0 = 1000.0 * seed + {"ddpm": 0, "default_bf16": 1}.get(row, 2)
    return record(
        "time_to_quality", kind="run", row=row, seed=seed, budget=1000, checkpoint_seconds=ckpts, t0=t0
    )


def ttq_fixture() -> list[dict]:
    """Targets 10/11/12 at 300 s; default_bf16 crosses at 60/120/80 s (0.2, 0.4, 0.27 of the target's time:
    straddles 1/3) and at steps 200/300/200 (0.2, 0.3, 0.2: all below 1/3)."""
    recs = []
    crossing = {0: (200, 30.0), 1: (300, 40.0), 2: (200, 40.0)}  # step of the crossing, seconds per 100 steps
    for seed in range(3):
        target = 10.0 + seed
        recs += [run("ddpm", seed, 30.0), run("default_bf16", seed, crossing[seed][1])]
        recs += [point("ddpm", seed, 1000, target, 300.0), point("ddpm", seed, 1000, target + 5, 300.0, 10)]
        step_x, per100 = crossing[seed]
        for step in range(100, step_x + 1, 100):  # evaluated in order up to the crossing
            fid = target - 0.5 if step == step_x else target + 20
            recs.append(point("default_bf16", seed, step, fid, step / 100 * per100))
        recs += [
            point("default_bf16", seed, 1000, target - 3, 10 * per100),
            point("default_bf16", seed, 1000, target - 1, 10 * per100, 10),
            point("default_fp32", seed, 1000, target - 3.5, 400.0),
            point("baseline", seed, 1000, target + 30, 300.0),
        ]
    recs += [point("default_bf16", 0, 1000, f, 300.0, eval_seed=k) for k, f in ((1, 7.1), (2, 6.9))]
    return recs


def test_ttq_report_straddling_wall_interval_is_not_shown():
    text, curves = ttq.build_report(ttq_fixture())
    row = next(line for line in text.splitlines() if line.startswith("| default_bf16 | seed 0"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "seed 0: 200 (1.0); seed 1: 300 (2.0); seed 2: 200 (1.3)"
    assert cells[2].startswith("0.267 [0.200, 0.400] (n=3, min-max)")
    assert cells[3] == "not shown"  # the median is below 1/3, the interval is not
    assert cells[4].startswith("0.200 [0.200, 0.300]") and cells[5] == "shown"
    assert "| ddpm | 3 | 11.0 [10.0, 12.0] (n=3, min-max)" in text
    assert (
        "Noise floor: default_bf16 seed 0's checkpoint at step 1000 sampled with image seeds [1, 2, 1234]"
        in text
    )
    assert "bf16-mixed FID 8.00 [7.00, 9.00]" in text and "32-true FID 7.50 [6.50, 8.50]" in text
    assert "Test CPU (2 cores; no AMX, AVX512-BF16)" in text
    assert (
        "trained in 1 session(s), each in this launch order: `work:/bench/ttq`: ddpm 0, default_bf16 0, "
        "ddpm 1, default_bf16 1, ddpm 2, default_bf16 2." in text
    )
    assert (
        "| default_bf16 | `work:/bench/ttq` | 0, 1, 2 | 6.67 [5.00, 6.67] (n=3, min-max) "
        "| 40.0 [30.0, 40.0] (n=3, min-max) |" in text
    )
    assert [p[1] for p in curves["default_bf16"][1]] == [100, 200, 300, 1000]


def test_ttq_report_unreached_target_is_never_shown():
    recs = [
        r
        for r in ttq_fixture()
        if not (r["row"] == "default_bf16" and r["seed"] == 1 and r.get("step") == 300)
    ]
    recs = [r for r in recs if not (r["row"] == "default_bf16" and r["seed"] == 1 and r.get("step") == 1000)]
    recs.append(point("default_bf16", 1, 1000, 30.0, 400.0))  # seed 1 never reaches its 11.0
    text, _ = ttq.build_report(recs)
    row = next(line for line in text.splitlines() if line.startswith("| default_bf16 | seed 0"))
    assert "seed 1: not reached" in row and "not reached]" in row and "| not shown |" in row


def test_ttq_report_a_crossing_still_being_evaluated_is_pending_not_unreached():
    recs = [
        r
        for r in ttq_fixture()
        if not (r["row"] == "default_bf16" and r["seed"] == 1 and r.get("step", 0) >= 300)
    ]
    text, _ = ttq.build_report(recs)
    row = next(line for line in text.splitlines() if line.startswith("| default_bf16 | seed 0"))
    assert "seed 1: pending (evaluated to step 200)" in row and "(n=2, min-max)" in row


def test_ttq_report_fewer_than_three_seeds_settle_nothing():
    text, _ = ttq.build_report([r for r in ttq_fixture() if r["seed"] == 0])
    row = next(line for line in text.splitlines() if line.startswith("| default_bf16 | seed 0"))
    assert row.count("not shown (n=1 < 3 seeds)") == 2  # 0.2 < 1/3 on its one seed, yet not shown


def test_ttq_report_uses_the_newest_campaign_only():
    old = [
        {**r, "training": "work:/old", "time": "2026-12-01T00:00:00", "fid": 1.0, "train_commit": "old"}
        for r in ttq_fixture()
    ]
    text, _ = ttq.build_report(old + ttq_fixture())
    assert "| ddpm | 3 | 11.0 [10.0, 12.0]" in text and "work:/old" not in text


def test_ttq_report_pools_quality_over_sessions_but_never_their_wall_times():
    """The fp32 runs of seeds 1-2 trained in a later session of the same code: their FIDs join the
    end-of-budget table and the precision pairs; their minutes are neither pooled with seed 0's nor set
    against the bf16 runs of the other session."""
    recs = []
    for r in ttq_fixture():
        if r["row"] == "default_fp32" and r["seed"] > 0:
            r = {**r, "training": "later", "time": "2026-12-07T03:00:00", "seconds": 900.0}
        recs.append(r)
    recs += [
        {**run("default_fp32", 0, 40.0)},
        {**run("default_fp32", 1, 90.0), "training": "later"},
        {**run("default_fp32", 2, 90.0), "training": "later"},
    ]
    text, _ = ttq.build_report(recs)
    assert "trained in 2 session(s)" in text and "`later`: default_fp32 1, default_fp32 2" in text
    assert "| default_fp32 | 3 | 7.50 [6.50, 8.50]" in text  # quality: all three seeds
    assert "32-true FID 7.50 [6.50, 8.50]" in text
    assert "Minutes to the end (seeds 0, each pair trained in one session)" in text
    assert "| default_fp32 | `work:/bench/ttq` | 0 | 6.67 [6.67, 6.67]" in text
    assert "| default_fp32 | `later` | 1, 2 | 15.0 [15.0, 15.0]" in text


def test_ttq_report_refuses_a_skipped_checkpoint_before_the_crossing():
    recs = [
        r
        for r in ttq_fixture()
        if not (r["row"] == "default_bf16" and r["seed"] == 1 and r.get("step") == 200)
    ]
    with pytest.raises(ValueError, match="were not evaluated"):
        ttq.build_report(recs)


def test_ttq_report_refuses_mixed_extractors():
    recs = ttq_fixture()
    recs[5] = {**recs[5], "extractor": "classifier:other"}
    with pytest.raises(ValueError, match="different FID extractors"):
        ttq.build_report(recs)


def test_ttq_report_writes_its_block_and_plot_only(tmp_path, monkeypatch):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "time_to_quality.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ttq_fixture()))
    page = tmp_path / "RESULTS.md"
    page.write_text(
        "prose\n\n<!-- generated: time_to_quality -->\nold\n<!-- end generated: time_to_quality -->\n"
    )
    (tmp_path / "notes.md").write_text("keep")
    monkeypatch.setattr(ttq, "write_section", functools.partial(protocol.write_section, path=page))
    monkeypatch.setattr(ttq, "plot", lambda curves, path, target: Path(path).write_bytes(b"png"))  # 3 s less
    before = {p for p in tmp_path.rglob("*")}
    ttq.report(type("Opts", (), {"target": "ddpm", "raw": raw, "plot": str(tmp_path / "fid_vs_time.png")})())
    assert {p for p in tmp_path.rglob("*")} == before | {tmp_path / "fid_vs_time.png"}
    text = page.read_text()
    assert text.startswith("prose\n\n<!-- generated: time_to_quality -->") and "old" not in text
    assert (tmp_path / "notes.md").read_text() == "keep"


# ----------------------------------------------------------------------------------------------- post-hoc EMA


def ph_fixture() -> list[dict]:
    """Half A prefers 0.05 on seeds 0 and 1 and 0.2 on seed 2; B prefers 0.15 everywhere."""
    recs = []
    fids = {
        "A": {"training": 10.0, "0.05": 9.0, "0.15": 9.5, "0.2": 9.2},
        "B": {"training": 10.4, "0.05": 9.8, "0.15": 9.1, "0.2": 9.6},
    }
    for seed in range(3):
        for half, by_ema in fids.items():
            for ema, fid in by_ema.items():
                if seed == 2 and half == "A" and ema == "0.2":
                    fid = 8.0
                recs.append(
                    record(
                        "posthoc_ema",
                        kind="point",
                        row="posthoc_bf16",
                        seed=seed,
                        ema=ema,
                        ema_std=0.1 if ema == "training" else float(ema),
                        half=half,
                        fid=fid + seed,
                        kid=0.01,
                        kid_std=0.001,
                        step=1000,
                        sampler="dpmsolver++",
                        sampler_steps=20,
                        eval_seed=1234,
                        num_samples=1000,
                        num_real=5000,
                        extractor="classifier:x",
                    )
                )
    return recs


def test_posthoc_report_chooses_on_one_half_and_scores_on_the_other():
    text, curves = posthoc_ema.build_report(ph_fixture())
    line = next(x for x in text.splitlines() if x.startswith("| chosen on A, scored on B"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[1] == "seed 0: 0.05, seed 1: 0.05, seed 2: 0.2"
    # Seeds 0, 1: 0.05 on B = 9.8 (+seed); seed 2: 0.2 on B = 9.6 + 2. Training EMA on B: 10.4 + seed.
    assert cells[2] == "10.8 [9.80, 11.6] (n=3, min-max)"
    assert cells[3] == "11.4 [10.4, 12.4] (n=3, min-max)"
    assert cells[4].startswith("-0.600 [-0.800, -0.600]") and cells[5] == "shown"
    line = next(x for x in text.splitlines() if x.startswith("| chosen on B, scored on A"))
    assert "seed 0: 0.15, seed 1: 0.15, seed 2: 0.15" in line
    assert "| training-time EMA (0.1) |" in text
    assert sorted(curves) == [0, 1, 2]


def test_posthoc_report_with_an_incomplete_seed_says_so():
    recs = [r for r in ph_fixture() if r["seed"] == 0 and r["ema"] != "0.2"] + [
        r for r in ph_fixture() if r["seed"] == 0 and r["ema"] == "0.2" and r["half"] == "A"
    ]
    text, curves = posthoc_ema.build_report(recs)
    assert "No seed has every EMA length on both halves yet." in text and curves == {}
    assert posthoc_ema.build_report([])[0] == "Not measured yet under the protocol."
