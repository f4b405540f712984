"""The measurement protocol's helpers (experiments/benchmarks/protocol.py): interval maths, verdicts, the
interleaved order, ratios refused across invocations, and generated RESULTS.md blocks that leave every
other byte alone. No training, no torch: a few milliseconds."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.helpers import BENCH_MACHINE

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments" / "benchmarks"))

import protocol
from protocol import (
    Interval,
    Recorder,
    interleaved,
    interval,
    latest,
    load,
    ratio_pairs,
    verdict,
    write_section,
)

MACHINE = BENCH_MACHINE


@pytest.fixture(autouse=True)
def no_torch(monkeypatch):
    """Recorder.record captures the machine, which imports torch; a fixed one keeps these tests instant."""
    monkeypatch.setattr(protocol, "machine", lambda: MACHINE)


# ----------------------------------------------------------------------------------------------- interval


def test_interval_below_five_is_min_max():
    iv = interval([3.0, 1.0, 2.0])
    assert (iv.median, iv.lo, iv.hi, iv.n, iv.method) == (2.0, 1.0, 3.0, 3, "min-max")
    assert str(iv) == "2.00 [1.00, 3.00] (n=3, min-max)"
    assert interval([5.0]) == Interval(5.0, 5.0, 5.0, 1, "min-max")
    with pytest.raises(ValueError):
        interval([])


def test_interval_bootstrap_covers_the_median_and_is_deterministic():
    xs = [1.0, 2.0, 2.5, 3.0, 10.0, 4.0, 3.5]
    iv = interval(xs)
    assert iv.method == "bootstrap 95%" and iv.n == 7
    assert min(xs) <= iv.lo <= iv.median <= iv.hi <= max(xs)
    assert iv.median == 3.0
    assert interval(xs) == iv  # seeded: a report regenerated from the same raw file is the same
    assert interval(xs, seed=1).median == iv.median


# ----------------------------------------------------------------------------------------------- verdict


def test_verdict_three_outcomes():
    below = Interval(0.2, 0.1, 0.3, 3, "min-max")
    straddle = Interval(0.3, 0.2, 0.4, 3, "min-max")
    above = Interval(0.5, 0.4, 0.6, 3, "min-max")
    assert verdict(below, 1 / 3) == "shown"
    assert verdict(straddle, 1 / 3) == "not shown"
    assert verdict(above, 1 / 3) == "refuted"
    # Higher is better: the sides swap.
    assert verdict(above, 1 / 3, lower_is_better=False) == "shown"
    assert verdict(below, 1 / 3, lower_is_better=False) == "refuted"
    assert verdict(straddle, 1 / 3, lower_is_better=False) == "not shown"
    # The median alone below the target is not enough.
    assert verdict(Interval(0.3, 0.2, 1 / 3, 3, "min-max"), 1 / 3) == "not shown"


def test_interleaved_is_row_alternating():
    assert interleaved(["a", "b"], 2) == [(0, "a"), (0, "b"), (1, "a"), (1, "b")]
    assert interleaved(["a", "b", "c"], 1) == [(0, "a"), (0, "b"), (0, "c")]


# ----------------------------------------------------------------------------------------------- records


def test_recorder_writes_lines_and_latest_picks_the_newest_invocation(tmp_path):
    first, second = Recorder("bench_x", tmp_path), Recorder("bench_x", tmp_path)
    first.record(row="a", seed=0, value=1.0)
    rec = second.record(row="a", seed=0, value=2.0)
    assert rec["machine"] == MACHINE and rec["invocation"] == second.invocation
    records = load("bench_x", tmp_path)
    assert [r["value"] for r in records] == [1.0, 2.0]
    assert all(k in records[0] for k in ("bench", "invocation", "time", "command", "machine"))
    records[0]["time"] = "2026-01-01T00:00:00"  # latest() orders by time: one second apart at least
    assert [r["value"] for r in latest(records)] == [2.0]
    assert [r["value"] for r in latest(records, value=1.0)] == [1.0]
    assert load("nothing", tmp_path) == []
    with pytest.raises(ValueError):
        Recorder("Bad Name", tmp_path)


def test_ratio_pairs_pairs_by_key_and_refuses_two_invocations():
    numer = [{"invocation": "i1", "seed": s, "t": 10.0 * (s + 1)} for s in range(3)]
    denom = [{"invocation": "i1", "seed": s, "t": 40.0} for s in range(3)]
    assert ratio_pairs(numer, denom, "t", by="seed") == [0.25, 0.5, 0.75]
    other = [{**denom[0], "invocation": "i2"}, *denom[1:]]
    with pytest.raises(ValueError, match="across invocations"):
        ratio_pairs(numer, other, "t", by="seed")


# ----------------------------------------------------------------------------------------------- reports

PAGE = """# Results

