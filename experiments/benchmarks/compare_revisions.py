"""Training img/s of this checkout against another git revision, alternating, on the same machine.

    .venv/bin/python experiments/benchmarks/compare_revisions.py --base 86f0314 --preset tiny --data digits

Each measurement is a fresh `bench_worker.py difflab` process (a real difflab run: datamodule,
Lightning, EMA, logging and callbacks at default cadence). The base revision runs from a temporary
git worktree with the same virtualenv (its src/ first on PYTHONPATH, its own conf/). Runs alternate
base, head, base, head, ... and the ratio is taken within each pair: on a noisy machine absolute
times from different moments do not compare, neighbours do.

Not yet under the protocol (PROTOCOL.md): it prints its ratio instead of recording raw JSON lines and
writes no generated table (an A/B of two revisions is a check made while changing code, not a standing
figure); the figures it gave are in docs/benchmark-notes.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def measure(root: Path, opts: argparse.Namespace) -> float:
    with tempfile.TemporaryDirectory(prefix="bench_rev_") as tmp:
        args = [sys.executable, str(root / "experiments/benchmarks/bench_worker.py"), "difflab", "--tmp", tmp]
        args += ["--preset", opts.preset, "--data", opts.data, "--batch", str(opts.batch)]
        args += ["--steps", str(opts.steps), "--warmup", str(opts.warmup), "--precision", opts.precision]
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # as run_benchmarks.py
        env["PYTHONPATH"] = f"{root / 'src'}:{root}"
        p = subprocess.run(args, capture_output=True, text=True, cwd=root, env=env)
        lines = [line for line in p.stdout.splitlines() if line.startswith("RESULT ")]
        if p.returncode != 0 or not lines:
            raise RuntimeError(p.stderr[-3000:])
        return json.loads(lines[-1][len("RESULT ") :])["images_per_sec"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True, help="git revision to compare against")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--data", default="digits")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--precision", default="32-true")
    ap.add_argument("--repeats", type=int, default=5)
    opts = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="difflab_base_") as tmp:
        base = Path(tmp) / "base"
        subprocess.run(["git", "worktree", "add", "--detach", str(base), opts.base], cwd=REPO, check=True)
        try:
            ratios, heads, bases = [], [], []
            for _ in range(opts.repeats):
                b, h = measure(base, opts), measure(REPO, opts)
                bases.append(b)
                heads.append(h)
                ratios.append(h / b)
                print(f"base {b:.1f} img/s, head {h:.1f} img/s, head ÷ base {h / b:.3f}", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=REPO, check=False)
    print(
        f"{opts.preset} {opts.data} {opts.precision} batch {opts.batch}: head ÷ base median "
        f"{statistics.median(ratios):.3f} (range {min(ratios):.3f}-{max(ratios):.3f}, {opts.repeats} pairs); "
        f"img/s base {statistics.median(bases):.1f}, head {statistics.median(heads):.1f}"
    )


if __name__ == "__main__":
    main()
