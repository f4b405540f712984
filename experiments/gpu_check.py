"""The first-day GPU check (issue 28): what no CPU test can show, in one script, under 10 minutes.

    .venv/bin/python experiments/gpu_check.py --out logs/gpu_check     # on a machine with CUDA GPUs
    .venv/bin/python experiments/gpu_check.py --cpu-smoke --out /tmp/x  # the same code paths on a CPU

Each part runs difflab's own commands (in-process ``COMMAND.call`` where the part must see inside the
process, ``difflab-train`` subprocesses where a launcher or a signal is the point), never a training
loop of its own:

- ``syncs``: the default job for 30 steps under ``torch.cuda.set_sync_debug_mode("warn")``: every
  device sync, counted by where difflab (or else Lightning) asked for it, and whether it happened
  inside an optimizer step (forward, backward, optimizer, EMA) or around it (logging, callbacks).
- ``grid``: one 64-image grid with ``difflab-sample`` from that run's checkpoint.
- ``fid``: one FID evaluation with ``difflab-eval`` (a 1-epoch feature classifier, 1,000 samples).
- ``speed``: ms per optimizer step of the default job for bf16-mixed vs 32-true and NCHW vs NHWC,
  from difflab's own throughput callback (steps 20-30, after the warm-up).
- ``ddp``: ``trainer=ddp`` on all visible GPUs for 30 steps (Lightning's subprocess launcher).
- ``sigterm``: SIGTERM mid-run: exit 0 with a checkpoint, and the rerun resumes from it to the end.

It prints one table headed by the GPU's name and writes ``results.json`` (and ``syncs.json``, the
full sync list) to ``--out``; exit status 1 if a part failed. The default job reads Fashion-MNIST
from /usr/share/datasets/fashion-mnist; where that is missing (no network on a lent GPU machine) it
trains on scikit-learn's bundled digits at 28x28 instead, and says so. ``--cpu-smoke`` runs every
part on the CPU with the tiny digits recipe and a few steps (``trainer=cpu``/``ddp_cpu``; no sync
report: the sync debug mode is CUDA's), so CI keeps this script working until a GPU is lent.
"""

from __future__ import annotations

import argparse
import csv
import json
import signal
import subprocess
import sys
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
FASHION = Path("/usr/share/datasets/fashion-mnist")
PARTS = ("syncs", "grid", "fid", "speed", "ddp", "sigterm")


@dataclass
class Check:
    """Where the check writes and what it runs: a GPU's real sizes, or the CPU smoke run's."""

    out: Path
    smoke: bool
    notes: list[str] = field(default_factory=list)
    _ckpt: Path | None = None

    @property
    def cuda(self) -> bool:
        import torch

        return not self.smoke and torch.cuda.is_available()

    def job(self) -> list[str]:
        """The default job's overrides: its data read offline, on the GPU (or the smoke recipe)."""
        if self.smoke:
            return ["experiment=digits", "trainer=cpu", "data.num_workers=0"]
        if any(FASHION.glob("*.gz")):
            return ["trainer=gpu"]
        note = f"{FASHION} missing: data=digits at 28x28 instead of Fashion-MNIST"
        if note not in self.notes:
            self.notes.append(note)
        return ["trainer=gpu", "data=digits", "data.resolution=28"]

    def steps(self, gpu: int, cpu: int) -> int:
        return cpu if self.smoke else gpu

    def in_dir(self, run: Path) -> list[str]:
        # In-process runs have no Hydra run dir: the run's files and the caches go under --out.
        return [f"paths.output_dir={run}", f"paths.log_dir={self.out / 'logs'}", *self.caches()]

    def caches(self) -> list[str]:
        return [f"paths.data_dir={self.out / 'data_cache'}"]

    def job_args(self, run: Path) -> list[str]:
        """The default job, 30 steps (3 in the smoke run)."""
        return [*self.job(), f"trainer.max_steps={self.steps(30, 3)}", *self.in_dir(run)]

    def checkpoint(self) -> Path:
        """The syncs part's last.ckpt (trained here first when that part was not asked for)."""
        if self._ckpt is None:
            run = self.out / "train"
            train(self.job_args(run))
            self._ckpt = run / "checkpoints" / "last.ckpt"
        return self._ckpt


def train(overrides: list[str]) -> None:
    from difflab.train import COMMAND

    COMMAND.call(overrides)


def cli(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "difflab-train"), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def global_step(ckpt: Path) -> int:
    from difflab.checkpoints import load_checkpoint

    return int(load_checkpoint(ckpt)["global_step"])


