"""fid_sanity.py --report: the table comes from raw JSON lines only, into its own RESULTS.md block."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments" / "benchmarks"))

import fid_sanity
import protocol

MACHINE = {"cpu": "Test CPU", "cores": 2, "amx": False, "avx512_bf16": True, "gpu": None, "torch": "0"}
MACHINE |= {"lightning": "0", "diffusers": "0", "python": "3", "commit": "abc", "dirty": False}


def test_report_is_generated_from_the_raw_lines_and_keeps_other_text(tmp_path, monkeypatch):
    raw = tmp_path / "raw"
    raw.mkdir()
    fid = {"real": 1.0, "blur": 50.0, "noise": 150.0, "memorise": 1.2, "memorise_shift": 9.0}
    lines = [
        {
            "bench": "fid_sanity",
            "invocation": "i1",
            "time": "2026-01-01T00:00:00",
            "command": "x",
            "machine": MACHINE,
            "data": "twemoji",
            "row": row,
            "seed": seed,
            "n": 306,
            "reference": "test",
            "reference_size": 612,
            "train_size": 3397,
            "resolution": 32,
            "extractor": "classifier:ab",
            "kid_subset_size": 153,
            "kid_subsets": 100,
            "fid": value + seed,
            "kid": value / 100,
            "kid_std": 0.01,
        }
        for row, value in fid.items()
        for seed in range(3)
    ]
    (raw / "fid_sanity.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    results = tmp_path / "RESULTS.md"
    results.write_text("# Results\n\nprose written by hand\n")
    monkeypatch.setattr(fid_sanity, "load", lambda bench: protocol.load(bench, raw))
    monkeypatch.setattr(fid_sanity, "write_section", lambda n, b: protocol.write_section(n, b, results))
    fid_sanity.report()
    text = results.read_text()
    assert (
        text.startswith("# Results\n\nprose written by hand\n") and "<!-- generated: fid_sanity -->" in text
    )
    assert "| real vs real (disjoint halves) | 2.00 [1.00, 3.00] | 1.00 |" in text
    assert "| real vs training images (memorising) | 2.20 [1.20, 3.20] | 1.10 |" in text
    assert "n = 306 images per set" in text and "held-out `test` split (612 images)" in text
    assert "Test CPU (2 cores" in text
