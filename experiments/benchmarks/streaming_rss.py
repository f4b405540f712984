"""Memory of the shard loader over a shard set larger than the run: run by streaming.py in a fresh
process. Prints one JSON line: (images read, RSS anonymous/file-backed MB of the loader's process tree).

    .venv/bin/python experiments/benchmarks/streaming_rss.py SHARD_DIR
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


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
    from tests.conftest import compose_config

    from difflab.cli import instantiate

    big = sys.argv[1]
    overrides = [
        "data=streaming",
        f"data.source.path={big}",
        "data.resolution=128",
        "data.channels=3",
        "data.num_workers=2",
        "data.batch_size=64",
    ]
    cfg = compose_config(Path(big).parent / "rss_run", overrides)
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
