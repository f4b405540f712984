"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion
Models", EDM2): track a few power-function EMA profiles while training, snapshot them now and then,
and after training reconstruct the EMA of any length from the snapshots by a small least-squares solve.

The math, with t the optimizer step (1-based) and σ_rel the EMA length relative to the training time:

* A power-function EMA averages the weights θ_τ seen up to step t with density
  p_{t,γ}(τ) = (γ+1) τ^γ / t^(γ+1) on 0 ≤ τ ≤ t. Its standard deviation relative to t is
  σ_rel = sqrt((γ+1) / ((γ+2)² (γ+3)))  (EDM2 eq. 123); given σ_rel, γ is the largest real root of
  γ³ + 7γ² + (16 − σ_rel⁻²)γ + (12 − σ_rel⁻²) = 0  (eq. 126, the same relation squared and expanded).
* Tracked step by step it is θ̂_t = β_t θ̂_(t−1) + (1 − β_t) θ_t with β_t = (1 − 1/t)^(γ+1)  (eq. 127):
  β_1 = 0 (the average starts at the weights), and the average lengthens as training goes on.
* Two profiles' inner product has a closed form. For t_a ≤ t_b,
  ⟨p_a, p_b⟩ = ∫_0^t_a (γ_a+1)(γ_b+1) τ^(γ_a+γ_b) / (t_a^(γ_a+1) t_b^(γ_b+1)) dτ
             = (γ_a+1)(γ_b+1) / ((γ_a+γ_b+1) t_b) · (t_a/t_b)^γ_b          (eq. 151),
  and symmetrically for t_a > t_b.
* Reconstruction: the snapshots are profiles p_i (one per tracked σ_rel per snapshot step). The
  wanted profile p_* is approximated by Σ x_i p_i with x minimising ‖Σ x_i p_i − p_*‖²: the normal
  equations A x = b with A_ij = ⟨p_i, p_j⟩, b_i = ⟨p_i, p_*⟩ (EDM2 algorithm 3). x is rescaled to
  sum to 1 (an average of averages stays an average), and the weights are Σ x_i θ̂_i. Asking for a
  tracked profile at a snapshot step gives x = e_i: that snapshot's weights themselves.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch

from difflab.cadence import due
from difflab.errors import DifflabError
from difflab.files import atomic_write
from difflab.rules import AtLeast, Between

# The σ_rel a reconstruction may ask for: EDM2 found the optimum between 0.03 and 0.2 for its runs;
# far outside the tracked lengths the least-squares fit degrades.
STD_RANGE = (0.01, 0.25)
EMAStd = Annotated[float, Between(*STD_RANGE)]
SNAPSHOT = re.compile(r"^phema_(\d{7,})\.safetensors$")


# ------------------------------------------------------------------------------------------ math
def exponent(std: float) -> float:
    """γ of the power function whose relative standard deviation is ``std`` (largest real root, eq. 126)."""
    s = float(std) ** -2
    roots = np.roots([1.0, 7.0, 16.0 - s, 12.0 - s])
    return float(roots.real[np.abs(roots.imag) < 1e-9].max())


