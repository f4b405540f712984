"""Kill -9 campaign: a run killed at many moments and rerun with the same command must end where an
uninterrupted run ends (weights, optimizer state, EMA), to 1e-6 on CPU.

    .venv/bin/python experiments/reliability/kill_campaign.py              # default cases, ~5 min
    .venv/bin/python experiments/reliability/kill_campaign.py --random 10 --seed 1 data.flip=true
    .venv/bin/python experiments/reliability/kill_campaign.py --chained    # 2-3 kills a run, ~40 min
    .venv/bin/python experiments/reliability/kill_campaign.py --chained --variants plain,accumulate

Each case runs `difflab-train` in its own process group with a test callback (tests/helpers.py
`KillAt`) that SIGKILLs the group at the chosen moment, then reruns the *same* command line, which
resumes from the run dir's newest readable checkpoint (ckpt_path=last). Prints a Markdown table.

``--chained`` kills each run two or three times (each rerun resumes from what the killed rerun
wrote, as a job preempted several times does) at epoch ends, inside epochs, during writes and during
the final ``last.ckpt``, with gradient accumulation, DDP on CPU, streaming shards and post-hoc EMA.
Its target is bit-exact: max abs diff 0 in weights, EMA and optimizer; the LR schedule, the loader
state and Lightning's loop counters equal; ``last.ckpt`` at the final step; EMA snapshots equal in bytes.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from tests.helpers import max_abs_diff  # noqa: E402  (the tests' own comparison: one definition)

TRAIN = [str(Path(sys.executable).with_name("difflab-train"))]
# Digits: 1,797 images / batch 64 = 28 steps an epoch; 112 steps = 4 epochs; a checkpoint every 7
# steps puts checkpoints exactly on every epoch boundary (28, 56, 84) as well as inside epochs.
BASE = [
    "experiment=digits",
    "seed=7",
    "trainer.max_steps=112",
    "model.warmup_steps=10",
    "callbacks.model_checkpoint.every_n_train_steps=7",
    "callbacks.sample_grid=null",
    "callbacks.progress_bar=null",
    "logger=none",
    "trainer.enable_model_summary=false",
]
# (step, moment): kill inside an epoch, at an epoch boundary, right after a checkpoint, during a write.
DEFAULT_CASES = [
    (10, "step"),  # inside epoch 0, 3 steps after the checkpoint of step 7
    (28, "step"),  # exactly the end of epoch 0, before its checkpoint is written
    (28, "after_save"),  # epoch boundary, right after the checkpoint
    (35, "during_save"),  # halfway through writing the checkpoint of step 35 (epoch 1)
    (45, "step"),  # inside epoch 1
    (56, "after_save"),  # end of epoch 1
    (70, "during_save"),  # epoch 2, during a write
    (93, "step"),  # inside epoch 3
    (105, "after_save"),  # epoch 3, just after a checkpoint
]


def state(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def where(step: int, per_epoch: int) -> str:
    return f"end of epoch {step // per_epoch - 1}" if step % per_epoch == 0 else f"epoch {step // per_epoch}"


def run(args: list[str], kill: tuple[int, str] | None = None, env: dict | None = None) -> int:
    cmd = [*TRAIN, *args]
    if kill:
        cmd += [
            "+callbacks.kill._target_=tests.helpers.KillAt",
            f"+callbacks.kill.step={kill[0]}",
            f"+callbacks.kill.moment={kill[1]}",
        ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, start_new_session=True)
    if proc.returncode not in (0, -9) and kill is None:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return proc.returncode


def newest_checkpoint_step(run_dir: Path) -> str:
    """The checkpoint the rerun resumes from: its file and step."""
    from difflab.checkpoints import newest_readable

    found = newest_readable(run_dir)
    if found is None:
        return "(none: fresh start)"
    return f"{found[0].name} (step {found[1]['global_step']})"


def kill_and_resume(work: Path, name: str, args: list[str], kill: tuple[int, str]) -> tuple[str, dict]:
    run_dir = work / name
    cmd = [*args, f"hydra.run.dir={run_dir}"]
    rc = run(cmd, kill)
    resumed_from = newest_checkpoint_step(run_dir)
    if rc != -9:
        raise RuntimeError(f"case {name}: the run was not killed (exit {rc})")
    run(cmd)
    return resumed_from, state(run_dir)


# variant: (overrides, chains of (step, moment) kills). Digits: 28 optimizer steps an epoch (14 with
# accumulation over 2), so steps 28, 56, 84 (14, 28, 42, ...) end epochs: a kill one step later resumes
# from an epoch-end checkpoint, and the next kill resumes from one the resumed run wrote.
EPOCH_ENDS_2 = [(29, "step"), (57, "step")]
EPOCH_ENDS_3 = [(29, "step"), (57, "step"), (85, "step")]
INSIDE_3 = [(10, "step"), (45, "step"), (93, "step")]
FINAL_SAVE = [(112, "during_last_save")]
CHAINED: dict[str, tuple[tuple[str, ...], list[list[tuple[int, str]]]]] = {
    "plain": (
        (),
        [
            EPOCH_ENDS_2,
            EPOCH_ENDS_3,
            INSIDE_3,
            [(28, "after_save"), (63, "during_save"), (84, "after_save")],
            [(42, "before_remove"), (57, "step")],  # a top-k deletion cut short, then an epoch end
            FINAL_SAVE,
            [(57, "step"), (112, "during_last_save")],
        ],
    ),
    "accumulate": (
        ("trainer.accumulate_grad_batches=2",),
        [
            [(15, "step"), (29, "step")],
            [(43, "step"), (43, "step")],
            [(15, "step"), (29, "step"), (57, "step")],
            [(20, "step"), (49, "during_save"), (71, "step")],
            FINAL_SAVE,
        ],
    ),
    "ddp_cpu": (("trainer=ddp_cpu", "data.batch_size=32"), [EPOCH_ENDS_2, INSIDE_3, FINAL_SAVE]),
    "streaming": ((), [EPOCH_ENDS_3, [(45, "step"), (70, "during_save")]]),  # shard overrides added
    "posthoc": (("model/ema=posthoc", "model.ema.snapshot_every=5"), [EPOCH_ENDS_2, INSIDE_3]),
}


def with_overrides(base: list[str], extra: list[str] | tuple[str, ...]) -> list[str]:
    """``base`` with ``extra`` appended, dropping base entries whose key ``extra`` sets (Hydra refuses a
    key given twice)."""
    keys = {a.split("=")[0] for a in extra if "=" in a}
    return [a for a in base if a.split("=")[0] not in keys] + list(extra)


def prepare_shards(work: Path) -> list[str]:
    """Digits as LitData shards (small chunks: an epoch crosses many) and the overrides to train on them."""
    out = work / "shards"
    prepare = str(Path(sys.executable).with_name("difflab-prepare"))
    subprocess.run(
        [prepare, "data=digits", f"out={out}", "chunk_bytes=5KB", "num_workers=2"],
        cwd=ROOT, check=True, capture_output=True,
    )  # fmt: skip
    return [
        "data=streaming",
        f"data.source.path={out}",
        "data.resolution=8",
        "data.channels=1",
        "data.num_workers=2",
    ]


def full_state(run_dir: Path) -> dict:
    ckpt = state(run_dir)
    return {
        "ckpt": ckpt,
        "lr": ckpt["lr_schedulers"],
        "loader": ckpt["loops"]["fit_loop"]["state_dict"],
        "loops": ckpt["loops"],
        "snapshots": {p.name: p.read_bytes() for p in sorted(run_dir.glob("ema_snapshots/*"))},
    }


def chained_campaign(variants: list[str], overrides: list[str]) -> None:
    work = Path(tempfile.mkdtemp(prefix="difflab_chained_"))
    try:
        print(f"command: difflab-train {' '.join(with_overrides(BASE, overrides))} <variant overrides>\n")
        print("| variant | kills → resumed from | weights | optimizer | EMA | LR schedule | loader | loops | "
              "snapshots | last.ckpt step |")  # fmt: skip
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        worst, failures = 0.0, 0
        for variant in variants:
            extra, chains = CHAINED[variant]
            extra = (*extra, *prepare_shards(work)) if variant == "streaming" else extra
            args = with_overrides(BASE, [*overrides, *extra])
            max_steps = int(
                next(a for a in reversed(args) if a.startswith("trainer.max_steps=")).split("=")[1]
            )
            run([*args, f"hydra.run.dir={work / variant / 'straight'}"])
            ref = full_state(work / variant / "straight")
            for i, chain in enumerate(chains):
                run_dir = work / variant / f"chain{i}"
                cmd = [*args, f"hydra.run.dir={run_dir}"]
                steps = []
                for kill in chain:
                    rc = run(cmd, kill)
                    if rc != -9:
                        raise RuntimeError(
                            f"{variant} chain {i}: the run was not killed at {kill} (exit {rc})"
                        )
                    steps.append(f"{kill[0]}:{kill[1]} → {newest_checkpoint_step(run_dir)}")
                run(cmd)
                got = full_state(run_dir)
                d = max_abs_diff(ref["ckpt"], got["ckpt"])
                same = {k: ref[k] == got[k] for k in ("lr", "loader", "loops", "snapshots")}
                final = got["ckpt"]["global_step"]
                worst = max(worst, d["weights"], d["optimizer"], d["ema"])
                failures += (not all(same.values())) + (final != max_steps)
                cells = ["equal" if same[k] else "DIFFER" for k in same]
                snaps = f"{cells[3]} ({len(got['snapshots'])})" if ref["snapshots"] else "-"
                print(
                    f"| {variant} | {'; '.join(steps)} | {d['weights']:.1e} | {d['optimizer']:.1e} | "
                    f"{d['ema']:.1e} | {cells[0]} | {cells[1]} | {cells[2]} | {snaps} | {final} |",
                    flush=True,
                )
        verdict = "PASS" if worst == 0 and not failures else "FAIL"
        print(
            f"\nworst max abs diff: {worst:.1e}; state mismatches: {failures} ({verdict}: bit-exact target)"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--random", type=int, default=0, help="add this many random (step, moment) cases")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random cases")
    parser.add_argument("--cases", default="", help="only these cases, e.g. 28:step,35:during_save")
    parser.add_argument("--chained", action="store_true", help="2-3 kills per run (see above)")
    parser.add_argument("--variants", default=",".join(CHAINED), help="with --chained: these variants")
    parser.add_argument("overrides", nargs="*", help="extra difflab-train overrides for every run")
    opts = parser.parse_args()
    if opts.chained:
        chained_campaign(opts.variants.split(","), opts.overrides)
        return
    args = [*BASE, *opts.overrides]
    max_steps = int(next(a for a in reversed(args) if a.startswith("trainer.max_steps=")).split("=")[1])
    # Optimizer steps per epoch, for the table (digits: 28 batches of 64).
    accumulate = [int(a.split("=")[1]) for a in args if a.startswith("trainer.accumulate_grad_batches=")]
    per_epoch = 28 // (accumulate[-1] if accumulate else 1)
    rng = random.Random(opts.seed)
    cases = list(DEFAULT_CASES)
    if opts.cases:
        cases = [(int(c.split(":")[0]), c.split(":")[1]) for c in opts.cases.split(",")]
    moments = ("step", "after_save", "during_save")
    every = int(next(a for a in reversed(args) if "every_n_train_steps=" in a).split("=")[1])
    for _ in range(opts.random):
        moment = rng.choice(moments)
        # a save moment needs a step that writes a checkpoint (every `every` steps)
        step = rng.randrange(every, max_steps, every) if moment != "step" else rng.randrange(1, max_steps)
        cases.append((step, moment))

    work = Path(tempfile.mkdtemp(prefix="difflab_kill_"))
    try:
        run([*args, f"hydra.run.dir={work / 'straight'}"])
        reference = state(work / "straight")
        print(f"command: difflab-train {' '.join(args)}\n")
        print("| kill at step | moment | resumed from | weights | optimizer | EMA |")
        print("| --- | --- | --- | --- | --- | --- |")
        worst = 0.0
        for i, (step, moment) in enumerate(cases):  # i: a random case may repeat a default one
            resumed_from, final = kill_and_resume(work, f"kill{i}_{step}_{moment}", args, (step, moment))
            d = max_abs_diff(reference, final)
            assert final["global_step"] == reference["global_step"], (final["global_step"], reference)
            worst = max(worst, d["weights"], d["optimizer"], d["ema"])
            print(
                f"| {step} ({where(step, per_epoch)}) | {moment} | {resumed_from} | {d['weights']:.1e} | "
                f"{d['optimizer']:.1e} | {d['ema']:.1e} |",
                flush=True,
            )
        print(f"\nworst max abs diff: {worst:.1e} ({'PASS' if worst <= 1e-6 else 'FAIL'}: limit 1e-6)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