# ------------------------------------------------------------------------------------------- parts
def sync_site(stack: list[traceback.FrameSummary]) -> tuple[str, bool]:
    """Where a sync was asked for (the innermost difflab frame, else the innermost outside torch and
    this hook) and whether it ran inside an optimizer step (Lightning's automatic optimization)."""
    import torch

    import difflab

    ours_dir, torch_dir = str(Path(difflab.__file__).parent), str(Path(torch.__file__).parent)
    frames = [f for f in stack if not f.filename.endswith(("warnings.py", Path(__file__).name))]
    ours = [f for f in frames if f.filename.startswith(ours_dir)]
    others = [f for f in frames if not f.filename.startswith(torch_dir)]
    f = (ours or others or frames)[-1]
    in_step = any(fr.filename.endswith("loops/optimization/automatic.py") for fr in frames)
    where = f.filename.split("site-packages/")[-1].removeprefix(str(Path(ours_dir).parent) + "/")
    return f"{where}:{f.lineno} {f.name}", in_step


def part_syncs(c: Check) -> str:
    import torch

    run, steps = c.out / "train", c.steps(30, 3)
    seen: Counter[tuple[str, bool]] = Counter()
    show = warnings.showwarning

    def record(message, category, filename, lineno, file=None, line=None) -> None:
        if "synchroniz" in str(message).lower():
            seen[sync_site(traceback.extract_stack())] += 1
        else:
            show(message, category, filename, lineno, file, line)

    with warnings.catch_warnings():  # restores showwarning and the filters afterwards
        warnings.simplefilter("always")
        warnings.showwarning = record
        if c.cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            train(c.job_args(run))
        finally:
            if c.cuda:
                torch.cuda.set_sync_debug_mode("default")
    c._ckpt = run / "checkpoints" / "last.ckpt"
    rows = [{"site": s, "in_step": i, "count": n} for (s, i), n in seen.most_common()]
    (c.out / "syncs.json").write_text(json.dumps(rows, indent=1))
    if not c.cuda:
        return f"{steps} steps trained; no sync report without CUDA"
    in_step = sum(r["count"] for r in rows if r["in_step"])
    top = "; ".join(f"{r['count']}x {r['site']}{' (step)' if r['in_step'] else ''}" for r in rows[:3])
    return f"{sum(seen.values())} syncs in {steps} steps, {in_step} inside steps; top: {top or 'none'}"


def part_grid(c: Check) -> str:
    from difflab.sample import COMMAND

    out, n = c.out / "grid", c.steps(64, 4)
    COMMAND.call([f"ckpt={c.checkpoint()}", f"out={out}", f"num_images={n}", f"steps={c.steps(20, 2)}"])
    assert (out / "grid.png").is_file(), f"no grid.png in {out}"
    return f"{n} images, grid: {out / 'grid.png'}"


def part_fid(c: Check) -> str:
    from difflab.evaluate import COMMAND

    out = c.out / "fid"
    COMMAND.call(
        [
            f"ckpt={c.checkpoint()}",
            f"out={out}",
            "sampler=dpmsolver++",
            f"steps={c.steps(20, 2)}",
            f"num_samples={c.steps(1000, 16)}",
            f"num_real={c.steps(5000, 64)}",
            "metrics.extractor.epochs=1",
            f"metrics.extractor.max_train_images={c.steps(10000, 256)}",
            *c.caches(),
        ]
    )
    (row,) = json.loads((out / "results.json").read_text())
    fid = next(v for k, v in row.items() if "fid" in k.lower() and isinstance(v, float))
    return f"FID {fid:.2f} (1-epoch classifier features, {c.steps(1000, 16)} samples)"


def ms_per_step(run: Path, batch: int) -> float:
    """From the last window of difflab's throughput callback (images/s over its window)."""
    with open(run / "csv" / "metrics.csv") as f:
        rates = [float(r["perf/images_per_sec"]) for r in csv.DictReader(f) if r.get("perf/images_per_sec")]
    assert rates, f"no perf/images_per_sec in {run}/csv/metrics.csv"
    return 1000 * batch / rates[-1]


def speed_args(c: Check, precision: str, channels_last: str, run: Path) -> list[str]:
    steps, window = c.steps(30, 4), c.steps(10, 2)
    return [
        *c.job(),
        f"trainer.precision={precision}",
        f"model.channels_last={channels_last}",
        f"trainer.max_steps={steps}",
        f"trainer.log_every_n_steps={window}",
        f"callbacks.throughput.every_n_steps={window}",
        "callbacks.sample_grid=null",
        "callbacks.progress_bar=null",
        "logger=csv",
        *c.in_dir(run),
    ]


def part_speed(c: Check) -> str:
    from difflab.compose import compose

    batch = int(compose("train", c.job()).data.batch_size)
    times = {}
    for precision in ("bf16-mixed", "32-true"):
        for layout, channels_last in (("NCHW", "false"), ("NHWC", "true")):
            run = c.out / "speed" / f"{precision}_{layout}"
            train(speed_args(c, precision, channels_last, run))
            times[f"{precision} {layout}"] = ms_per_step(run, batch)
    return ", ".join(f"{k} {v:.1f}" for k, v in times.items()) + f" ms/step (batch {batch})"