Hand-written prose that no script may touch.

<!-- generated: alpha -->
old alpha
<!-- end generated: alpha -->

Prose between blocks.

<!-- generated: beta -->
beta stays
<!-- end generated: beta -->
tail without newline"""


def test_write_section_replaces_only_its_block(tmp_path):
    page = tmp_path / "RESULTS.md"
    page.write_text(PAGE)
    write_section("alpha", "| new | table |", page)
    text = page.read_text()
    assert "old alpha" not in text and "| new | table |" in text
    head, _, rest = text.partition("<!-- generated: alpha -->")
    assert head == PAGE.partition("<!-- generated: alpha -->")[0]
    tail = rest.partition("<!-- end generated: alpha -->")[2]
    assert tail == PAGE.partition("<!-- end generated: alpha -->")[2]  # beta, prose, tail: byte for byte
    write_section("alpha", "| newer |", page)  # idempotent placement, one block
    assert page.read_text().count("<!-- generated: alpha -->") == 1


def test_write_section_appends_when_absent_and_creates_the_file(tmp_path):
    page = tmp_path / "RESULTS.md"
    page.write_text(PAGE)
    write_section("gamma", "gamma body", page)
    text = page.read_text()
    assert text.startswith(PAGE) and text.rstrip().endswith("<!-- end generated: gamma -->")
    fresh = tmp_path / "new.md"
    write_section("delta", "delta body", fresh)
    assert "delta body" in fresh.read_text()


@pytest.mark.parametrize(
    "broken",
    [
        PAGE.replace("<!-- end generated: alpha -->\n", ""),  # begin without end
        PAGE.replace("<!-- generated: alpha -->\n", ""),  # end without begin
        PAGE + "\n<!-- generated: alpha -->\n",  # twice
    ],
)
def test_write_section_refuses_broken_markers(tmp_path, broken):
    page = tmp_path / "RESULTS.md"
    page.write_text(broken)
    with pytest.raises(ValueError, match="broken"):
        write_section("alpha", "x", page)
    assert page.read_text() == broken  # nothing written


def test_write_section_refuses_a_body_with_its_markers_and_bad_names(tmp_path):
    page = tmp_path / "RESULTS.md"
    page.write_text(PAGE)
    with pytest.raises(ValueError):
        write_section("alpha", "<!-- end generated: alpha -->", page)
    with pytest.raises(ValueError):
        write_section("Alpha!", "x", page)
    assert page.read_text() == PAGE


def test_a_report_deletes_no_file_it_did_not_generate(tmp_path):
    """write_section touches only its own page (and a temporary file it renames onto it)."""
    page = tmp_path / "RESULTS.md"
    page.write_text(PAGE)
    others = {tmp_path / "notes.md": "mine", tmp_path / "raw" / "x.jsonl": "{}\n"}
    for path, text in others.items():
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    before = sorted(p for p in tmp_path.rglob("*"))
    write_section("alpha", "body", page)
    write_section("epsilon", "body", page)
    assert sorted(p for p in tmp_path.rglob("*")) == before
    assert all(path.read_text() == text for path, text in others.items())
