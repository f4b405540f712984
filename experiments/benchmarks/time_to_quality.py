"""Time to quality under the protocol (PROTOCOL.md / protocol.py): held-out classifier-FID (and KID)
against wall time and optimizer steps for each training recipe, same UNet, data, batch and step budget.

    .venv/bin/python experiments/benchmarks/time_to_quality.py                  # train, evaluate, record
    .venv/bin/python experiments/benchmarks/time_to_quality.py --train-only     # train every (row, seed)
    .venv/bin/python experiments/benchmarks/time_to_quality.py --eval-only      # evaluate what is trained
    .venv/bin/python experiments/benchmarks/time_to_quality.py --report         # RESULTS.md + plot from raw
    .venv/bin/python experiments/benchmarks/time_to_quality.py --steps 40 --eval-every 20 --seeds 0 \
        --num-samples 64 --num-real 256 --work /tmp/ttq_smoke                    # a smoke run

Training: every (row, seed) in ONE invocation, interleaved seed-major (seed 0: every row, seed 1: every
row, ...), so the machine's drift falls on every row alike; each with the real `difflab-train`,
checkpoints every --eval-every steps. The wall time of a point is its checkpoint file's mtime minus the
launch time of its training command (launched.json), start-up included: what a user waits.

Evaluation (lazy, to spare the CPU): `difflab-eval`, DPM-Solver++ at 20 sampler steps (and 10 at the end
of budget), --num-samples images against --num-real held-out images (Fashion-MNIST's test split), KID
beside FID. Per seed: the --target row (the old default, ddpm) at the end of its budget; each --cross row
at increasing steps until the first point at or below the same seed's target (every evaluated point is
recorded, not only the crossing), and at its end; every other row at its end (--skip-eval: the post-hoc
row, which posthoc_ema.py evaluates); and a noise floor: the --noise-row's end checkpoint of one seed
(--noise-run-seed) sampled again with other image seeds (--noise-seeds).

Raw records (raw/time_to_quality.jsonl, via protocol.Recorder): one ``kind="run"`` per trained (row,
seed) with every checkpoint's wall time (kept before any checkpoint is deleted), one ``kind="point"`` per
evaluated (checkpoint, sampler steps, image seed). ``training`` names the training session the wall times
come from: the invocation that trained the run (launched.json), or the work dir for runs trained by
another driver (one work dir = one training session). A crossing ratio divides only times of one session.

--report reads only the raw records and writes the "time_to_quality" block of RESULTS.md and
fid_vs_time.png. --code DIR evaluates (and trains) with the difflab of another source tree (DIR/src, e.g.
the frozen copy the runs were trained from), so edits to this checkout during a long run cannot change the
FID's classifier half-way.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(HERE))

from protocol import (  # noqa: E402
    RAW,
    Interval,
    Recorder,
    claim,
    code_env,
    interleaved,
    interval,
    load,
    machine_line,
    ratio_pairs,
    table,
    write_section,
)

BENCH = "time_to_quality"
# The diffusers example (train_unconditional.py) as difflab overrides: AdamW lr 1e-4, betas (0.95,
# 0.999), weight decay 1e-6, cosine with 500 warm-up steps, clipping at 1.0, linear betas over 1,000
# steps, epsilon prediction, EMA inv_gamma 1.0 / power 0.75 / max decay 0.9999.
DIFFUSERS = [
    "model.optimizer.lr=1e-4",
    "model.optimizer.betas=[0.95,0.999]",
    "model.optimizer.weight_decay=1e-6",
    "model.lr_schedule=cosine",
    "model.warmup_steps=500",
    "trainer.gradient_clip_val=1.0",
    "model.noise_scheduler.beta_schedule=linear",
    "model.noise_scheduler.prediction_type=epsilon",
    "model.ema.inv_gamma=1.0",
    "model.ema.power=0.75",
    "model.ema.max_decay=0.9999",
]
# difflab's default job before issue 14: DDPM (lr 1e-3, 100 warm-up steps, epsilon, uniform timesteps)
# in fp32 (its precision then; today's default picks bf16 where the hardware runs it fast).
OLD_DEFAULT = ["model=ddpm", "trainer.precision=32-true"]
# Each lever alone on "ddpm", the old default, then combined; "default" is whatever the default job is now.
# The _bf16 / _fp32 rows pin the precision, so that a row means the same on every CPU class.
ROWS: dict[str, list[str]] = {
    "baseline": [*OLD_DEFAULT, *DIFFUSERS],  # the example trains in fp32 by default (--mixed_precision no)
    "ddpm": OLD_DEFAULT,
    "default_fp32": ["trainer.precision=32-true"],
    "default_bf16": ["trainer.precision=bf16-mixed"],
    "default": [],
    "posthoc_bf16": ["model/ema=posthoc", "trainer.precision=bf16-mixed"],  # posthoc_ema.py's runs
    "min_snr": [*OLD_DEFAULT, "model.min_snr_gamma=5"],
    "v_pred": [*OLD_DEFAULT, "model.noise_scheduler.prediction_type=v_prediction"],
    "v_pred_min_snr": [
        *OLD_DEFAULT,
        "model.noise_scheduler.prediction_type=v_prediction",
        "model.min_snr_gamma=5",
    ],
    "immiscible": [*OLD_DEFAULT, "model.immiscible=true"],
    "flow_shift1": ["model=flow", "model.noise_scheduler.shift=1.0"],  # sampled without the shift
    "flow_uniform": ["model=flow", "model.noise_levels.density=uniform"],
    "flow_immiscible": ["model=flow", "model.immiscible=true"],
    "flow_lr2x": ["model=flow", "model.optimizer.lr=2e-3"],
    "flow_lr_half": ["model=flow", "model.optimizer.lr=5e-4"],
    "flow_stratified": ["model=flow", "model.noise_levels.stratified=true"],
    "flow_min_snr": ["model=flow", "model.min_snr_gamma=5"],
    "flow_noclip": ["model=flow", "trainer.gradient_clip_val=null"],
    "flow_learned": ["model=flow", "model.learned_weighting=true"],
    "flow_learned_noclip": ["model=flow", "model.learned_weighting=true", "trainer.gradient_clip_val=null"],
    "posthoc": ["model/ema=posthoc"],
}
# The re-measurement of issue 29: the old default (the target), today's default on this CPU (bf16), the
# diffusers recipe, the precision row, and the post-hoc EMA runs posthoc_ema.py reads.
DEFAULT_ROWS = ["ddpm", "default_bf16", "baseline", "default_fp32", "posthoc_bf16"]
SAMPLER = "dpmsolver++"  # samples both objectives (epsilon and flow)
COMPARED, END_STEPS = 20, [20, 10]  # sampler steps along the way; at the end of budget
EVAL_SEED = 1234  # difflab-eval's default image seed; the noise floor adds others
# The FID reference per --data: its test split (held out: a recipe cannot score by copying its training
# set); twemoji has none (its 4,009 emoji leave too few for a held-out reference), so its training images.
HELD_OUT = {"fashion_mnist": "test", "twemoji": None}
GOAL = 1 / 3  # the README's claim: today's default reaches the old default's end FID in a third of its time


# ----------------------------------------------------------------------------------------------- training


def parse_row(spec: str, default_steps: int) -> tuple[str, int]:
    """``ROW`` or ``ROW@STEPS`` -> (row, step budget)."""
    name, _, steps = spec.partition("@")
    if name not in ROWS or (steps and not steps.isdigit()):
        raise ValueError(f"row {spec!r}: expected ROW or ROW@STEPS with ROW one of {list(ROWS)}")
    return name, int(steps) if steps else default_steps


def run_dir(work: Path, spec: str, seed: int) -> Path:
    name, _, steps = spec.partition("@")
    return work / (f"{name}_{steps}steps_seed{seed}" if steps else f"{name}_seed{seed}")


def run_command(args: list[str], cwd: Path, code: str | None) -> None:
    """Run a difflab command quietly; on failure, its last output lines and the command, then stop."""
    out = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=code_env(code))
    if out.returncode:
        tail = "\n".join((out.stdout + out.stderr).strip().splitlines()[-15:])
        sys.exit(f"{tail}\n{' '.join(args)} failed (exit {out.returncode})")


def trained(run: Path, budget: int) -> bool:
    """Trained to the end of its budget: launched.json is written once difflab-train has returned."""
    return (run / "launched.json").is_file() and (run / "checkpoints" / f"step_{budget:07d}.ckpt").is_file()


def train(spec: str, seed: int, opts: argparse.Namespace, work: Path, rec: Recorder) -> None:
    """The row's `difflab-train`; its launch time, invocation and commit kept in launched.json."""
    name, budget = parse_row(spec, opts.steps)
    run = run_dir(work, spec, seed)
    if trained(run, budget):
        return
    if run.exists():
        shutil.rmtree(run)  # a half-finished run: its timings would be wrong
    every = opts.eval_every if budget % opts.eval_every == 0 else budget  # else one point, at its end
    args = [
        f"data={opts.data}",
        *ROWS[name],
        f"seed={seed}",
        f"trainer.max_steps={budget}",
        f"callbacks.model_checkpoint.every_n_train_steps={every}",
        "callbacks.model_checkpoint.save_top_k=-1",
        "callbacks.sample_grid=null",
        "logger=none",
        f"hydra.run.dir={run}",
    ]
    t0 = time.time()
    run_command([str(BIN / "difflab-train"), *args], work, opts.code)
    launched = {"t0": t0, "invocation": rec.invocation, "commit": opts.train_commit}
    (run / "launched.json").write_text(json.dumps(launched))
    print(f"trained {spec} seed {seed}: {time.time() - t0:.0f} s", flush=True)


