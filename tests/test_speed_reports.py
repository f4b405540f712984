"""precision_bench.py's and run_benchmarks.py's reports, generated from small fixtures of raw JSON lines
(nothing trained): ratios paired within each alternation, the A/A noise floor, the verdict, and each
writes only its own block of the page."""

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
    assert "| 3.00 [3.00, 3.00] (n=4, min-max) | not shown (< 5 alternations) |" in text
    assert "| 2.00 [2.00, 2.00] (n=4, min-max) | not shown (< 5 alternations) |" in text


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
