"""The streaming loader against the folder and the in-memory source, under the protocol (PROTOCOL.md).

    .venv/bin/python experiments/benchmarks/streaming.py [--images 12000] [--size 32] [--repeats 5]
    .venv/bin/python experiments/benchmarks/streaming.py --report    # RESULTS.md block "streaming"

One set of generated RGB PNGs (smooth random colour fields: they compress like photos, unlike noise) is
read three ways, by the datamodules `difflab-train` builds from conf/data/*.yaml:

- ``folder``: ``data=folder`` on the PNG files (a file open and decode per image);
- ``streaming``: ``data=streaming`` on the same images after ``difflab-prepare`` (PNG shards);
- ``in_memory``: the folder config with its source swapped for the same images decoded into one uint8
  tensor (what Fashion-MNIST, digits and twemoji do), so only the source differs.

Every row uses the same resolution, batch, worker count and ``data.flip`` (``--flip``: on in all rows or
off in all rows; the configs' own defaults differ: folder and streaming flip, the in-memory datasets do
not). Rows alternate (A B C A' ...) over ``--repeats`` alternations, each measurement a fresh process with
one intra-op thread; ``streaming_again`` is the streaming row measured a second time in each alternation:
its ratio to ``streaming`` is the noise floor. ``difflab-prepare``'s own throughput is recorded once (one
run: a description, not a compared figure).

Defaults (12,000 images at 32 px, 5 alternations, 0 workers) take ~8-10 min on 2 shared cores, most of
it process start-up; each extra ``--workers`` value adds ~7 min.
Left out (see docs/benchmark-notes.md, issue 13, for the older figures): training img/s from shards vs
in memory (10 difflab-train runs: ~6 more minutes) and the flat-memory check over a 2.8 GB shard set
(streaming_rss.py, not yet under the protocol).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
sys.path.insert(0, str(HERE))

from protocol import (  # noqa: E402  (this folder is not a package on sys.path)
    RAW,
    Recorder,
    claim,
    code_env,
    interleaved,
    interval,
    latest,
    load,
    machine_line,
    ratio_pairs,
    table,
    write_section,
)

BENCH = "streaming"
KINDS = ("folder", "streaming", "in_memory", "streaming_again")  # the last: the A/A noise floor


def make_folder(folder: Path, n: int, size: int) -> None:
    """``n`` distinct RGB PNGs of ``size`` px, 1,000 per subfolder (kept between runs: seeded)."""
    from PIL import Image

    if folder.is_dir() and len(list(folder.rglob("*.png"))) == n:
        return
    rng = np.random.default_rng(0)
    for i in range(n):
        small = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
        sub = folder / f"{i // 1000:03d}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(small).resize((size, size), Image.BICUBIC).save(sub / f"{i:06d}.png")


def prepare(folder: Path, shards: Path, size: int) -> dict:
    """Run difflab-prepare on the folder; its own summary figures plus the wall time."""
    args = [f"data.source.path={folder}", f"resolution={size}", f"out={shards}", "overwrite=true"]
    t0 = time.perf_counter()
    p = subprocess.run(
        [str(BIN / "difflab-prepare"), "data=folder", *args],
        capture_output=True,
        text=True,
        cwd=shards.parent,
        env=code_env(),
    )
    wall = time.perf_counter() - t0
    if p.returncode:
        raise SystemExit(f"difflab-prepare failed:\n{p.stderr[-2000:]}")
    line = next(x for x in p.stdout.splitlines() if x.startswith("wrote "))
    found = re.search(r"wrote (\d+) images \(([\d.]+) MB\).* in ([\d.]+) s \((\d+) img/s\)", line)
    if found is None:
        raise SystemExit(f"difflab-prepare's summary line changed; update the pattern here: {line}")
    return {
        "images": int(found[1]),
        "mb": float(found[2]),
        "write_s": float(found[3]),
        "write_img_s": int(found[4]),
        "wall_s": wall,
    }


def measure_loader(spec: dict) -> float:
    """img/s of one datamodule's train loader over ``batches`` batches after 5 warm-up batches. Runs in
    the fresh process ``loader_rate`` starts."""
    import torch

    from difflab.cli import instantiate
    from difflab.compose import compose

    torch.set_num_threads(1)
    kind = "streaming" if spec["kind"].startswith("streaming") else spec["kind"]
    common = [
        f"data.resolution={spec['size']}",
        "data.channels=3",
        f"data.batch_size={spec['batch']}",
        f"data.flip={str(spec['flip']).lower()}",
        f"data.num_workers={spec['workers']}",
        "seed=0",
    ]
    if kind == "streaming":
        cfg = compose("train", ["data=streaming", f"data.source.path={spec['shards']}", *common])
        dm = instantiate(cfg.data)
    else:
        cfg = compose("train", ["data=folder", f"data.source.path={spec['folder']}", *common])
        dm = instantiate(cfg.data)
        if kind == "in_memory":  # the same images, decoded once: only the source differs
            from difflab.data.sources import InMemorySource

            dm.setup()
            images = torch.stack([dm.train_set.base_image(i) for i in range(len(dm.train_set))])
            dm = instantiate(cfg.data, source=InMemorySource(images, identity="bench:in_memory"))
    dm.setup()
    it = iter(dm.train_dataloader())
    for _ in range(5):
        next(it)
    n, t0 = 0, time.perf_counter()
    for _ in range(spec["batches"]):
        n += len(next(it))
    return n / (time.perf_counter() - t0)


def loader_rate(spec: dict) -> float:
    p = subprocess.run(
        [sys.executable, __file__, "--measure", json.dumps(spec)],
        capture_output=True,
        text=True,
        env={**code_env(), "OMP_NUM_THREADS": "1"},
    )
    if p.returncode:
        raise SystemExit(f"loader measurement {spec['kind']} failed:\n{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])["img_s"]


def run(opts: argparse.Namespace) -> None:
    work = Path(opts.work)
    folder, shards = work / f"png{opts.size}_{opts.images}", work / f"shards{opts.size}_{opts.images}"
    make_folder(folder, opts.images, opts.size)
    rec = Recorder(BENCH, opts.raw_dir)
    prep = prepare(folder, shards, opts.size)
    rec.record(row="prepare", repeat=0, size=opts.size, **prep)
    print(f"prepare: {prep}", flush=True)
    for workers in opts.workers:
        for k, kind in interleaved(KINDS, opts.repeats):
            spec = {
                "kind": kind,
                "workers": workers,
                "size": opts.size,
                "batch": opts.batch,
                "batches": opts.batches,
                "flip": opts.flip,
                "folder": str(folder),
                "shards": str(shards),
            }
            img_s = loader_rate(spec)
            rec.record(
                row=f"{kind}/w{workers}",
                kind=kind,
                repeat=k,
                img_s=img_s,
                images=opts.images,
                **{key: spec[key] for key in ("workers", "size", "batch", "batches", "flip")},
            )
            print(f"{kind:16s} workers={workers} repeat={k}: {img_s:,.0f} img/s", flush=True)


def report() -> None:
    records = latest(load(BENCH))
    if not records:
        write_section(BENCH, "Not measured yet under the protocol.")
        return
    loads = [r for r in records if r["row"] != "prepare"]
    flips = {r["flip"] for r in loads}
    first, flip = loads[0], "on" if flips == {True} else "off"
    lines = [
        "## Streaming shards vs folder vs in-memory (loader img/s)",
        "",
        f"{first['images']:,} generated {first['size']} px RGB PNGs read by `data=folder`, by "
        "`data=streaming` (the same images as PNG shards) and in memory; "
        f"batch {first['batch']}, {first['batches']} timed batches per measurement, random flips {flip} in "
        "every row, one intra-op thread, a fresh process per measurement, rows interleaved. Ratios pair "
        "rows of one alternation; `streaming_again` ÷ `streaming` is the noise floor (the same row "
        "measured twice).",
        "",
    ]
    if len(flips) > 1:
        raise SystemExit("the newest invocation mixes flips on and off: rerun with one --flip")
    rows = []
    for workers in sorted({r["workers"] for r in loads}):
        by = {kind: [r for r in loads if r["kind"] == kind and r["workers"] == workers] for kind in KINDS}
        for kind in KINDS:
            if not by[kind]:
                continue
            cells = [f"`{kind}`", workers, str(interval([r["img_s"] for r in by[kind]]))]
            for denom in ("folder", "in_memory", "streaming"):
                # each row against the others; the A/A row only against its twin (its noise floor)
                wanted = (kind == "streaming_again") == (denom == "streaming")
                if kind == denom or not by[denom] or not wanted:
                    cells.append("")
                    continue
                iv = interval(ratio_pairs(by[kind], by[denom], "img_s"))
                shown = claim(iv, 1.0, lower_is_better=False)
                cells.append(str(iv) if kind == "streaming_again" else f"{iv}; > 1: {shown}")
            rows.append(cells)
    header = ["row", "workers", "img/s", "÷ folder", "÷ in_memory", "÷ streaming (A/A noise floor)"]
    lines.append(table(header, rows))
    prep = [r for r in records if r["row"] == "prepare"]
    if prep:
        p = prep[-1]
        lines += [
            "",
            f"`difflab-prepare`, {p['images']:,} PNGs → PNG shards ({p['mb']:.0f} MB): "
            f"{p['write_img_s']:,} img/s writing, {p['images'] / p['wall_s']:,.0f} img/s end to end "
            f"({p['wall_s']:.0f} s, including the check of every file and the process start). "
            "One run: a description, not a compared figure.",
        ]
    lines += ["", machine_line(records)]
    write_section(BENCH, "\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--report", action="store_true", help="write RESULTS.md's block from raw/streaming.jsonl")
    ap.add_argument("--images", type=int, default=12_000, help="generated PNGs (kept in --work between runs)")
    ap.add_argument("--size", type=int, default=32, help="image side in px (the training resolution too)")
    ap.add_argument("--repeats", type=int, default=5, help="alternations of all rows (>= 5: a speed claim)")
    ap.add_argument(
        "--workers",
        type=int,
        nargs="+",
        default=[0],
        help="data.num_workers values (+7 min each)",
    )
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--batches", type=int, default=100, help="timed batches per measurement")
    ap.add_argument("--flip", type=lambda s: s.lower() in ("1", "true", "on", "yes"), default=True,
                    help="data.flip for every row (true/false)")  # fmt: skip
    ap.add_argument("--work", default="/tmp/difflab_streaming_bench")
    ap.add_argument("--raw-dir", type=Path, default=RAW, help="JSON lines go here (smoke runs: elsewhere)")
    ap.add_argument("--measure", help=argparse.SUPPRESS)  # internal: one loader measurement, JSON spec
    opts = ap.parse_args()
    if opts.measure:
        print(json.dumps({"img_s": measure_loader(json.loads(opts.measure))}))
    elif opts.report:
        report()
    else:
        if opts.repeats < 5:
            print(f"note: {opts.repeats} alternations < 5: the table's intervals will be min-max ranges")
        run(opts)
        print(f"raw results appended to raw/{BENCH}.jsonl; `{Path(__file__).name} --report` writes the table")


if __name__ == "__main__":
    main()