def checkpoints(run: Path) -> dict[int, Path]:
    ckpts = (run / "checkpoints").glob("step_*.ckpt")
    return dict(sorted((int(c.stem.split("_")[1]), c) for c in ckpts))


# ----------------------------------------------------------------------------------------------- evaluation


class Evaluator:
    """Records every evaluated point once: a point already in the raw file (same training session,
    checkpoint, sampler steps, image seed and sizes) is read back instead of sampled again."""

    def __init__(self, opts: argparse.Namespace, work: Path, rec: Recorder) -> None:
        self.opts, self.work, self.rec = opts, work, rec
        raw = load(BENCH, opts.raw)
        self.done = {self.key(r): r for r in raw if r.get("kind") == "point"}
        self.runs = {(r["training"], r["row"], r["seed"]) for r in raw if r.get("kind") == "run"}

    def key(self, r: dict) -> tuple:
        return tuple(
            r[k]
            for k in (
                "training",
                "row",
                "seed",
                "step",
                "sampler_steps",
                "eval_seed",
                "num_samples",
                "num_real",
            )
        )

    def session(self, spec: str, seed: int) -> tuple[Path, dict, str]:
        run = run_dir(self.work, spec, seed)
        launched = json.loads((run / "launched.json").read_text())
        return run, launched, launched.get("invocation") or f"work:{self.work.resolve()}"

    def record_run(self, spec: str, seed: int) -> None:
        """Every checkpoint's wall time, once per (session, row, seed): the curve survives the weights."""
        run, launched, training = self.session(spec, seed)
        if (training, spec, seed) in self.runs:
            return
        budget = parse_row(spec, self.opts.steps)[1]
        seconds = {str(s): c.stat().st_mtime - launched["t0"] for s, c in checkpoints(run).items()}
        self.rec.record(
            kind="run",
            row=spec,
            seed=seed,
            budget=budget,
            training=training,
            t0=launched["t0"],
            train_commit=launched.get("commit") or self.opts.train_commit,
            checkpoint_seconds=seconds,
            data=self.opts.data,
        )
        self.runs.add((training, spec, seed))

    def left_behind(self, dest: Path, counts: list[int]) -> bool:
        """A results.json an interrupted invocation left for exactly these settings: recorded, not redone."""
        try:
            rows = json.loads((dest / "results.json").read_text())
        except (OSError, ValueError):
            return False
        same = [
            r
            for r in rows
            if r["steps"] in counts and r["num_samples"] == self.opts.num_samples and r["sampler"] == SAMPLER
        ]
        return {r["steps"] for r in same} == set(counts)

    def evaluate(self, ckpt: Path, dest: Path, counts: list[int], eval_seed: int) -> None:
        dest.mkdir(parents=True, exist_ok=True)
        run_command(
            [
                str(BIN / "difflab-eval"),
                f"ckpt={ckpt}",
                f"sampler={SAMPLER}",
                "steps=[" + ",".join(map(str, counts)) + "]",
                f"num_samples={self.opts.num_samples}",
                f"num_real={self.opts.num_real}",
                f"real_split={HELD_OUT[self.opts.data] or 'null'}",
                "kid=true",
                f"seed={eval_seed}",
                f"metrics.cache_dir={self.opts.cache_dir}",
                f"out={dest}",
            ],
            self.work / "eval",
            self.opts.code,
        )

    def point(
        self, spec: str, seed: int, step: int, counts: Sequence[int], eval_seed: int = EVAL_SEED
    ) -> dict:
        """FID (and KID) of (row, seed)'s checkpoint at ``step`` for each sampler-step count; returns
        {count: record}, evaluating only what is not recorded yet."""
        run, launched, training = self.session(spec, seed)
        budget = parse_row(spec, self.opts.steps)[1]
        base = {
            "training": training,
            "row": spec,
            "seed": seed,
            "step": step,
            "eval_seed": eval_seed,
            "num_samples": self.opts.num_samples,
            "num_real": self.opts.num_real,
        }
        out = {c: self.done.get(self.key({**base, "sampler_steps": c})) for c in counts}
        missing = [c for c, r in out.items() if r is None]
        if not missing:
            return out
        ckpt = checkpoints(run)[step]
        mtime = ckpt.stat().st_mtime
        dest = self.work / "eval" / run.name / f"step{step}_seed{eval_seed}_n{self.opts.num_samples}"
        t_eval = time.time()
        if not self.left_behind(dest, missing):
            self.evaluate(ckpt, dest, missing, eval_seed)
        rows = [r for r in json.loads((dest / "results.json").read_text()) if r["steps"] in missing]
        for r in rows:
            fid_key = next(k for k in r if k.startswith("val/fid_"))
            kid_key = next((k for k in r if k.startswith("val/kid_") and not k.endswith("_std")), None)
            rec = self.rec.record(
                kind="point",
                **base,
                sampler=SAMPLER,
                sampler_steps=r["steps"],
                budget=budget,
                seconds=mtime - launched["t0"],
                ckpt_mtime=mtime,
                t0=launched["t0"],
                fid=r[fid_key],
                kid=r.get(kid_key) if kid_key else None,
                kid_std=r.get(f"{kid_key}_std") if kid_key else None,
                fid_key=fid_key,
                extractor=r.get("extractor"),
                real_split=HELD_OUT[self.opts.data],
                num_real_used=r.get("num_real"),
                eval_seconds=r.get("seconds"),
                train_commit=launched.get("commit") or self.opts.train_commit,
                eval_code=self.opts.code_commit,
                data=self.opts.data,
            )
            out[r["steps"]] = self.done[self.key(rec)] = rec
            print(f"{spec} seed {seed} step {step} eval seed {eval_seed}: FID{r['steps']} {rec['fid']:.3f}")
        print(f"  ({time.time() - t_eval:.0f} s)", flush=True)
        return out


