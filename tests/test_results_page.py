"""RESULTS.md is a generated page: every block has well-formed markers and a script that writes it.

Text only (no benchmark is imported or run), so it costs milliseconds. The report machinery itself
(intervals, write_section) is tested in tests/test_protocol.py and tests/test_benchmark_reports.py.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

BENCH_DIR = Path(__file__).resolve().parents[1] / "experiments" / "benchmarks"
RESULTS = BENCH_DIR / "RESULTS.md"
MARKER = re.compile(r"<!-- (end )?generated: ([a-z0-9_]+) -->")
WRITER = re.compile(r"<!-- written by `([^`]+) --report`")


def blocks(text: str) -> list[tuple[str, str]]:
    """(name, body) of every generated block, in order; asserts the markers pair up, unnested."""
    found, open_name, start = [], None, 0
    for m in MARKER.finditer(text):
        is_end, name = bool(m[1]), m[2]
        if not is_end:
            assert open_name is None, f"block {name} opens inside block {open_name}"
            open_name, start = name, m.end()
        else:
            assert open_name == name, f"end of block {name} without its start (open: {open_name})"
            found.append((name, text[start : m.start()]))
            open_name = None
    assert open_name is None, f"block {open_name} is never closed"
    return found


def sections_written_by_scripts() -> dict[str, str]:
    """Section name -> script, for each script here with a --report that calls write_section: the name
    is its ``BENCH = "..."`` constant or a literal first argument of write_section."""
    names: dict[str, str] = {}
    for script in sorted(BENCH_DIR.glob("*.py")):
        if script.name == "protocol.py":
            continue
        src = script.read_text()
        if "--report" not in src or "write_section(" not in src:
            continue
        for pattern in (r'^BENCH\s*=\s*"([a-z0-9_]+)"', r'write_section\(\s*"([a-z0-9_]+)"'):
            for name in re.findall(pattern, src, flags=re.M):
                names[name] = script.name
    return names


def test_every_block_has_paired_markers_and_a_unique_name() -> None:
    names = [name for name, _ in blocks(RESULTS.read_text())]
    assert names, "RESULTS.md has no generated block"
    assert len(names) == len(set(names)), f"a block appears twice: {names}"


def test_every_block_is_written_by_a_script_with_report() -> None:
    writers = sections_written_by_scripts()
    for name, body in blocks(RESULTS.read_text()):
        assert name in writers, (
            f"RESULTS.md block {name!r} has no script in experiments/benchmarks with --report that writes it"
        )
        who = WRITER.search(body)
        assert who is not None, (
            f"block {name}: the 'written by' line is missing (write it with write_section)"
        )
        # protocol.py wrote the empty skeleton; a filled block names the script whose --report wrote it
        assert who[1] in (writers[name], "protocol.py"), (
            f"block {name} was written by {who[1]}, not {writers[name]}"
        )


def test_no_script_writes_results_md_but_through_write_section() -> None:
    """Only protocol.py names the RESULTS.md file as a path: every other script reaches it through
    write_section, which replaces its own block and nothing else."""
    for script in sorted(BENCH_DIR.glob("*.py")):
        if script.name == "protocol.py":
            continue
        assert not re.search(r"""["']RESULTS\.md["']""", script.read_text()), (
            f"{script.name} names RESULTS.md as a file: write its table with protocol.write_section"
        )


def test_markers_parser_rejects_broken_blocks() -> None:
    good = "<!-- generated: a -->\nx\n<!-- end generated: a -->"
    assert [n for n, _ in blocks(good)] == ["a"]
    for bad in (
        "<!-- generated: a -->\nx",  # never closed
        "x\n<!-- end generated: a -->",  # end without start
        "<!-- generated: a -->\n<!-- generated: b -->\n<!-- end generated: b -->\n<!-- end generated: a -->",
    ):
        with pytest.raises(AssertionError):
            blocks(bad)
