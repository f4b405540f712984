"""The measurement protocol every benchmark here follows, and the helpers that enforce it.

1. Compared rows run in one invocation on one machine, interleaved (A B A B ...): a figure from another
   invocation, machine or day is never divided by one from this run. Every raw record carries its
   invocation id and machine, and ``ratio_pairs`` refuses to pair records of different invocations.
2. Quality claims over at least 3 seeds; speed claims over at least 5 alternations.
3. Each figure is a median with a 95% interval: a bootstrap of the median over seeds/alternations when
   n >= 5, the min-max range below that (a bootstrap of 3 values says nothing). Each table also reports
   a noise floor: the same configuration measured again (A against A).
4. A goal is "shown" only when the whole interval clears the target, "refuted" when the whole interval
   is on the wrong side, "not shown" otherwise.
5. Raw results are JSON lines in ``raw/<bench>.jsonl`` (committed), each with the machine (CPU model,
   cores, AMX and AVX512-BF16 flags, GPU), library versions, git commit, command line and seed.
6. Tables are written only from those files, by the script's ``--report``, into its own generated
   block of RESULTS.md (``write_section``): text outside the blocks is prose written by hand and is
   never touched; a report never deletes or rewrites a file it did not generate.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
RAW = HERE / "raw"
RESULTS = HERE / "RESULTS.md"
BOOTSTRAP_MIN_N = 5  # below this, the interval is the min-max range
CONFIDENCE = 0.95


# ----------------------------------------------------------------------------------------------- machine


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def code_env(root: Path | str | None = None) -> dict[str, str]:
    """The environment of a benchmark's subprocesses: the source tree ``root``'s src/ (then its root, for
    ``experiments.*``) first on the import path; by default this script's own tree, so a
    benchmark run from a frozen worktree measures that tree's code, whatever the virtualenv's editable
    install points at."""
    root = Path(root or REPO).resolve()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = os.pathsep.join([str(root / "src"), str(root)])
    return env


def run_worker(mode: str, **kw: object) -> dict:
    """One bench_worker.py ``mode`` in a fresh process of this tree's code (``--key value`` per keyword:
    a list repeats the flag, True is a bare flag, False/None are left out); its RESULT line as a dict.
    Each run's scratch (run dir, checkpoints, caches) goes when it ends."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="bench_") as tmp:
        args = [sys.executable, str(HERE / "bench_worker.py"), mode, "--tmp", tmp]
        for k, v in kw.items():
            if isinstance(v, list | tuple):
                for item in v:
                    args += [f"--{k}", str(item)]
            elif v is True:
                args.append(f"--{k}")
            elif v not in (False, None):
                args += [f"--{k}", str(v)]
        p = subprocess.run(args, capture_output=True, text=True, cwd=REPO, env=code_env())
    lines = [line for line in p.stdout.splitlines() if line.startswith("RESULT ")]
    if p.returncode != 0 or not lines:
        raise RuntimeError(f"{mode} {kw} failed:\n{p.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


@functools.cache
def machine() -> dict:
    """What a figure depends on: the CPU (model, cores this process may use, bf16 matrix units), the GPU,
    the library versions and the code's commit (``dirty`` when the working tree had local changes)."""
    import diffusers
    import lightning
    import torch

    from difflab.precision import cpu_info  # the /proc/cpuinfo reader the precision choice uses

    _, flags = cpu_info()
    return {
        "cpu": _cpu_model(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "amx": "amx_tile" in flags,
        "avx512_bf16": "avx512_bf16" in flags,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "commit": _git("rev-parse", "--short=12", "HEAD"),
        "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
    }


def machine_line(records: Sequence[dict]) -> str:
    """One line naming the machine(s), versions and commit(s) of ``records``: a table's provenance."""
    seen: dict[str, None] = {}
    for r in records:
        m = r["machine"]
        flags = ", ".join(
            [
                *(["AMX"] if m["amx"] else ["no AMX"]),
                *(["AVX512-BF16"] if m["avx512_bf16"] else ["no AVX512-BF16"]),
            ]
        )
        gpu = f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU"
        seen[
            f"{m['cpu']} ({m['cores']} cores; {flags}){gpu}; torch {m['torch']}, lightning {m['lightning']}, "
            f"diffusers {m['diffusers']}"
        ] = None
    commits = sorted({r["machine"]["commit"] + ("+dirty" if r["machine"]["dirty"] else "") for r in records})
    invocations = sorted({r["invocation"] for r in records})
    days = sorted({r["time"][:10] for r in records})
    return (
        f"Machine: {' | '.join(seen)}. Commit {', '.join(commits)}; "
        f"{len(invocations)} invocation(s) ({', '.join(days)}): {', '.join(invocations)}."
    )


# ----------------------------------------------------------------------------------------------- records


class Recorder:
    """Appends one invocation's raw results to ``raw/<bench>.jsonl``; every record carries the invocation
    id, the time, the command line and the machine, so a report can tell what may be compared."""

    def __init__(self, bench: str, raw_dir: Path = RAW) -> None:
        if not re.fullmatch(r"[a-z0-9_]+", bench):
            raise ValueError(f"bench name {bench!r}: use lower-case letters, digits and _")
        self.bench, self.path = bench, Path(raw_dir) / f"{bench}.jsonl"
        self.invocation = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
        self.command = " ".join([Path(sys.executable).name, *sys.argv])

    def record(self, **fields: object) -> dict:
        """Append one result (e.g. row=, seed=, repeat=, and the measured values); returns it."""
        rec = {
            "bench": self.bench,
            "invocation": self.invocation,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "command": self.command,
            "machine": machine(),
            **fields,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:  # one line per write: a killed run leaves whole lines
            f.write(json.dumps(rec, sort_keys=True) + "\n")
        return rec


def load(bench: str, raw_dir: Path = RAW) -> list[dict]:
    """Every record of ``bench``, all invocations, in the order written."""
    path = Path(raw_dir) / f"{bench}.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def latest(records: Iterable[dict], **match: object) -> list[dict]:
    """The records of the newest invocation that has any record matching ``match`` (field=value)."""
    records = list(records)
    hits = [r for r in records if all(r.get(k) == v for k, v in match.items())]
    if not hits:
        return []
    newest = max(hits, key=lambda r: (r["time"], r["invocation"]))["invocation"]
    return [r for r in hits if r["invocation"] == newest]


def ratio_pairs(numer: Sequence[dict], denom: Sequence[dict], key: str, by: str = "repeat") -> list[float]:
    """numer[key] / denom[key] for records paired by ``by`` (an alternation or a seed) within one
    invocation: a ratio across invocations, machines or days is refused, not computed."""
    invocations = {r["invocation"] for r in [*numer, *denom]}
    if len(invocations) > 1:
        raise ValueError(
            f"refusing a ratio across invocations {sorted(invocations)}: measure both rows in one run"
        )
    right = {r[by]: r[key] for r in denom}
    return [r[key] / right[r[by]] for r in numer if r[by] in right]


# ----------------------------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class Interval:
    median: float
    lo: float
    hi: float
    n: int
    method: str  # "bootstrap 95%" | "min-max"

    def __str__(self) -> str:
        return f"{fmt(self.median)} [{fmt(self.lo)}, {fmt(self.hi)}] (n={self.n}, {self.method})"


def fmt(x: float) -> str:
    """3 significant figures, no exponent for the magnitudes these tables hold."""
    if x != x:
        return "nan"
    if x == 0 or 0.01 <= abs(x) < 1e5:
        digits = max(0, 2 - int(f"{abs(x):e}".split("e")[1])) if x else 0
        return f"{x:.{digits}f}"
    return f"{x:.3g}"


def interval(
    xs: Sequence[float], confidence: float = CONFIDENCE, resamples: int = 10_000, seed: int = 0
) -> Interval:
    """Median with a ``confidence`` interval: percentile bootstrap of the median when n >= 5 (seeded, so a
    report is reproducible), the min-max range below that."""
    xs = [float(x) for x in xs]
    if not xs:
        raise ValueError("interval of no values")
    med = statistics.median(xs)
    if len(xs) < BOOTSTRAP_MIN_N:
        return Interval(med, min(xs), max(xs), len(xs), "min-max")
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(xs, k=len(xs))) for _ in range(resamples))
    alpha = (1 - confidence) / 2
    lo, hi = meds[int(alpha * (resamples - 1))], meds[round((1 - alpha) * (resamples - 1))]
    return Interval(med, lo, hi, len(xs), f"bootstrap {confidence:.0%}")


def verdict(iv: Interval, target: float, lower_is_better: bool = True) -> str:
    """ "shown" when the whole interval beats ``target``, "refuted" when the whole interval is on the
    wrong side of it, "not shown" when the interval straddles it."""
    beats = iv.hi < target if lower_is_better else iv.lo > target
    loses = iv.lo > target if lower_is_better else iv.hi < target
    return "shown" if beats else "refuted" if loses else "not shown"


# The protocol's minimum sample sizes: a quality claim over seeds, a speed claim over alternations.
MIN_SEEDS, MIN_ALTERNATIONS = 3, 5


def claim(iv: Interval, target: float, lower_is_better: bool = True, quality: bool = False) -> str:
    """``verdict`` for a claim, which needs MIN_SEEDS seeds (``quality``) or MIN_ALTERNATIONS
    alternations (speed): with fewer, nothing is settled either way."""
    minimum, unit = (MIN_SEEDS, "seeds") if quality else (MIN_ALTERNATIONS, "alternations")
    if iv.n < minimum:
        return f"not shown (n={iv.n} < {minimum} {unit})"
    return verdict(iv, target, lower_is_better)


def interleaved(rows: Sequence[str], repeats: int) -> list[tuple[int, str]]:
    """(repeat, row) in A B A B order: slow drift of the machine's speed falls on every row alike."""
    return [(k, row) for k in range(repeats) for row in rows]


# ----------------------------------------------------------------------------------------------- reports


def table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A markdown table; floats to 3 significant figures."""
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in rows:
        cells = [fmt(c) if isinstance(c, float) else str(c) for c in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- generated: {name} -->", f"<!-- end generated: {name} -->"


def write_section(name: str, body: str, path: Path = RESULTS) -> None:
    """Replace the generated block ``name`` in ``path`` with ``body`` (appending the block when the file
    lacks it); every byte outside the block is kept as it was. The block says which command wrote it."""
    if not re.fullmatch(r"[a-z0-9_]+", name):
        raise ValueError(f"section name {name!r}: use lower-case letters, digits and _")
    begin, end = _markers(name)
    if begin in body or end in body:
        raise ValueError(f"section {name}: the body must not contain its own markers")
    script = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "a benchmark script"
    block = (
        f"{begin}\n<!-- written by `{script} --report` from raw/*.jsonl; edits here are overwritten -->\n"
        f"{body.strip()}\n{end}"
    )
    path = Path(path)
    text = path.read_text() if path.is_file() else ""
    if text.count(begin) > 1 or text.count(end) > 1 or (begin in text) != (end in text):
        raise ValueError(f"{path}: the markers of section {name} are broken; mend them by hand")
    if begin in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = head + block + tail
    else:
        text = (
            text + ("\n" if text and not text.endswith("\n") else "") + ("\n" if text else "") + block + "\n"
        )
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def report_all() -> None:
    """Run every benchmark script's ``--report`` (the scripts that follow this protocol)."""
    for script in sorted(HERE.glob("*.py")):
        if script.name in ("protocol.py", "__init__.py", "bench_worker.py"):
            continue
        if "--report" in script.read_text():
            subprocess.run([sys.executable, str(script), "--report"], check=True, cwd=REPO)


if __name__ == "__main__":
    if sys.argv[1:] == ["--report"]:
        report_all()
    else:
        sys.exit("usage: protocol.py --report   (regenerates every benchmark's tables from raw/*.jsonl)")
