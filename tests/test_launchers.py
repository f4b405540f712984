"""The launch paths multi-GPU users run, on CPU with gloo: Lightning's subprocess launcher under a -m
sweep (trainer=ddp_cpu is strategy=ddp), torchrun, SLURM's variables (faked) and the submitit
launcher; every rank of a job, and every requeue of it, in the same run dir; bad launches refused
at start-up in one line."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest

from difflab.checkpoints import load_checkpoint
from tests.conftest import FAST_DIGITS
from tests.helpers import BIN, ROOT, difflab_cli, train_cli

# A console-script run that finishes in seconds (FAST_DIGITS; the trainer group chooses the devices).
FAST_CLI = (
    *(o for o in FAST_DIGITS if not o.startswith(("trainer.devices", "trainer.accelerator"))),
    "trainer.max_steps=3",
)


def _env(**extra: str) -> dict[str, str]:
    """This process's environment without any launcher's variables, plus ``extra``."""
    launcher = ("SLURM_", "TORCHELASTIC_", "DIFFLAB_", "SUBMITIT_")
    ranks = (
        "RANK",
        "LOCAL_RANK",
        "WORLD_SIZE",
        "LOCAL_WORLD_SIZE",
        "MASTER_ADDR",
        "MASTER_PORT",
        "NODE_RANK",
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(launcher) and k not in ranks}
    return {**env, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **extra}


def test_sweep_under_ddp_runs_each_job_once_with_every_rank_in_its_dir(tmp_path):
    """-m with 2 values x trainer=ddp_cpu (Lightning's subprocess launcher): 2 jobs, each with both
    ranks in the job's own dir. Before, each started rank ran the whole sweep again (its sys.argv),
    and the second job found LOCAL_RANK left set by the first, started no rank and failed."""
    logs = tmp_path / "logs"
    p = train_cli("-m", *FAST_CLI, "trainer=ddp_cpu", "seed=1,2", f"paths.log_dir={logs}", cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("Launching 2 jobs") + p.stderr.count("Launching 2 jobs") == 1
    assert sorted(d.name for d in logs.iterdir()) == ["multiruns"]  # no run of a rank elsewhere
    (sweep,) = (logs / "multiruns").iterdir()
    assert sorted(d.name for d in sweep.iterdir() if d.is_dir()) == ["0", "1"]
    for job, seed in (("0", 1), ("1", 2)):
        ckpt = load_checkpoint(sweep / job / "checkpoints" / "last.ckpt")
        assert ckpt["global_step"] == 3 and ckpt["difflab"]["config"]["seed"] == seed
        # Both ranks log where they run (rank 1 into the job's log file too).
        log = (sweep / job / "train.log").read_text()
        assert log.count(f"run dir: {sweep / job}\n") == 2, log


# Each rank process resolves the run and sweep dirs of conf/hydra/default.yaml (hydra.run.dir,
# hydra.sweep.dir) with difflab's resolvers, as difflab-train started in its environment would, and
# prints them as one JSON line (without composing the whole config: 2 cores, many processes).
PROBE = """
import json, os, sys
from omegaconf import OmegaConf
from difflab import config
OmegaConf.register_new_resolver("difflab_run_dir", config.run_dir_once)
OmegaConf.register_new_resolver("difflab_unique", config.unique_suffix)
hydra = OmegaConf.to_container(OmegaConf.load(config.CONF_DIR + "/hydra/default.yaml"))  # unresolved
cfg = OmegaConf.create({"paths": {"log_dir": sys.argv[1]}, "ckpt_path": "last", "hydra": hydra})
line = json.dumps([cfg.hydra.run.dir, cfg.hydra.sweep.dir])
if len(sys.argv) > 2:  # torchrun: one file per rank (the ranks' prints can interleave)
    open(sys.argv[2] + "." + os.environ["RANK"], "w").write(line)
print(line)
"""


def _probe(tmp_path: Path, *envs: dict[str, str]) -> list[list[str]]:
    """The dirs resolved by one process per environment, all started at once (as ranks are)."""
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(tmp_path / "logs")],
            env=_env(**env),
            stdout=subprocess.PIPE,
            text=True,
            cwd=tmp_path,
        )
        for env in envs
    ]
    return [json.loads(p.communicate(timeout=120)[0].strip().splitlines()[-1]) for p in procs]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("standalone", [True, False])
def test_torchrun_ranks_resolve_the_same_dirs(tmp_path, standalone):
    """``torchrun --nproc_per_node 2``: both ranks resolve one run dir and one sweep dir (before,
    each drew its own random suffix). --standalone gives a run id; without --rdzv-id the id is
    "none" and the agent, the ranks' common parent, names the job."""
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    how = ["--standalone"] if standalone else [f"--master-port={_free_port()}"]
    p = subprocess.run(
        [str(BIN / "torchrun"), "--nproc_per_node=2", *how, str(script), str(tmp_path / "logs"), "dirs"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=180,
        cwd=tmp_path,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    dirs = [json.loads((tmp_path / f"dirs.{rank}").read_text()) for rank in (0, 1)]
    assert len(dirs) == 2 and dirs[0] == dirs[1], dirs
    assert all(Path(d).name.startswith("torchrun_") for d in dirs[0])


@pytest.mark.slow  # ~17 s on 2 idle cores; test_torchrun_ranks_resolve_the_same_dirs is the quick check
def test_torchrun_trains_both_ranks_in_one_run_dir(tmp_path):
    """``torchrun --nproc_per_node 2 --standalone difflab-train trainer=ddp_cpu``: Lightning sees
    torchrun's ranks (no subprocess launch), and both run in one run dir named after the run id."""
    logs = tmp_path / "logs"
    p = subprocess.run(
        [str(BIN / "torchrun"), "--nproc_per_node=2", "--standalone", str(BIN / "difflab-train"),
         *FAST_CLI, "trainer=ddp_cpu", f"paths.log_dir={logs}"],
        env=_env(), capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    (run,) = (logs / "runs").iterdir()
    assert run.name.startswith("torchrun_")
    assert load_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == 3
    assert (run / "train.log").read_text().count(f"run dir: {run}\n") == 2


def test_slurm_tasks_array_tasks_and_requeues_resolve_the_same_dirs(tmp_path):
    """Faked SLURM variables: the 2 tasks of a job resolve one run dir and one sweep dir, and so does
    the job requeued (same job id); an array task one named by its array job and task id, shared by
    its tasks (before, an array task's processes each drew a random name)."""
    job = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "2", "SLURM_JOB_NAME": "train"}
    array = {**job, "SLURM_ARRAY_JOB_ID": "4200", "SLURM_JOB_ID": "4243"}
    task0, task1, requeued, a3, a3b = _probe(
        tmp_path,
        {**job, "SLURM_PROCID": "0"},
        {**job, "SLURM_PROCID": "1"},
        {**job, "SLURM_PROCID": "0", "SLURM_RESTART_COUNT": "1"},
        {**array, "SLURM_ARRAY_TASK_ID": "3", "SLURM_PROCID": "0"},
        {**array, "SLURM_ARRAY_TASK_ID": "3", "SLURM_PROCID": "1"},
    )
    logs = tmp_path / "logs"
    assert task0 == task1 == requeued == [str(logs / "runs/slurm_4242"), str(logs / "multiruns/slurm_4242")]
    assert a3 == a3b == [str(logs / "runs/slurm_4200_3"), str(logs / "multiruns/slurm_4200_3")]


def test_outside_a_launcher_each_process_names_its_own_dirs(monkeypatch, tmp_path):
    from difflab import config

    for name in [k for k in os.environ if k.startswith(("SLURM_", "TORCHELASTIC_", "DIFFLAB_"))]:
        monkeypatch.delenv(name)
    names = set()
    for _ in range(2):  # as two processes would: nothing cached, nothing passed on
        config.own_suffix.cache_clear()
        monkeypatch.delenv(config.UNIQUE_VARIABLE, raising=False)
        names.add((config.new_run_dir(str(tmp_path)), config.unique_suffix()))
    config.own_suffix.cache_clear()
    assert len(names) == 2


class RecordEnvironment(L.Callback):
    """Writes the job process's environment to ``path`` (what a requeue of the job runs with: SLURM
    keeps a job's environment from its submission)."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def setup(self, trainer, pl_module, stage) -> None:
        self.path.write_text(json.dumps(dict(os.environ)))


def test_submitit_job_and_its_requeue_run_in_the_sweep_dir(tmp_path):
    """hydra/launcher=submitit_local: the job process resolves the sweep config again; it runs in the
    sweep dir the launcher made (before, a new random one), and rerunning its submission with its own
    environment (a requeue) finds the same dir and resumes from last.ckpt."""
    logs, record = tmp_path / "logs", tmp_path / "env.json"
    p = train_cli(
        "-m",
        "hydra/launcher=submitit_local",
        *FAST_CLI,
        "trainer=cpu",
        "seed=1",
        f"paths.log_dir={logs}",
        "+callbacks.env._target_=tests.test_launchers.RecordEnvironment",
        f"+callbacks.env.path={record}",
        cwd=tmp_path,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    (sweep,) = (logs / "multiruns").iterdir()
    assert load_checkpoint(sweep / "0" / "checkpoints" / "last.ckpt")["global_step"] == 3
    (job,) = [d for d in (sweep / ".submitit").iterdir() if (d / f"{d.name}_submitted.pkl").is_file()]
    # The requeue: submitit's own entry point on the job's folder, in the job's environment.
    env = json.loads(record.read_text())
    again = subprocess.run(
        [sys.executable, "-m", "submitit.core._submit", str(job)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert list((logs / "multiruns").iterdir()) == [sweep]
    log = (sweep / "0" / "train.log").read_text()
    assert f"resuming from {sweep / '0' / 'checkpoints' / 'last.ckpt'}" in log, log[-2000:]


# ------------------------------------------------------------------------------------------ bad input
def _refused(tmp_path: Path, *args: str, env: dict[str, str] | None = None, flags: tuple = ()) -> str:
    logs, env = f"paths.log_dir={tmp_path / 'logs'}", _env(**(env or {}))
    p = difflab_cli("train", *flags, *FAST_CLI, logs, *args, env=env, cwd=tmp_path, timeout=120)
    assert p.returncode == 2, p.stderr[-3000:]
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("difflab: error: "), p.stderr[-3000:]
    assert not (tmp_path / "logs").exists()
    return lines[0]


def test_srun_with_other_num_nodes_is_refused(tmp_path):
    slurm = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2", "SLURM_NNODES": "2", "SLURM_JOB_NAME": "train"}
    line = _refused(tmp_path, "trainer=ddp_cpu", env=slurm)
    assert "trainer.num_nodes=1" in line and "give trainer.num_nodes=2" in line


def test_gpu_without_cuda_is_refused(tmp_path):
    line = _refused(tmp_path, "trainer=gpu")
    assert "trainer.accelerator=gpu" in line or "CUDA" in line, line


def test_sweep_with_ddp_under_submitit_local_is_refused(tmp_path):
    line = _refused(tmp_path, "hydra/launcher=submitit_local", "trainer=ddp_cpu", "seed=1,2", flags=("-m",))
    assert "hydra/launcher=submitit_local" in line


def test_several_submitit_local_tasks_are_refused(tmp_path):
    line = _refused(
        tmp_path,
        "hydra/launcher=submitit_local",
        "hydra.launcher.tasks_per_node=2",
        "seed=1,2",
        flags=("-m",),
    )
    assert "hydra.launcher.tasks_per_node=2" in line


def test_more_gpus_than_there_are_is_refused(make_cfg, monkeypatch):
    import torch

    from difflab.launch import launch_problems

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    cfg = make_cfg("trainer=ddp", "trainer.devices=4")
    (line,) = launch_problems(cfg)
    assert line.startswith("trainer.devices=4 asks for 4 GPUs and this machine has 2; give trainer.devices=2")
    assert launch_problems(make_cfg("trainer=ddp", "trainer.devices=2")) == []


def test_a_rank_that_cannot_write_the_shared_run_dir_stops_in_one_line(tmp_path):
    """A rank a launcher started (here: torchrun's variables for rank 1) on a node where the run dir
    cannot be written: one line at start-up, before it joins the others (whose launcher then stops
    them), nothing written."""
    (tmp_path / "file").write_text("")
    env = {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "x"}
    line = _refused(tmp_path, f"hydra.run.dir={tmp_path / 'file' / 'run'}", env=env)
    assert "cannot be created" in line and "hydra.run.dir" in line, line


def test_ddp_called_in_process_is_refused_not_rerun(make_cfg, tmp_path):
    """train() with trainer=ddp_cpu in-process: Lightning would rerun this process's command line
    (pytest's) for rank 1; one line instead, saying to use difflab-train or trainer=ddp_spawn_cpu."""
    from difflab.errors import DifflabError
    from difflab.train import train

    cfg = make_cfg(*FAST_DIGITS, "trainer=ddp_cpu", "trainer.devices=2", "trainer.max_steps=1")
    with pytest.raises(DifflabError, match=r"not started by difflab-train.*trainer=ddp_spawn_cpu"):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()