def evaluate(seeds: list[int], rows: list[str], ev: Evaluator, opts: argparse.Namespace) -> None:
    """Lazily, the headline first, every seed at each stage: the target's end and each --cross row up to
    its crossing (at the compared sampler steps: the crossing needs nothing else), then every row's end
    at every sampler-step count, then the noise floor."""
    ready, budget = {}, {spec: parse_row(spec, opts.steps)[1] for spec in rows}
    for seed in seeds:
        ready[seed] = [r for r in rows if trained(run_dir(ev.work, r, seed), budget[r])]
        for spec in ready[seed]:  # the checkpoints' wall times, before any checkpoint may be deleted
            ev.record_run(spec, seed)
        if opts.target not in ready[seed]:
            print(f"seed {seed}: {opts.target} is not trained yet; skipped", flush=True)
            ready[seed] = []
    for seed in seeds:
        if not ready[seed]:
            continue
        target = ev.point(opts.target, seed, budget[opts.target], [COMPARED])[COMPARED]["fid"]
        for spec in [r for r in opts.cross if r in ready[seed]]:
            for step in checkpoints(run_dir(ev.work, spec, seed)):
                if ev.point(spec, seed, step, [COMPARED])[COMPARED]["fid"] <= target:
                    break
    for seed in seeds:
        for spec in [r for r in ready[seed] if r not in opts.skip_eval]:
            ev.point(spec, seed, budget[spec], END_STEPS)
    if opts.noise_row in ready.get(opts.noise_run_seed, []):
        for eval_seed in opts.noise_seeds:
            ev.point(opts.noise_row, opts.noise_run_seed, budget[opts.noise_row], [COMPARED], eval_seed)


