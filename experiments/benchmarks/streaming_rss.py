"""Memory of the shard loader over a shard set larger than the run. Prints one JSON line: (images read,
RSS anonymous/file-backed MB of the loader's process tree) every 50 batches.

    .venv/bin/difflab-prepare data=fashion_mnist data.channels=3 resolution=128 encoding=raw out=SHARD_DIR
    .venv/bin/python experiments/benchmarks/streaming_rss.py SHARD_DIR

Not yet under the protocol (PROTOCOL.md): it records no raw JSON lines and writes no generated table;
its figures (issue 13, a 2.8 GB shard set) are in docs/benchmark-notes.md. streaming.py no longer runs
it: preparing that shard set takes longer than the protocol's streaming run itself.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path


def tree(pid: int) -> dict[str, float]:
    """RssAnon and RssFile (mmapped chunk pages, reclaimable) of a process and its workers, MB."""
    tot = {"anon": 0, "file": 0}
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            st = Path(f"/proc/{p}/status").read_text()
            tot["anon"] += int(re.search(r"RssAnon:\s+(\d+)", st)[1])
            tot["file"] += int(re.search(r"RssFile:\s+(\d+)", st)[1])
            for t in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (t / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError, TypeError):
            continue
    return {k: v / 1024 for k, v in tot.items()}


def main() -> None:
    from difflab.cli import instantiate
    from difflab.compose import compose

    big = sys.argv[1]
    overrides = [
        "data=streaming",
        f"data.source.path={big}",
        "data.resolution=128",
        "data.channels=3",
        "data.num_workers=2",
        "data.batch_size=64",
    ]
    cfg = compose("train", overrides)
    dm = instantiate(cfg.data)
    dm.setup()
    it = iter(dm.train_dataloader())
    samples = []
    t0 = time.perf_counter()
    for i in range(1, 601):
        next(it)
        if i % 50 == 0:
            samples.append((i * 64, tree(os.getpid())))
    print(json.dumps({"samples": samples, "seconds": time.perf_counter() - t0}))


if __name__ == "__main__":
    main()