def ddp_args(c: Check, run: Path) -> list[str]:
    job = [a for a in c.job() if not a.startswith("trainer=")]
    trainer = "trainer=ddp_cpu" if c.smoke else "trainer=ddp"
    return [*job, trainer, f"trainer.max_steps={c.steps(30, 3)}", *c.caches(), f"hydra.run.dir={run}"]


def part_ddp(c: Check) -> str:
    import torch

    run, steps = c.out / "ddp", c.steps(30, 3)
    p = cli(*ddp_args(c, run), cwd=c.out)
    assert p.returncode == 0, f"exit {p.returncode}: {p.stderr[-2000:]}"
    reached = global_step(run / "checkpoints" / "last.ckpt")
    assert reached == steps, f"last.ckpt at step {reached}, not {steps}"
    ranks = 2 if c.smoke else torch.cuda.device_count()
    return f"{ranks} ranks, {steps} steps, exit 0"


def sigterm_args(c: Check, run: Path) -> list[str]:
    return [
        *c.job(),
        f"trainer.max_steps={c.steps(1000, 200)}",
        f"callbacks.model_checkpoint.every_n_train_steps={c.steps(20, 5)}",
        "callbacks.sample_grid=null",
        *c.caches(),
        f"hydra.run.dir={run}",
    ]


def part_sigterm(c: Check) -> str:
    run, steps, every = c.out / "sigterm", c.steps(1000, 200), c.steps(20, 5)
    args = sigterm_args(c, run)
    proc = subprocess.Popen(
        [str(BIN / "difflab-train"), *args], cwd=c.out, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    first = run / "checkpoints" / f"step_{every:07d}.ckpt"
    t0 = time.time()
    while not first.exists():
        assert proc.poll() is None, f"ended before step {every}: {proc.stderr.read()[-2000:]!r}"
        assert time.time() - t0 < 300, f"no {first.name} after 300 s"
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=120)
    saved = global_step(run / "checkpoints" / "last.ckpt")
    assert code == 0 and every <= saved < steps, f"exit {code}, last.ckpt at step {saved}"
    p = cli(*args, cwd=c.out)
    assert p.returncode == 0, f"rerun exit {p.returncode}: {p.stderr[-2000:]}"
    assert global_step(run / "checkpoints" / "last.ckpt") == steps
    assert "resuming from" in (run / "train.log").read_text(), "the rerun did not resume"
    return f"stopped at step {saved} (exit 0), resumed to {steps}"


PART_FUNCTIONS: dict[str, Callable[[Check], str]] = {
    "syncs": part_syncs,
    "grid": part_grid,
    "fid": part_fid,
    "speed": part_speed,
    "ddp": part_ddp,
    "sigterm": part_sigterm,
}


# ------------------------------------------------------------------------------------------- report
def device_line(smoke: bool) -> str:
    import torch

    versions = f"torch {torch.__version__}, CUDA {torch.version.cuda}"
    if smoke or not torch.cuda.is_available():
        return f"CPU smoke run (no GPU used); {versions}"
    names = Counter(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    major, minor = torch.cuda.get_device_capability()
    gpus = ", ".join(f"{n} x{k}" for n, k in names.items())
    return f"{gpus} (compute capability {major}.{minor}); {versions}"


def table(title: str, rows: list[dict], notes: list[str]) -> str:
    lines = [
        f"difflab GPU check: {title}",
        "",
        "| part | ok | seconds | result |",
        "| --- | --- | --- | --- |",
    ]
    lines += [
        f"| {r['part']} | {'yes' if r['ok'] else 'NO'} | {r['seconds']:.1f} | {r['result']} |" for r in rows
    ]
    return "\n".join(lines + [f"note: {n}" for n in notes])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "logs" / "gpu_check", help="where results go")
    parser.add_argument("--cpu-smoke", action="store_true", help="every part on the CPU, tiny (CI)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {PARTS}")
    args = parser.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    if unknown := [p for p in parts if p not in PARTS]:
        parser.error(f"unknown part(s) {unknown}; choose from {PARTS}")
    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        parser.error("no CUDA GPU is visible; --cpu-smoke runs the CPU parts")
    args.out.mkdir(parents=True, exist_ok=True)
    check = Check(args.out.resolve(), args.cpu_smoke)
    rows = []
    for part in parts:
        t0 = time.perf_counter()
        try:
            result, ok = PART_FUNCTIONS[part](check), True
        except BaseException as e:  # a failed part (SystemExit from a refused start included) is a row
            if isinstance(e, KeyboardInterrupt):
                raise
            result, ok = (
                f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}",
                False,
            )
            traceback.print_exc()
        rows.append({"part": part, "ok": ok, "seconds": time.perf_counter() - t0, "result": result})
    title = device_line(args.cpu_smoke)
    (check.out / "results.json").write_text(json.dumps({"device": title, "rows": rows, "notes": check.notes}))
    print(table(title, rows, check.notes))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
