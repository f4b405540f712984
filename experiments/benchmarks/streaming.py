"""Big-data path, measured: difflab-prepare throughput, loader throughput (shards vs folder), training
img/s from shards vs the in-memory source, and memory that stays flat over a shard set far larger
than the run's RSS.

    .venv/bin/python experiments/benchmarks/streaming.py [--images 50000] [--work DIR]

Every figure comes from the real commands or datamodules in fresh processes; training figures from
real difflab-train runs, alternating the two sources; memory from streaming_rss.py. ~25 min on 2
cores. Prints markdown tables for RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(REPO))


def make_folder(folder: Path, n: int, size: int = 64) -> float:
    """``n`` distinct RGB PNGs: smooth random colour fields (compress like photos, unlike noise)."""
    from PIL import Image

    done = len(list(folder.rglob("*.png"))) if folder.is_dir() else 0
    if done >= n:
        return 0.0
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    for i in range(n):
        small = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((size, size), Image.BICUBIC)
        sub = folder / f"{i // 1000:03d}"
        sub.mkdir(exist_ok=True)
        img.save(sub / f"{i:06d}.png")
    return time.perf_counter() - t0


def prepare(args: list[str], cwd: Path) -> dict:
    """Run difflab-prepare; wall seconds plus its own summary line."""
    t0 = time.perf_counter()
    p = subprocess.run([str(BIN / "difflab-prepare"), *args], cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode:
        raise SystemExit(p.stderr[-2000:])
    line = next(x for x in p.stdout.splitlines() if x.startswith("wrote "))
    found = re.search(r"wrote (\d+) images \(([\d.]+) MB\).* in ([\d.]+) s \((\d+) img/s\)", line)
    return {
        "images": int(found[1]),
        "mb": float(found[2]),
        "write_s": float(found[3]),
        "write_img_s": int(found[4]),
        "wall_s": wall,
    }


LOADER = """
import sys, time, json
sys.path.insert(0, {repo!r})
import torch
torch.set_num_threads(1)
from tests.conftest import compose_config
from difflab.cli import instantiate
from pathlib import Path
cfg = compose_config(Path({tmp!r}), {overrides!r})
dm = instantiate(cfg.data)
dm.setup()
it = iter(dm.train_dataloader())
for _ in range(5):
    next(it)
t0 = time.perf_counter()
n = 0
for _ in range({batches}):
    n += len(next(it))
