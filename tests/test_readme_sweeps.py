"""The README's multirun, sweep, sampling, evaluation and export command lines, run as written
from a fresh directory."""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import pytest

from difflab.checkpoints import load_checkpoint
from tests.helpers import ROOT, difflab_cli


def readme_commands(command: str = "train") -> list[list[str]]:
    """Every `difflab-<command>` line of the README's bash blocks (continuations joined, comments cut)."""
    text = (ROOT / "README.md").read_text()
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith(f"difflab-{command} "):
                lines.append(shlex.split(line)[1:])
    return lines


def sweep_lines() -> dict[str, list[str]]:
    found = {}
    for args in readme_commands():
        if "hparams_search=optuna" in args:
            found["optuna"] = args
        elif "-m" in args and "hydra/launcher=slurm" in args:
            found["slurm"] = args
        elif "-m" in args:
            found["multirun"] = args
    return found


def test_the_readme_shows_the_sweeps_tested_here():
    assert set(sweep_lines()) == {"optuna", "slurm", "multirun"}


def test_readme_multirun_line_as_written(tmp_path):
    args = sweep_lines()["multirun"]
    p = difflab_cli("train", *args, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    (sweep,) = (tmp_path / "logs" / "multiruns").iterdir()
    ckpts = [load_checkpoint(sweep / job / "checkpoints" / "last.ckpt") for job in ("0", "1")]
    lrs = sorted(c["difflab"]["config"]["model"]["optimizer"]["lr"] for c in ckpts)
    assert lrs == [0.001, 0.002] and {c["global_step"] for c in ckpts} == {200}


def _study(tmp_path: Path):
    import optuna

    return optuna.load_study(
        study_name="difflab_train", storage=f"sqlite:///{tmp_path / 'logs' / 'optuna.db'}"
    )


def test_readme_optuna_line_runs_and_a_rerun_proposes_new_points(tmp_path):
    # The README line with cheap overrides appended (later overrides win): 2 trials of 20 steps, each
    # ending with a 200-sample FID from a 1-epoch classifier.
    cheap = ["callbacks.fid.num_samples=200", "metrics.extractor.epochs=1"]
    args = [*sweep_lines()["optuna"], "hydra.sweeper.n_trials=2", "trainer.max_steps=20", *cheap]
    for _ in range(2):
        p = difflab_cli("train", *args, cwd=tmp_path)
        assert p.returncode == 0, p.stderr[-3000:]
    trials = _study(tmp_path).trials
    assert len(trials) == 4 and all(t.value is not None and t.value > 0 for t in trials)
    first, second = [t.params for t in trials[:2]], [t.params for t in trials[2:]]
    assert not any(p in first for p in second), (first, second)  # the rerun continued, not replayed


@pytest.mark.slow
def test_readme_optuna_line_verbatim(tmp_path):
    p = difflab_cli("train", *sweep_lines()["optuna"], cwd=tmp_path, timeout=1800)
    assert p.returncode == 0, p.stderr[-3000:]
    assert len(_study(tmp_path).trials) == 20


def test_readme_slurm_line_composes(tmp_path):
    # Submitting needs sbatch; `--cfg hydra` (instead of -m) composes the same line without submitting.
    args = ["--cfg", "hydra", *(a for a in sweep_lines()["slurm"] if a != "-m")]
    p = difflab_cli("train", *args, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "SlurmLauncher" in p.stdout and "partition: gpu" in p.stdout and "gpus_per_node: 8" in p.stdout


def test_readme_sample_eval_export_lines_as_written(tmp_path, trained_runs):
    from tests.conftest import POSTHOC_22

    # A post-hoc EMA run, so the ema_std= lines have snapshots to reconstruct from (a copy: the
    # commands read the shared run in its place, logs/runs/<run>).
    shutil.copytree(trained_runs(*POSTHOC_22), tmp_path / "logs" / "runs" / "r1")
    # (the MeanFlow lines: tests/test_meanflow.py, on a MeanFlow run; the autoguidance lines:
    # tests/test_guidance.py, on a run with the step it names)
    lines = {
        c: [
            a for a in readme_commands(c) if "sampler=meanflow" not in a and not any("guide=" in x for x in a)
        ]
        for c in ("sample", "eval", "export")
    }
    assert [len(v) for v in lines.values()] == [2, 3, 2]
    for command, found in lines.items():
        for args in found:
            args = [a.replace("<run>", "r1") for a in args]
            # eval lines with a cheap override appended (later overrides win): 100 samples per FID
            # instead of 1,000, as in the optuna test (the line itself is parsed and run as written)
            cheap = ["num_samples=100"] if command == "eval" else []
            p = difflab_cli(command, *args, *cheap, cwd=tmp_path)
            assert p.returncode == 0, (command, args, p.stderr[-3000:])
    assert len(list((tmp_path / "samples").glob("*.png"))) == 65  # 64 images + grid.png
    rows = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert [(r["sampler"], r["steps"]) for r in rows] == [
        (s, n) for s in ("dpmsolver++", "unipc") for n in (10, 20, 50)
    ]
    sweep = sorted(p for p in (tmp_path / "eval_sweep").iterdir() if p.is_dir())
    jobs = [p.name.removeprefix("num_samples=100,") for p in sweep]
    assert jobs == [f"sampler={s},steps={n}" for s in ("dpmsolver++", "unipc") for n in (10, 20)]
    assert all((p / "results.json").is_file() for p in sweep)
    assert (tmp_path / "exported" / "fashion-flow" / "model_index.json").is_file()
    assert (tmp_path / "exported" / "fashion-phema" / "model_index.json").is_file()
    assert (tmp_path / "ema_sweep" / "fid_vs_ema.png").is_file()
    assert len(list((tmp_path / "samples_ema").glob("*.png"))) == 65


def test_readme_error_examples_are_what_the_commands_print(tmp_path):
    """The README's block of `$ difflab-...` lines and their errors: each run as the installed script
    (in a fresh process: in-process, earlier tests' global state adds problems), its one line compared."""
    text = (ROOT / "README.md").read_text()
    block = text.split("A mistake is one line naming the key", 1)[1].split("```text", 1)[1].split("```", 1)[0]
    lines = [ln for ln in block.strip().splitlines() if ln]
    pairs = list(zip(lines[::2], lines[1::2], strict=True))
    assert len(pairs) >= 4
    (tmp_path / "last.ckpt").write_bytes(b"")  # the user's checkpoint the sample line names
    for cmd, shown in pairs:
        program, *args = cmd.removeprefix("$ ").split()
        p = difflab_cli(program.removeprefix("difflab-"), *args, cwd=tmp_path)
        assert p.returncode == 2 and p.stderr.strip().splitlines() == [shown], (cmd, p.stderr)