# ----------------------------------------------------------------------------------------------- report


def campaign_records(records: list[dict]) -> list[dict]:
    """The newest campaign: every training session that trained the newest session's code (training
    commit) on the same data and CPU. End-of-budget quality pools over its sessions (the same code, data
    and seed train the same model whatever hour it ran); wall times are compared only within one session
    (the crossing pairs by session through protocol.ratio_pairs; the precision line says when it cannot)."""
    if not records:
        return []

    def key(r: dict) -> tuple:
        return r.get("train_commit"), r.get("data"), r["machine"]["cpu"], r["machine"]["cores"]

    newest = key(max(records, key=lambda r: r["time"]))
    return [r for r in records if key(r) == newest]


def points(
    records: list[dict], row: str, seed: int, counts: int = COMPARED, eval_seed: int = EVAL_SEED
) -> list[dict]:
    """The row's evaluated points for one seed, by step (the newest record of a point re-evaluated)."""
    by_step = {}
    for r in records:
        if (r["kind"], r["row"], r["seed"], r.get("sampler_steps"), r.get("eval_seed")) == (
            "point",
            row,
            seed,
            counts,
            eval_seed,
        ):
            by_step[r["step"]] = r
    return [by_step[s] for s in sorted(by_step)]


def end_point(records: list[dict], row: str, seed: int, counts: int = COMPARED) -> dict | None:
    pts = [p for p in points(records, row, seed, counts) if p["step"] == p["budget"]]
    return pts[-1] if pts else None