def relative_std(gamma: float) -> float:
    """σ_rel of the power function with exponent γ (eq. 123)."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def beta(gamma: float, t: int) -> float:
    """The decay applied at optimizer step ``t`` (1-based) to track p_{t,γ} (eq. 127)."""
    return (1.0 - 1.0 / t) ** (gamma + 1)


def inner_products(t_a: np.ndarray, g_a: np.ndarray, t_b: np.ndarray, g_b: np.ndarray) -> np.ndarray:
    """⟨p_{t_a,γ_a}, p_{t_b,γ_b}⟩ for broadcast arrays (eq. 151; see the module docstring)."""
    t_a, g_a, t_b, g_b = (np.asarray(x, dtype=np.float64) for x in (t_a, g_a, t_b, g_b))
    ratio = np.where(t_a <= t_b, t_a / t_b, t_b / t_a)
    power = np.where(t_a <= t_b, g_b, g_a)
    return (g_a + 1) * (g_b + 1) / ((g_a + g_b + 1) * np.maximum(t_a, t_b)) * ratio**power


def coefficients(
    in_steps: Sequence[int], in_stds: Sequence[float], out_step: int, out_std: float
) -> np.ndarray:
    """The weights x_i of each input profile (step, σ_rel) in the least-squares fit of (out_step, out_std)."""
    t = np.asarray(in_steps, dtype=np.float64)
    g = np.asarray([exponent(s) for s in in_stds])
    a = inner_products(t[:, None], g[:, None], t[None, :], g[None, :])
    b = inner_products(t, g, np.float64(out_step), np.float64(exponent(out_std)))
    x = np.linalg.lstsq(a, b, rcond=None)[0]  # lstsq: A is near-singular when snapshots crowd together
    return x / x.sum()


# ------------------------------------------------------------------------------------------ tracking
class PowerFunctionEMA:
    """Power-function EMA profiles of a model's weights, one per ``stds`` entry, with periodic snapshots.

    Used like diffusers' ``EMAModel`` by the LightningModule (``step``, ``copy_to``, ``state_dict``):
    ``copy_to`` and ``shadow_params`` give the ``sample_std`` profile, which the sample grids and FID
    callbacks use during training. Every ``snapshot_every`` optimizer steps ``write_snapshot`` saves
    all profiles to ``<snapshot_dir>/phema_<step>.safetensors`` (rank 0 only; the LightningModule calls it).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        snapshot_dir: str,
        stds: Sequence[EMAStd] = (0.05, 0.10),
        snapshot_every: Annotated[int, AtLeast(1)] = 100,
        sample_std: EMAStd | None = None,
        snapshot_dtype: Literal["float32", "float16", "bfloat16"] = "float16",
        foreach: bool = True,
    ) -> None:
        if problems := self.settings_problems({"stds": stds, "sample_std": sample_std}):
            raise DifflabError("; ".join(f"model.ema.{p}" for p in problems))
        self.stds = [float(s) for s in stds]
        self.gammas = [exponent(s) for s in self.stds]
        chosen = self.stds[-1] if sample_std is None else float(sample_std)
        self.sample_index = self.stds.index(chosen)
        self.snapshot_dir, self.snapshot_every, self.foreach = Path(snapshot_dir), snapshot_every, foreach
        self.snapshot_dtype = getattr(torch, snapshot_dtype)
        params = list(model.parameters())
        self.names = [n for n, _ in model.named_parameters()]
        # Without diffusers' own "_" entries: "_use_default_values" is a list made from a set, in an
        # order that changes from process to process (snapshots of identical runs must be identical).
        config = dict(getattr(model, "config", {}))
        self.model_config = {k: v for k, v in config.items() if not str(k).startswith("_")}
        self.profiles = [[p.detach().clone() for p in params] for _ in self.stds]
        self.optimization_step = 0
        self.cur_decay_value: float | None = None

    @staticmethod
    def settings_problems(settings: dict[str, Any]) -> list[str]:
        """The rules that tie its settings together (rules.config_problems calls this at start-up, before
        a run dir exists; the constructor calls it too): one line each, keys relative to ``model.ema``."""
        stds = [float(s) for s in settings.get("stds") or ()]
        if not stds:
            return ["stds is empty; give at least one σ_rel, e.g. [0.05, 0.10]"]
        chosen = settings.get("sample_std")
        if chosen is not None and float(chosen) not in stds:
            return [f"sample_std={chosen} is not one of the tracked stds {stds}; pick one of them"]
        return []

    # The sample profile, where diffusers' EMAModel keeps its one average (swapped_in, loaders).
    @property
    def shadow_params(self) -> list[torch.Tensor]:
        return self.profiles[self.sample_index]

    def all_shadows(self) -> list[torch.Tensor]:
        return [s for profile in self.profiles for s in profile]

    def map_shadows(self, fn: Any) -> None:
        """Replace every averaged tensor ``s`` by ``fn(s)`` (device, memory format, private copies)."""
        self.profiles = [[fn(s) for s in profile] for profile in self.profiles]

    @torch.no_grad()
    def step(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        params = list(parameters)
        self.optimization_step += 1
        t = self.optimization_step
        for i, (gamma, shadows) in enumerate(zip(self.gammas, self.profiles, strict=True)):
            b = beta(gamma, t)
            if i == self.sample_index:
                self.cur_decay_value = b
            if self.foreach:  # one pass per profile, as LerpEMAModel: the β is a host float, no sync
                torch._foreach_lerp_(shadows, params, 1.0 - b)
            else:
                for s, p in zip(shadows, params, strict=True):
                    s.lerp_(p, 1.0 - b)

    def copy_to(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        with torch.no_grad():
            for p, s in zip(parameters, self.shadow_params, strict=True):
                p.copy_(s)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        self.map_shadows(lambda s: s.to(device=device, dtype=dtype) if dtype else s.to(device=device))

    def state_dict(self) -> dict[str, Any]:
        # shadow_params is the same tensors as one profile: torch.save stores each storage once.
        return {
            "kind": "posthoc",
            "optimization_step": self.optimization_step,
            "stds": self.stds,
            "sample_index": self.sample_index,
            "profiles": self.profiles,
            "shadow_params": self.shadow_params,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if [float(s) for s in state["stds"]] != self.stds:
            raise DifflabError(
                f"the checkpoint's post-hoc EMA tracks stds {state['stds']}, model.ema.stds is {self.stds}; "
                "resume with the run's own model.ema.stds"
            )
        self.optimization_step = int(state["optimization_step"])
        self.profiles = [[s.clone() for s in profile] for profile in state["profiles"]]

    kind = "posthoc"

    def snapshot_due(self) -> bool:
        return due(self.optimization_step, self.snapshot_every)

    def snapshot(self, end_of_run: bool = False) -> Path | None:
        """Write the profiles when due: after each optimizer step on the snapshot cadence; at the end of
        a run, its last step when that is off the cadence (on it, that snapshot is already written)."""
        return self.write_snapshot() if self.snapshot_due() != end_of_run else None

    def write_snapshot(self) -> Path:
        """All profiles at this step, as one safetensors file (written atomically)."""
        from safetensors.torch import save

        shadows = [s.detach() for profile in self.profiles for s in profile]
        # One device-to-host copy for all profiles: a copy per tensor is a host sync each, hundreds per
        # snapshot on a GPU. reshape flattens in NCHW order whatever the layout; safetensors refuses
        # tensors that share storage, hence a host-side clone of each piece.
        flat = torch.cat([s.reshape(-1).to(self.snapshot_dtype) for s in shadows]).cpu()
        pieces = iter(flat.split([s.numel() for s in shadows]))
        tensors = {
            f"{std:g}/{name}": next(pieces).view(s.shape).clone()
            for std, profile in zip(self.stds, self.profiles, strict=True)
            for name, s in zip(self.names, profile, strict=True)
        }
        meta = {
            "step": str(self.optimization_step),
            "snapshot_every": str(self.snapshot_every),
            "stds": json.dumps(self.stds),
            "unet_config": json.dumps(self.model_config, sort_keys=True, default=str),
            "format": "difflab-phema-1",
        }
        path = self.snapshot_dir / f"phema_{self.optimization_step:07d}.safetensors"
        blob = _canonical_header(save(tensors, metadata=meta))
        atomic_write(path, lambda f: f.write(blob))
        return path


def _canonical_header(blob: bytes) -> bytes:
    """The same safetensors file with its JSON header's keys sorted: safetensors serialises the
    metadata from a Rust HashMap, whose order is random per process, so identical snapshots would
    differ in bytes. Offsets count from the end of the header, so the data is untouched."""
    size = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + size])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors pads the header to 8 bytes with spaces
    return len(text).to_bytes(8, "little") + text + blob[8 + size :]


# ------------------------------------------------------------------------------------------ reconstruction
@dataclass
class Snapshot:
    path: Path
    step: int
    stds: list[float]
    unet_config: dict
    every: int


def list_snapshots(folder: Path, last_step: int | None = None) -> list[Snapshot]:
    """The snapshots in ``folder`` up to ``last_step``, checked: readable, one cadence, no gap."""
    from safetensors import safe_open

    files = (
        sorted(p for p in folder.glob("phema_*.safetensors") if SNAPSHOT.match(p.name))
        if folder.is_dir()
        else []
    )
    found = []
    for p in files:
        try:
            with safe_open(str(p), framework="pt") as f:
                meta = f.metadata() or {}
        except Exception as e:  # safetensors raises its own error types for a truncated header
            raise DifflabError(f"EMA snapshot {p} is truncated or corrupt ({e.__class__.__name__})") from None
        step = int(meta.get("step", -1))
        if last_step is not None and step > last_step:
            continue
        every = int(meta.get("snapshot_every", 0))
        found.append(Snapshot(p, step, json.loads(meta["stds"]), json.loads(meta["unet_config"]), every))
    if not found:
        raise DifflabError(
            f"no post-hoc EMA snapshots in {folder}: ema_std= needs a run trained with model/ema=posthoc"
        )
    # Snapshots come every N steps, plus one at a run's last step when that is off the cadence.
    every = found[-1].every or min(s.step for s in found)
    on_cadence = [s.step for s in found if due(s.step, every)]
    for k, step in enumerate(on_cadence, start=1):
        if step != k * every:
            missing = folder / f"phema_{k * every:07d}.safetensors"
            raise DifflabError(f"EMA snapshot {missing} is missing (snapshots every {every} steps)")
    return found


def reconstruct(
    snapshots: Sequence[Snapshot], std: float, names: Sequence[str], step: int | None = None
) -> dict[str, torch.Tensor]:
    """The weights (by parameter name) of the power-function EMA with σ_rel ``std`` at ``step``
    (default: the last snapshot's step) from ``snapshots``."""
    from safetensors import safe_open

    lo, hi = STD_RANGE
    if not lo <= std <= hi:
        raise DifflabError(f"ema_std={std} is outside [{lo}, {hi}]")
    step = step or snapshots[-1].step
    used = [s for s in snapshots if s.step <= step]
    inputs = [(s, sd) for s in used for sd in s.stds]
    x = coefficients([s.step for s, _ in inputs], [sd for _, sd in inputs], step, std)
    out: dict[str, torch.Tensor] = {}
    for (snap, sd), weight in zip(inputs, x, strict=True):
        if abs(weight) < 1e-12:
            continue
        with safe_open(str(snap.path), framework="pt") as f:
            for name in names:
                t = f.get_tensor(f"{sd:g}/{name}").double() * weight
                out[name] = out[name] + t if name in out else t
    return {k: v.float() for k, v in out.items()}
