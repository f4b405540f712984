"""difflab as an installed package, not a checkout: the wheel ships its configs (conf/ and the experiment
recipes), trains from an empty directory, and takes a user's own config directory through Hydra's search
path (an experiment of their own, no fork): the README's "As an installed package" lines, run as written."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def readme_package_block() -> str:
    """The bash block of the README's "As an installed package" section, as written."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### As an installed package") :]
    return re.search(r"```bash\n(.*?)```", section, flags=re.S)[1]


def run(args: list, **kw: object) -> subprocess.CompletedProcess:
    out = subprocess.run([str(a) for a in args], capture_output=True, text=True, **kw)
    assert out.returncode == 0, f"{' '.join(map(str, args))}\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    return out


def test_the_wheel_trains_from_an_empty_directory_with_a_users_own_experiment(tmp_path):
    # Built from a copy: setuptools builds in the source tree (build/, *.egg-info), never in the checkout.
    src = tmp_path / "source"
    src.mkdir()
    for part in ("pyproject.toml", "README.md", "src", "conf", "experiments"):
        if (ROOT / part).is_dir():
            shutil.copytree(
                ROOT / part, src / part, symlinks=True, ignore=shutil.ignore_patterns("__pycache__")
            )
        else:
            shutil.copy(ROOT / part, src / part)
    dist = tmp_path / "dist"
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", dist, src])
    (wheel,) = dist.glob("difflab-*.whl")
    # A fresh venv whose only difflab is the wheel; its dependencies come from this venv's site-packages
    # through one path line (not a site dir: the checkout's editable-install hook there stays inert).
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv])
    purelib = Path(
        run(
            [venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]
        ).stdout.strip()
    )
    (purelib / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            venv / "bin" / "python",
            "install",
            "-q",
            "--no-deps",
            wheel,
        ]
    )

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DIFFLAB_CONF_DIR")}
    where = run([venv / "bin" / "python", "-c", "import difflab; print(difflab.__file__)"], env=env).stdout
    assert where.startswith(str(venv)), where  # the wheel's copy, not this checkout

    # The README's lines, verbatim, from an empty directory with the venv's commands first on PATH.
    empty = tmp_path / "empty"
    empty.mkdir()
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env['PATH']}"
    run(["bash", "-euc", readme_package_block()], cwd=empty, env=env)
    (ckpt_path,) = (empty / "logs" / "runs").glob("*/checkpoints/last.ckpt")
    ckpt = torch.load(ckpt_path, weights_only=True)
    assert ckpt["global_step"] == 2
    assert ckpt["difflab"]["unet_config"]["block_out_channels"] == [16, 32]  # the tiny UNet, from the wheel
    assert ckpt["difflab"]["config"]["paths"]["data_dir"] == str(empty / "data_cache")