print(json.dumps({{"img_s": n / (time.perf_counter() - t0)}}))
"""


def loader_rate(overrides: list[str], tmp: Path, batches: int) -> float:
    tmp.mkdir(parents=True, exist_ok=True)
    code = LOADER.format(repo=str(REPO), tmp=str(tmp), overrides=overrides, batches=batches)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp)
    if p.returncode:
        raise SystemExit(p.stderr[-2000:])
    return json.loads(p.stdout.strip().splitlines()[-1])["img_s"]


def train_rate(data_args: list[str], run_dir: Path, steps: int) -> float:
    """img/s of a real difflab-train run (`small`, batch 32): the throughput callback's logged
    perf/images_per_sec, median of the windows after the first (warm-up)."""
    import csv
    import shutil

    shutil.rmtree(run_dir, ignore_errors=True)
    args = [
        *data_args,
        "model/unet=small",
        "data.batch_size=32",
        f"trainer.max_steps={steps}",
        "trainer.log_every_n_steps=10",
        "logger=csv",
        "callbacks.sample_grid=null",
        "callbacks.progress_bar=null",
        f"hydra.run.dir={run_dir}",
    ]
    p = subprocess.run(
        [str(BIN / "difflab-train"), *args], capture_output=True, text=True, cwd=run_dir.parent
    )
    if p.returncode:
        raise SystemExit(p.stderr[-2000:])
    with open(run_dir / "csv" / "metrics.csv") as f:
        rates = [float(r["perf/images_per_sec"]) for r in csv.DictReader(f) if r.get("perf/images_per_sec")]
    return statistics.median(rates[1:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=50_000)
    ap.add_argument("--work", default="/tmp/difflab_streaming_bench")
    ap.add_argument("--repeats", type=int, default=3)
    opts = ap.parse_args()
    work = Path(opts.work)
    work.mkdir(parents=True, exist_ok=True)
    folder = work / "images64"
    gen_s = make_folder(folder, opts.images)
    print(f"generated {opts.images} 64 px PNGs in {gen_s:.0f} s")

    # 1. Prepare throughput (the folder source checks every file first, as training does).
    shards = work / "shards64"
    prep = (
        json.loads((work / "prepare.json").read_text())
        if (work / "prepare.json").is_file()
        else prepare(
            ["data=folder", f"data.source.path={folder}", "resolution=64", f"out={shards}", "overwrite=true"],
            work,
        )
    )
    (work / "prepare.json").write_text(json.dumps(prep))
    print("prepare", prep)

    # 2. Loader throughput, same images, same transforms (64 px, flip), batch 64.
    common = ["data.resolution=64", "data.channels=3", "data.batch_size=64", "data.flip=true"]
    rates: dict[tuple[str, int], float] = {}
    cached = work / "loader.json"  # a rerun (e.g. after a later step failed) keeps these figures
    if cached.is_file():
        rates = {
            (k.split("/")[0], int(k.split("/")[1])): v for k, v in json.loads(cached.read_text()).items()
        }
    for workers in (0, 1, 2) if not rates else ():
        for kind, extra in (
            ("folder", ["data=folder", f"data.source.path={folder}"]),
            ("streaming", ["data=streaming", f"data.source.path={shards}"]),
        ):
            rates[kind, workers] = loader_rate(
                [*extra, *common, f"data.num_workers={workers}"], work / "loader", batches=150
            )
            print(kind, workers, f"{rates[kind, workers]:.0f} img/s")
    cached.write_text(json.dumps({f"{k}/{w}": v for (k, w), v in rates.items()}))

    # 3. Training img/s: the default job's data in memory vs the same images from shards.
    fm_shards = work / "shards_fashion"
    if not (fm_shards / "index.json").is_file():
        prepare(["data=fashion_mnist", f"out={fm_shards}"], work)
    ratios, runs = [], {"in-memory": [], "shards": []}
    for _ in range(opts.repeats):
        mem = train_rate(["data=fashion_mnist"], work / "train_mem", steps=70)
        shard = train_rate(
            [
                "data=streaming",
                f"data.source.path={fm_shards}",
                "data.resolution=28",
                "data.channels=1",
                "data.num_workers=0",
            ],
            work / "train_shards",
            steps=70,
        )
        runs["in-memory"].append(mem)
        runs["shards"].append(shard)
        ratios.append(shard / mem)
        print(f"train img/s in-memory {mem:.1f} shards {shard:.1f} ratio {shard / mem:.3f}")

    # 4. Memory over a shard set much larger than the run: Fashion-MNIST at 128 px RGB, raw (49 KB an
    # image, 2.9 GB: what an in-memory decode would have to hold), tiny UNet, 2 loader workers.
    big = work / "shards_big"
    if not (big / "index.json").is_file():
        prepare(
            ["data=fashion_mnist", "data.channels=3", "resolution=128", "encoding=raw", f"out={big}"], work
        )
    big_mb = sum(f.stat().st_size for f in big.glob("chunk-*.bin")) / 2**20
    p = subprocess.run(
        [sys.executable, str(HERE / "streaming_rss.py"), str(big)], capture_output=True, text=True, cwd=work
    )
    if p.returncode:
        raise SystemExit(p.stderr[-2000:])
    rss = json.loads(p.stdout.strip().splitlines()[-1])["samples"]
    print("\n| step | figure |\n| --- | --- |")
    print(
        f"| `difflab-prepare`, {prep['images']:,} 64 px PNGs → PNG shards ({prep['mb']:.0f} MB), 2 workers "
        f"| {prep['write_img_s']:,} img/s writing; {prep['images'] / prep['wall_s']:.0f} img/s end to end "
        f"({prep['wall_s']:.0f} s, incl. listing and checking every file) |"
    )
    print(
        "\n| loader (64 px RGB, batch 64, flip) | 0 workers | 1 worker | 2 workers |"
        "\n| --- | --- | --- | --- |"
    )
    for kind in ("folder", "streaming"):
        print(f"| `data={kind}` | " + " | ".join(f"{rates[kind, w]:.0f} img/s" for w in (0, 1, 2)) + " |")
    print(
        f"\n| training, `small`, Fashion-MNIST, batch 32 ({opts.repeats} alternations) | img/s |"
        "\n| --- | --- |"
    )
    for k, v in runs.items():
        print(f"| {k} | {statistics.median(v):.1f} ({min(v):.1f}-{max(v):.1f}) |")
    print(f"| shards ÷ in-memory | {statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f}) |")
    anon = [m["anon"] for _, m in rss]
    mapped = [m["file"] for _, m in rss]
    print(
        f"\nShard loader (2 workers, batch 64) over a {big_mb:,.0f} MB shard set (60,000 images, 128 px RGB, "
        f"raw), {rss[-1][0]:,} images read: anonymous RSS of the process tree "
        f"{min(anon):.0f}-{max(anon):.0f} MB, "
        f"mmapped chunk pages {min(mapped):.0f}-{max(mapped):.0f} MB"
    )
    (work / "results.json").write_text(
        json.dumps(
            {
                "prepare": prep,
                "loader": {f"{k}/{w}": v for (k, w), v in rates.items()},
                "train": runs,
                "ratios": ratios,
                "rss": rss,
                "big_mb": big_mb,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