def crossing(records: list[dict], row: str, seed: int, target: float) -> dict | None:
    """The row's first evaluated point at or below ``target``; evaluation is lazy, so every point before
    it was evaluated (the report checks that no checkpoint before it was skipped)."""
    pts = points(records, row, seed)
    hit = next((p for p in pts if p["fid"] <= target), None)
    if hit is None:
        return None
    runs = [r for r in records if r["kind"] == "run" and (r["row"], r["seed"]) == (row, seed)]
    if runs:
        earlier = {int(s) for s in runs[-1]["checkpoint_seconds"] if int(s) < hit["step"]}
        if not earlier <= {p["step"] for p in pts}:
            raise ValueError(f"{row} seed {seed}: checkpoints before step {hit['step']} were not evaluated")
    return hit


def cell(xs: list[float]) -> str:
    xs = [x for x in xs if x is not None]
    return str(interval(xs)) if xs else "-"


def build_report(records: list[dict], target_row: str = "ddpm") -> tuple[str, dict]:
    """The markdown of the "time_to_quality" block and the plot's curves, from raw records alone."""
    records = campaign_records([r for r in records if r.get("bench", BENCH) == BENCH])
    pts = [r for r in records if r["kind"] == "point"]
    if not pts:
        return "Not measured yet under the protocol.", {}
    extractors = {r.get("extractor") for r in pts}
    if len(extractors) > 1:
        raise ValueError(
            f"the points were measured with different FID extractors {sorted(map(str, extractors))}"
        )
    rows = list(dict.fromkeys(r["row"] for r in records if r["kind"] == "run" or r["kind"] == "point"))
    seeds = sorted({r["seed"] for r in pts})
    first = pts[0]
    lines = []
    budgets = ", ".join(map(str, sorted({r["budget"] for r in pts})))
    sessions: dict[str, dict] = {}  # training session -> {(row, seed): launch time}
    for r in records:
        if "t0" in r:
            sessions.setdefault(r["training"], {})[r["row"], r["seed"]] = r["t0"]
    sessions = dict(sorted(sessions.items(), key=lambda kv: min(kv[1].values())))
    trained = "; ".join(
        f"`{name}`: "
        + ", ".join(f"{row} {seed}" for (row, seed), _ in sorted(runs.items(), key=lambda kv: kv[1]))
        for name, runs in sessions.items()
    )
    lines.append(
        f"**Time to quality**, data={first.get('data', 'fashion_mnist')}, {budgets} optimizer steps, "
        f"seeds {seeds}, training commit {first.get('train_commit') or 'unknown'}, trained in "
        f"{len(sessions)} session(s), each in this launch order: {trained}. "
        f"Classifier-FID / KID of {first['num_samples']} {first['sampler']} samples against "
        f"{first.get('num_real_used') or first['num_real']} held-out images "
        f"({first.get('real_split') or 'training images'}), evaluated with commit "
        f"{first.get('eval_code') or '?'}. Each cell: median [interval] over seeds (min-max below 5 seeds). "
        "Wall time = checkpoint mtime minus the training command's launch, start-up included; "
        "the machine was shared with other work during training, so wall times carry that load's "
        "noise; the optimizer-step ratios do not."
    )
    lines.append("")
    lines.append(machine_line(records))
    lines.append("")
    # End of budget, every row.
    header = [
        "row",
        "seeds",
        "FID 20 steps",
        "KID 20 steps",
        "FID 10 steps",
        "KID 10 steps",
        "minutes to end",
    ]
    body = []
    for row in rows:
        ends = {s: end_point(pts, row, s) for s in seeds}
        ends10 = {s: end_point(pts, row, s, 10) for s in seeds}
        have = [s for s in seeds if ends[s]]
        if not have:
            continue
        body.append(
            [
                row,
                len(have),
                cell([ends[s]["fid"] for s in have]),
                cell([ends[s]["kid"] for s in have]),
                cell([ends10[s]["fid"] for s in seeds if ends10[s]]),
                cell([ends10[s]["kid"] for s in seeds if ends10[s]]),
                cell([ends[s]["seconds"] / 60 for s in have]),
            ]
        )
    lines.append("End of budget (each row's last checkpoint):")
    lines.append("")
    lines.append(table(header, body))
    lines.append("")
    # Training time of every trained (row, seed), evaluated or not: from the checkpoints' mtimes, one line
    # per (row, training session): times of different sessions are not pooled.
    runs = {(r["row"], r["training"], r["seed"]): r for r in records if r["kind"] == "run"}
    body = []
    for row, session in dict.fromkeys((row, session) for row, session, _ in runs):
        mine = [runs[key] for key in sorted(k for k in runs if k[:2] == (row, session))]
        ends, rates = [], []
        for r in mine:
            t = {int(k): v for k, v in r["checkpoint_seconds"].items()}
            ends.append(t[r["budget"]] / 60)
            if len(t) > 1:  # steady state: the first checkpoint's start-up left out
                lo = min(t)
                rates.append((t[r["budget"]] - t[lo]) / (r["budget"] - lo) * 100)
        seeds_run = ", ".join(str(r["seed"]) for r in mine)
        body.append([row, f"`{session}`", seeds_run, cell(ends), cell(rates)])
    if body:
        lines.append(
            "Training time of every trained run (checkpoint mtimes; the machine's other load included):"
        )
        lines.append("")
        header = ["row", "session", "seeds", "minutes to the end", "seconds per 100 steps after the first"]
        lines.append(table(header, body))
        lines.append("")
    # Noise floor: one checkpoint, several image seeds.
    noise = [r for r in pts if r["eval_seed"] != EVAL_SEED]
    for row, seed in dict.fromkeys((r["row"], r["seed"]) for r in noise):
        same = [r for r in pts if (r["row"], r["seed"], r["sampler_steps"]) == (row, seed, COMPARED)]
        step = max(r["step"] for r in noise if (r["row"], r["seed"]) == (row, seed))
        fids = {r["eval_seed"]: r["fid"] for r in same if r["step"] == step}
        kids = {r["eval_seed"]: r["kid"] for r in same if r["step"] == step and r["kid"] is not None}
        spread = max(fids.values()) - min(fids.values())
        lines.append(
            f"Noise floor: {row} seed {seed}'s checkpoint at step {step} sampled with image seeds "
            f"{sorted(fids)}: FID {', '.join(f'{fids[k]:.3f}' for k in sorted(fids))} "
            f"(spread {spread:.3f}, {spread / statistics.median(fids.values()):.1%} of the median)"
            + (f"; KID spread {max(kids.values()) - min(kids.values()):.5f}" if len(kids) > 1 else "")
            + ". A FID difference smaller than this is sampling noise, whatever the recipe."
        )
        lines.append("")
    # Crossings: per seed, against the same seed's target end FID and wall time.
    targets = {s: end_point(pts, target_row, s) for s in seeds}
    cross_rows = [
        row
        for row in rows
        if row != target_row and any(p["step"] < p["budget"] for s in seeds for p in points(pts, row, s))
    ]
    if any(targets.values()) and cross_rows:
        header = [
            "row",
            f"per seed: step (minutes) of the first point at or below that seed's {target_row} end FID",
            f"wall time ÷ {target_row}'s",
            "goal < 1/3",
            f"optimizer steps ÷ {target_row}'s",
            "goal < 1/3",
        ]
        body = []
        for row in cross_rows:
            per_seed, numer, denom = [], [], []
            for s in seeds:
                tgt, mine = targets[s], points(pts, row, s)
                if tgt is None or not mine:
                    continue
                hit = crossing(records, row, s, tgt["fid"])
                if hit is None and not any(p["step"] == p["budget"] for p in mine):  # still being evaluated
                    per_seed.append(f"seed {s}: pending (evaluated to step {mine[-1]['step']})")
                    continue
                if hit is None:  # an unreached target counts as infinitely late: never "shown"
                    per_seed.append(f"seed {s}: not reached")
                    numer.append(
                        {"invocation": mine[0]["training"], "seed": s, "wall": math.inf, "steps": math.inf}
                    )
                else:
                    per_seed.append(f"seed {s}: {hit['step']} ({hit['seconds'] / 60:.1f})")
                    numer.append(
                        {
                            "invocation": hit["training"],
                            "seed": s,
                            "wall": hit["seconds"],
                            "steps": hit["step"],
                        }
                    )
                denom.append(
                    {"invocation": tgt["training"], "seed": s, "wall": tgt["seconds"], "steps": tgt["budget"]}
                )
            if not numer:
                continue
            # Paired by seed within one training session: protocol.ratio_pairs refuses anything else.
            iv_w = interval(ratio_pairs(numer, denom, "wall", by="seed"))
            iv_s = interval(ratio_pairs(numer, denom, "steps", by="seed"))
            body.append(
                [
                    row,
                    "; ".join(per_seed),
                    ratio_cell(iv_w),
                    claim(iv_w, GOAL, quality=True),
                    ratio_cell(iv_s),
                    claim(iv_s, GOAL, quality=True),
                ]
            )
        fids = ", ".join(f"seed {s}: {t['fid']:.3f}" for s, t in targets.items() if t)
        lines.append(
            f"Crossing: the first checkpoint (evaluated in order until it reaches the target) whose FID "
            f"at {COMPARED} sampler steps is at or below the same seed's {target_row} end FID ({fids}), "
            f"its wall time divided by that seed's {target_row} time to its end (same training session), "
            f"and its step by {target_row}'s budget. The goal (1/3) is shown only when the whole interval "
            "is below it."
        )
        lines.append("")
        lines.append(table(header, body))
        lines.append("")
    # Precision: end FID bf16 vs fp32 of the default job, paired by seed.
    if {"default_bf16", "default_fp32"} <= set(rows):
        pairs = [(end_point(pts, "default_bf16", s), end_point(pts, "default_fp32", s)) for s in seeds]
        pairs = [(a, b) for a, b in pairs if a and b]
        if pairs:
            diff = [a["fid"] - b["fid"] for a, b in pairs]
            lines.append(
                f"Precision (the default job, end of budget, {COMPARED} sampler steps): bf16-mixed FID "
                f"{cell([a['fid'] for a, _ in pairs])}, 32-true FID {cell([b['fid'] for _, b in pairs])}; "
                f"per-seed difference bf16 - fp32 {cell(diff)}." + timed_together(pairs)
            )
            lines.append("")
    curves = {
        row: {s: [(p["seconds"] / 60, p["step"], p["fid"]) for p in points(pts, row, s)] for s in seeds}
        for row in rows
        if any(points(pts, row, s) for s in seeds)
    }
    return "\n".join(lines).strip(), curves


