"""precision_bench.py's, run_benchmarks.py's, speed_levers.py's, meanflow_cost.py's and guide_cost.py's
reports, generated from small fixtures of raw JSON lines (nothing trained): ratios paired within each
alternation, the A/A noise floor, the verdict, and each writes only its own block of the page."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

from tests.helpers import BENCH_MACHINE

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments" / "benchmarks"))

import precision_bench
import protocol
import run_benchmarks

MACHINE = BENCH_MACHINE


def record(bench: str, invocation: str = "inv-1", **fields: object) -> dict:
    return {
        "bench": bench,
        "invocation": invocation,
        "time": "2026-12-07T01:00:00" if invocation == "inv-1" else "2026-12-06T01:00:00",
        "command": "python x.py",
        "machine": MACHINE,
        **fields,
    }


def page_with_prose(tmp_path: Path, monkeypatch, module) -> Path:
    page = tmp_path / "RESULTS.md"
    page.write_text("# hand-written prose\n\nkept as it is.\n")
    monkeypatch.setattr(module, "write_section", functools.partial(protocol.write_section, path=page))
    return page


def train_row(row: str, k: int, speed: float, cpu_speed: float) -> dict:
    return record(
        "precision",
        row=row,
        repeat=k,
        steps_per_sec=speed,
        steps_per_cpu_sec=cpu_speed,
        threads=1,
        steps=60,
        warmup=10,
    )


def test_precision_report_pairs_each_alternation_and_states_the_verdict(tmp_path, monkeypatch):
    recs = []
    for k in range(5):
        fp32 = 1.0 + 0.01 * k  # a drifting machine: the pairs, not the absolute figures, carry the ratio
        recs += [
            train_row("bf16-mixed", k, 2 * fp32, 3.0),
            train_row("32-true", k, fp32, 1.0),
            train_row("32-true again", k, fp32, 1.0),
            record(
                "precision",
                row="matmul",
                repeat=k,
                matmul_ratio=2.0,
                matmul_ratio_cpu=2.0,
                matmul_bf16_gflops_cpu=60.0,
                matmul_fp32_gflops_cpu=30.0,
            ),
        ]
    recs.append(train_row("bf16-mixed", 5, 9.0, 9.0))  # a killed alternation: no pair, left out
    # An older invocation's figures are never mixed in.
    recs.append(record("precision", "inv-0", row="bf16-mixed", repeat=0, steps_per_sec=0.1))
    monkeypatch.setattr(precision_bench, "load", lambda bench: recs)
    page = page_with_prose(tmp_path, monkeypatch, precision_bench)
    precision_bench.report()
    text = page.read_text()
    assert text.startswith("# hand-written prose\n\nkept as it is.\n")
    assert "<!-- generated: precision -->" in text and "each of 5 alternations" in text
    assert (
        "| step speed per CPU second, bf16-mixed ÷ 32-true | 3.00 [3.00, 3.00] (n=5, bootstrap 95%) | shown |"
        in text
    )
    assert (
        "| step speed by the wall clock, bf16-mixed ÷ 32-true | 2.00 [2.00, 2.00] (n=5, bootstrap 95%) "
        "| shown |" in text
    )
    assert (
        "| noise floor (wall clock): 32-true again ÷ 32-true | 1.00 [1.00, 1.00] (n=5, bootstrap 95%) |"
        in text
    )
    assert "Test CPU (2 cores; no AMX, AVX512-BF16)" in text

    # Four alternations settle no speed claim, however clear the ratio.
    monkeypatch.setattr(precision_bench, "load", lambda bench: [r for r in recs if r.get("repeat") != 4])
    precision_bench.report()
    text = page.read_text()
    assert "| 3.00 [3.00, 3.00] (n=4, min-max) | not shown (n=4 < 5 alternations) |" in text
    assert "| 2.00 [2.00, 2.00] (n=4, min-max) | not shown (n=4 < 5 alternations) |" in text


def test_framework_cost_report_writes_its_block_only(tmp_path, monkeypatch):
    recs = []
    for k in range(5):
        for row, ips in (("difflab", 99.0), ("matched", 100.0), ("naive", 50.0), ("difflab again", 99.0)):
            recs.append(
                record(
                    "framework_cost",
                    row=row,
                    repeat=k,
                    preset="small",
                    data="fashion_mnist",
                    batch=32,
                    steps=40,
                    warmup=5,
                    images_per_sec=ips,
                    images_per_cpu_sec=ips,
                    precision="bf16-mixed",
                    threads=1,
                )
            )
    monkeypatch.setattr(run_benchmarks, "load", lambda bench: recs)
    page = page_with_prose(tmp_path, monkeypatch, run_benchmarks)
    run_benchmarks.report()
    text = page.read_text()
    assert text.startswith("# hand-written prose\n\nkept as it is.\n")
    assert "<!-- generated: framework_cost -->" in text and "generated: precision" not in text
    row = next(line for line in text.splitlines() if line.startswith("| small | fashion_mnist"))
    assert "| bf16-mixed | CPU time | 99.0 [99.0, 99.0]" in row
    assert "| 0.990 [0.990, 0.990]" in row and "| 1.98 [1.98, 1.98]" in row


def lever_rows(k: int, nhwc_bf16: float, kernel_default_ms: float, invocation: str = "inv-1") -> list[dict]:
    """One alternation of speed_levers.py: steps per CPU second of each training row, ms per kernel row."""
    speeds = {
        "bf16 auto": 4.0,
        "bf16 NHWC": nhwc_bf16,
        "fp32 auto": 2.6,
        "fp32 NCHW": 2.5,
        "bf16 auto again": 4.0,
    }
    recs = [
        record(
            "speed_levers", invocation, row=row, repeat=k, steps_per_cpu_sec=v, threads=1, steps=30, warmup=5
        )
        for row, v in speeds.items()
    ]
    kernels = {
        "attention_math_cpu_ms": 200.0,
        "attention_default_cpu_ms": kernel_default_ms,
        "attention_math_again_cpu_ms": 200.0,
        "sample_nhwc_cpu_ms": 250.0,
        "sample_nchw_cpu_ms": 275.0,
        "sample_nhwc_again_cpu_ms": 250.0,
    }
    return [*recs, record("speed_levers", invocation, row="kernels", repeat=k, threads=1, **kernels)]


def test_speed_levers_report_pairs_alternations_and_gives_each_lever_its_verdict(tmp_path, monkeypatch):
    import speed_levers

    old = [r for k in range(5) for r in lever_rows(k, 1.0, 100.0, invocation="inv-0")]  # older: ignored
    # bf16 NHWC straddles the default's speed (4.4, 3.6, ...): not shown; the attention kernel's 1.2x: shown.
    recs = [r for k in range(5) for r in lever_rows(k, (4.4, 3.6, 4.2, 3.8, 4.0)[k], 240.0)]
    page = page_with_prose(tmp_path, monkeypatch, speed_levers)
    monkeypatch.setattr(speed_levers, "load", lambda bench, raw_dir=None: old + recs)
    speed_levers.report()
    text = page.read_text()
    assert text.startswith("# hand-written prose\n\nkept as it is.\n")
    line = {c.split("|")[1].strip(): c for c in text.splitlines() if c.startswith("| ") and "÷" in c}
    assert (
        "1.00 [0.909, 1.11] (n=5, bootstrap 95%) | not shown"
        in line["memory format under bf16-mixed: auto (NCHW) ÷ NHWC"]
    )
    assert (
        "| 1.04 [1.04, 1.04] (n=5, bootstrap 95%) | shown"
        in line["memory format under 32-true: auto (NHWC) ÷ NCHW"]
    )
    assert (
        "| 1.20 [1.20, 1.20] (n=5, bootstrap 95%) | shown"
        in line["bf16 training forward+backward: math attention kernel ÷ PyTorch's choice"]
    )
    assert "| 1.10 [1.10, 1.10] (n=5, bootstrap 95%) | shown" in line["fp32 sampling forward: NHWC ÷ NCHW"]
    assert (
        line["noise floor: bf16 auto again ÷ bf16 auto"].rstrip().endswith("|  |")
    )  # a floor has no verdict
    assert "inv-0" not in text and "inv-1" in text


def test_speed_levers_report_with_fewer_than_five_alternations_shows_nothing():
    import speed_levers

    text = speed_levers.build_report([r for k in range(3) for r in lever_rows(k, 2.0, 400.0)])
    assert text.count("not shown (n=3 < 5 alternations)") == 4
    assert speed_levers.build_report([]) == "Not measured yet under the protocol."


def meanflow_rows(k: int, meanflow_fp32: float) -> list[dict]:
    """One alternation of meanflow_cost.py: steps per CPU second of each row."""
    speeds = {
        "flow fp32": 3.0,
        "meanflow fp32": meanflow_fp32,
        "flow bf16": 4.0,
        "meanflow bf16": 1.0,
        "flow fp32 again": 3.0,
    }
    return [
        record(
            "meanflow_cost",
            row=row,
            repeat=k,
            steps_per_cpu_sec=v,
            cpu_step_ms=1000 / v,
            threads=1,
            steps=20,
            warmup=5,
        )
        for row, v in speeds.items()
    ]


def test_meanflow_cost_report_gives_the_time_ratio_and_the_goal_verdict(tmp_path, monkeypatch):
    """Time per step = 1/speed: 3.0 / 2.0 = 1.5x at fp32 (goal <= 2x: met), 4.0 / 1.0 = 4x at bf16."""
    import meanflow_cost

    recs = [r for k in range(5) for r in meanflow_rows(k, 2.0)]
    page = page_with_prose(tmp_path, monkeypatch, meanflow_cost)
    monkeypatch.setattr(meanflow_cost, "load", lambda bench, raw_dir=None: recs)
    meanflow_cost.report()
    text = page.read_text()
    line = {c.split("|")[1].strip(): c for c in text.splitlines() if c.startswith("| ") and "÷" in c}
    assert "| 1.50 [1.50, 1.50] (n=5, bootstrap 95%) | shown" in line["32-true: MeanFlow step ÷ flow step"]
    assert (
        "| 4.00 [4.00, 4.00] (n=5, bootstrap 95%) | refuted" in line["bf16-mixed: MeanFlow step ÷ flow step"]
    )
    assert line["noise floor: flow fp32 again ÷ flow fp32"].rstrip().endswith("|  |")
    assert "| 0 | 333 | 500 | 250 | 1000 | 333 |" in text  # the per-alternation ms
    assert meanflow_cost.build_report([]) == "Not measured yet under the protocol."


def test_guide_cost_report_gives_the_extra_time_while_training_frozen_and_over_a_run(tmp_path, monkeypatch):
    """Default 100 ms, guide training 120 ms (+20%), frozen 102 ms (+2%): over a run of duration 0.25,
    0.25·0.20 + 0.75·0.02 = 0.065, under the 0.15 goal."""
    import guide_cost

    ms = {"default": 100.0, "guide training": 120.0, "guide frozen": 102.0, "default again": 100.0}
    recs = [
        record("guide_cost", row=row, repeat=k, step_ms=v, precision="bf16-mixed", steps=30, warmup=5)
        for k in range(5)
        for row, v in ms.items()
    ]
    page = page_with_prose(tmp_path, monkeypatch, guide_cost)
    monkeypatch.setattr(guide_cost, "load", lambda bench, raw_dir=None: recs)
    guide_cost.report(guide_cost.RAW)
    text = page.read_text()
    line = {c.split("|")[1].strip(): c for c in text.splitlines() if c.startswith("| ")}
    assert "| 0.200 [0.200, 0.200] (n=5, bootstrap 95%) |" in line["while the guide trains"]
    assert "| 0.0650 [0.0650, 0.0650] (n=5, bootstrap 95%) | shown" in line["a whole run, duration 0.25"]
    assert "| 0 | 100 | 120 | 102 | 100 |" in text
    assert guide_cost.build_report([]) == "Not measured yet under the protocol."