def timed_together(pairs: list[tuple[dict, dict]]) -> str:
    """The bf16 and fp32 minutes to the end of budget, for the seeds whose two runs shared a training
    session (a wall time is never compared across sessions)."""
    same = [(a, b) for a, b in pairs if a["training"] == b["training"]]
    if not same:
        return " Their wall times are not compared: the two precisions were trained in different sessions."
    return (
        f" Minutes to the end (seeds {', '.join(str(a['seed']) for a, _ in same)}, each pair trained in one "
        f"session): bf16 {cell([a['seconds'] / 60 for a, _ in same])}, "
        f"fp32 {cell([b['seconds'] / 60 for _, b in same])}."
    )


def ratio_cell(iv: Interval) -> str:
    return "not reached (all seeds)" if math.isinf(iv.lo) else str(iv).replace("inf", "not reached")


def plot(curves: dict, path: Path, target_row: str = "ddpm") -> None:
    """FID against wall time and against optimizer steps (load-independent), one line per (row, seed);
    dotted: each seed's target (the target row's end FID)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, x, label in zip(
        axes,
        (0, 1),
        ("wall time (minutes from launch, shared 2-core CPU)", "optimizer steps"),
        strict=True,
    ):
        for i, (row, per_seed) in enumerate(curves.items()):
            for pts in per_seed.values():
                if pts:
                    ax.plot([p[x] for p in pts], [p[2] for p in pts], marker="o", ms=3, color=colors[i % 10])
                    if row == target_row:
                        ax.axhline(pts[-1][2], color=colors[i % 10], linestyle=":", linewidth=0.8)
        ax.set_xlabel(label)
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], color=colors[i % 10], marker="o") for i in range(len(curves))]
    axes[1].legend(handles, list(curves), fontsize=7)
    axes[0].set_ylabel(f"held-out classifier-FID ({SAMPLER}, {COMPARED} steps)")
    fig.suptitle(
        f"one line per seed; points evaluated lazily (in step order up to the {target_row} crossing, and the "
        "end); dotted: each seed's target",
        fontsize=8,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(opts: argparse.Namespace) -> None:
    text, curves = build_report(load(BENCH, opts.raw), opts.target)
    write_section(BENCH, text)
    if curves:
        plot(curves, Path(opts.plot), opts.target)
    print(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--rows", nargs="+", default=DEFAULT_ROWS, help=f"ROW or ROW@STEPS, ROW one of {list(ROWS)}"
    )
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=1000, help="step budget of every run")
    ap.add_argument("--eval-every", type=int, default=100, help="a checkpoint every N steps")
    ap.add_argument("--num-samples", type=int, default=1000, help="generated images per FID")
    ap.add_argument("--num-real", type=int, default=10000, help="held-out images of the reference")
    ap.add_argument("--target", default="ddpm", help="the row whose end FID (per seed) is the target")
    ap.add_argument(
        "--cross",
        nargs="+",
        default=["default_bf16"],
        help="rows evaluated at every checkpoint up to their crossing of the target",
    )
    ap.add_argument(
        "--skip-eval",
        nargs="*",
        default=["posthoc_bf16"],
        help="rows trained here but evaluated elsewhere (posthoc_ema.py evaluates posthoc_bf16)",
    )
    ap.add_argument("--noise-row", default="default_bf16", help="the noise floor's row (at its end)")
    ap.add_argument("--noise-run-seed", type=int, default=0, help="the noise floor run's seed")
    ap.add_argument("--noise-seeds", nargs="*", type=int, default=[1, 2], help="image seeds besides 1234")
    ap.add_argument("--data", default="fashion_mnist", choices=list(HELD_OUT), help="the data= of every run")
    ap.add_argument("--work", default=None, help="run dirs (default /tmp/difflab_ttq_<data>)")
    ap.add_argument(
        "--cache-dir", default=None, help="FID classifier and features (default <work>/eval/fid_cache)"
    )
    ap.add_argument(
        "--code", default=None, help="a difflab source tree to train and evaluate with (its src/)"
    )
    ap.add_argument(
        "--train-commit", default=None, help="the training code's commit, for runs trained elsewhere"
    )
    ap.add_argument("--raw", default=str(RAW), help="raw records dir (a smoke run writes elsewhere)")
    ap.add_argument("--plot", default=str(HERE / "fid_vs_time.png"))
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--report", action="store_true", help="write RESULTS.md's block and the plot from raw")
    mode.add_argument("--train-only", action="store_true", help="train every (row, seed), evaluate nothing")
    mode.add_argument(
        "--eval-only",
        action="store_true",
        help="evaluate the (row, seed) runs already trained, train nothing (safe beside a running driver)",
    )
    opts = ap.parse_args()
    if opts.report:
        return report(opts)
    if opts.steps % opts.eval_every:
        ap.error("--steps must be a multiple of --eval-every")
    for spec in [*opts.rows, *opts.cross]:
        try:
            parse_row(spec, opts.steps)
        except ValueError as err:
            ap.error(str(err))
    if not opts.train_only and opts.target not in opts.rows:  # training alone needs no target
        ap.error(f"--target {opts.target} is not one of --rows")
    work = Path(opts.work or f"/tmp/difflab_ttq_{opts.data}").resolve()
    work.mkdir(parents=True, exist_ok=True)
    opts.cache_dir = opts.cache_dir or str(work / "eval" / "fid_cache")
    code = Path(opts.code).resolve() if opts.code else REPO
    head = subprocess.run(
        ["git", "-C", str(code), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    opts.code_commit = f"{head} ({code})" if opts.code else head
    opts.train_commit = opts.train_commit or (head if not opts.eval_only else None)
    rec = Recorder(BENCH, opts.raw)
    if not opts.eval_only:
        for k, spec in interleaved(opts.rows, len(opts.seeds)):  # seed-major: A B C A B C ...
            train(spec, opts.seeds[k], opts, work, rec)
    if opts.train_only:
        return
    ev = Evaluator(opts, work, rec)
    evaluate(opts.seeds, opts.rows, ev, opts)
    print(f"raw: {rec.path}; tables: {Path(__file__).name} --report")


if __name__ == "__main__":
    main()
