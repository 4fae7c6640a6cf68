"""Pose errors of single-plane implant tracking, as JointTrack users report them.

For each sample (a predicted and a true JointTrack pose row ``(x, y, z, z_rot, x_rot, y_rot)``):

- ``x``, ``y`` (in-plane, mm), ``z`` (out-of-plane, mm): absolute differences of the camera-frame
  translation columns; ``inplane`` (mm): ``√(Δx² + Δy²)``; ``translation`` (mm): the full 3-D
  translation error ``√(Δx² + Δy² + Δz²)``;
- ``z_rot``, ``x_rot``, ``y_rot`` (°): absolute differences of the JointTrack 312 Euler angles,
  each wrapped to ±180° first (so 179° vs −179° is 2°, not 358°);
- ``geodesic`` (°): the angle of ``R_predᵀ R_true``, independent of the Euler convention;
- ``mtre`` (mm): mean target registration error, the mean distance between the model's vertices
  placed at the two poses (only when the metric was built with the model's vertices);
- success rates, for each ``(d, θ)`` of ``thresholds`` (1 mm/1°, 2 mm/2°, 5 mm/5° by default), as
  the fraction of samples with

  - ``success_inplane_<d>mm_<θ>deg``: **in-plane** translation error ``√(Δx² + Δy²) ≤ d`` and
    geodesic ``≤ θ``. Depth is left out: single-plane fluoroscopy measures it an order of magnitude
    worse, and this rate follows in-plane and rotation progress; it is *not* a pose success (a
    pose 23 mm off in depth passes it);
  - ``success_3d_<d>mm_<θ>deg``: the full **3-D** translation error ``√(Δx² + Δy² + Δz²) ≤ d`` and
    geodesic ``≤ θ``: translation (depth included) and rotation both within bounds;
  - ``success_mtre_<d>mm``: ``mtre ≤ d`` (only with the model's vertices): the placed model is
    within ``d`` on average, translation and rotation in one number.

Symmetric trap: one view cannot tell a pose from its mirror about the line of sight
(:func:`jtml.geometry.symmetric_twin`). The ``trap_…`` values score, per sample, whichever of the
predicted pose and its twin has the smaller **geodesic** error (the twin shares the translation,
so only the rotation can differ; the geodesic choice needs no model, and picks the same pose as
mTRE would for all but near-ties). ``trap_rate`` is the fraction of samples where the twin was
strictly closer. The twin is an involution, so a prediction equal to the true pose's twin has a
trap-aware error of 0.

States are the poses themselves, list states with ``dist_reduce_fx="cat"``: ``compute()`` sees
every sample of every process (medians need them all), so DDP results equal single-process ones
by construction. Everything is computed in float64.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from jtml.geometry import euler312_to_matrix, geodesic_angle, symmetric_twin, wrap_degrees

__all__ = [
    "AXES",
    "SUCCESS_KINDS",
    "SUCCESS_THRESHOLDS",
    "PoseError",
    "mtre",
    "pose_errors",
    "success_key",
    "trap_aware_poses",
]

AXES = ("x", "y", "z", "z_rot", "x_rot", "y_rot")
SUCCESS_THRESHOLDS: tuple[tuple[float, float], ...] = ((1.0, 1.0), (2.0, 2.0), (5.0, 5.0))
# success kind → the translation error it thresholds (with the geodesic), or mtre alone
SUCCESS_KINDS = {"inplane": "inplane", "3d": "translation", "mtre": "mtre"}
_MTRE_CHUNK = 256  # samples per mTRE chunk: (chunk, V, 3) float64 stays small for 10k-vertex models


def success_key(kind: str, mm: float, deg: float) -> str:
    """``inplane_1mm_1deg`` for ("inplane", 1, 1), ``3d_0.5mm_2deg`` for ("3d", 0.5, 2),
    ``mtre_2mm`` for ("mtre", 2, ·): mTRE has no angle; the kind says which error is thresholded."""
    if kind not in SUCCESS_KINDS:
        raise ValueError(f"success kind must be one of {sorted(SUCCESS_KINDS)}, got {kind!r}")
    return f"mtre_{mm:g}mm" if kind == "mtre" else f"{kind}_{mm:g}mm_{deg:g}deg"


def _as_poses(x: Tensor | np.ndarray, name: str) -> Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x).to(torch.float64)
    if t.ndim == 1:
        t = t[None]
    if t.ndim != 2 or t.shape[1] != 6:
        raise ValueError(f"{name} must be (N, 6) JointTrack pose rows, got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} holds NaN or infinite values: drop missing frames before scoring")
    return t


def mtre(pred: Tensor, target: Tensor, vertices: Tensor) -> Tensor:
    """``(N,)`` mean distance (mm) between ``vertices`` ``(V, 3)`` placed at the two poses ``(N, 6)``."""
    out = []
    Rp_all, Rt_all = euler312_to_matrix(pred[:, 3:]), euler312_to_matrix(target[:, 3:])
    for i in range(0, len(pred), _MTRE_CHUNK):
        sl = slice(i, i + _MTRE_CHUNK)
        # (R_p − R_t) v + (t_p − t_t): one matmul per chunk instead of two placed copies.
        dR = Rp_all[sl] - Rt_all[sl]
        dt = pred[sl, :3] - target[sl, :3]
        diff = torch.einsum("nij,vj->nvi", dR, vertices) + dt[:, None, :]
        out.append(diff.norm(dim=-1).mean(dim=-1))
    return torch.cat(out) if out else pred.new_zeros(0)


def pose_errors(pred: Tensor, target: Tensor, vertices: Tensor | None = None) -> dict[str, Tensor]:
    """Per-sample absolute errors ``(N,)``: the six axes, ``inplane``, ``translation`` (3-D),
    ``geodesic`` (°), ``mtre``."""
    pred, target = _as_poses(pred, "pred"), _as_poses(target, "target")
    d = pred - target
    d[:, 3:] = wrap_degrees(d[:, 3:])
    out = {axis: d[:, i].abs() for i, axis in enumerate(AXES)}
    out["inplane"] = d[:, :2].norm(dim=-1)
    out["translation"] = d[:, :3].norm(dim=-1)
    geo = geodesic_angle(euler312_to_matrix(pred[:, 3:]), euler312_to_matrix(target[:, 3:]))
    out["geodesic"] = torch.rad2deg(geo)
    if vertices is not None:
        out["mtre"] = mtre(pred, target, vertices.to(pred))
    return out


def trap_aware_poses(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Per sample, the predicted pose or its symmetric twin, whichever is geodesically closer to
    ``target``; and a bool ``(N,)`` that is True where the twin was strictly closer."""
    pred, target = _as_poses(pred, "pred"), _as_poses(target, "target")
    twin = symmetric_twin(pred)
    Rt = euler312_to_matrix(target[:, 3:])
    g_pred = geodesic_angle(euler312_to_matrix(pred[:, 3:]), Rt)
    g_twin = geodesic_angle(euler312_to_matrix(twin[:, 3:]), Rt)
    use_twin = g_twin < g_pred
    return torch.where(use_twin[:, None], twin, pred), use_twin


def _cat(state: list[Tensor] | Tensor) -> Tensor:
    """A list state as one ``(N, 6)`` tensor (after a DDP sync it already is one)."""
    if isinstance(state, list) and not state:
        return torch.zeros(0, 6, dtype=torch.float64)
    return dim_zero_cat(state).reshape(-1, 6).double()


class PoseError(Metric):
    """Mean and median absolute pose errors, mTRE, success rates and the symmetric-trap variant.

    Args:
        vertices: the part's model vertices ``(V, 3)`` in mm (model frame) for mTRE; None leaves
            ``mtre`` out. Duplicate vertices (STL corners) are merged so each point counts once.
        thresholds: ``(mm, deg)`` pairs for the success rates (see the module docstring).

    ``update(preds, target)``: ``(B, 6)`` JointTrack pose rows (mm, degrees), finite.
    ``compute()`` returns a flat dict of 0-d float64 tensors: ``<err>_mean`` and ``<err>_median``
    for ``err`` in x, y, z, z_rot, x_rot, y_rot, inplane, translation, geodesic, mtre;
    ``success_inplane_<d>mm_<θ>deg``, ``success_3d_<d>mm_<θ>deg`` and ``success_mtre_<d>mm``;
    the same under ``trap_`` for the trap-aware poses; ``trap_rate``; and ``n``. With no sample
    every value is NaN and ``n`` is 0. :meth:`nested` turns it into the ``jtml score-poses`` JSON.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(
        self,
        vertices: Tensor | np.ndarray | None = None,
        thresholds: Sequence[Sequence[float]] = SUCCESS_THRESHOLDS,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if vertices is not None:
            v = torch.as_tensor(np.unique(np.asarray(vertices, dtype=np.float64).reshape(-1, 3), axis=0))
            if v.numel() == 0 or not torch.isfinite(v).all():
                raise ValueError("vertices must be a non-empty, finite (V, 3) array")
            self.register_buffer("vertices", v, persistent=False)
        else:
            self.vertices = None
        self.thresholds = [(float(mm), float(deg)) for mm, deg in thresholds]
        self.add_state("preds", default=[], dist_reduce_fx="cat")
        self.add_state("targets", default=[], dist_reduce_fx="cat")

    @property
    def error_names(self) -> list[str]:
        return [*AXES, "inplane", "translation", "geodesic"] + (["mtre"] if self.vertices is not None else [])

    @property
    def success_keys(self) -> list[str]:
        """The success rates' keys (without ``success_``), in-plane first, then 3-D, then mTRE."""
        kinds = ["inplane", "3d"] + (["mtre"] if self.vertices is not None else [])
        keys = [success_key(kind, mm, deg) for kind in kinds for mm, deg in self.thresholds]
        return list(dict.fromkeys(keys))  # mTRE thresholds repeat when two pairs share a distance

    def update(self, preds: Tensor, target: Tensor) -> None:
        p, t = _as_poses(preds, "preds"), _as_poses(target, "target")
        if p.shape != t.shape:
            raise ValueError(f"preds {tuple(p.shape)} and target {tuple(t.shape)} differ in shape")
        self.preds.append(p.to(self.device))
        self.targets.append(t.to(self.device))

    def _summarise(self, errors: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        n = len(errors["x"])
        for name in self.error_names:
            e = errors[name]
            nan = e.new_tensor(float("nan"))
            out[f"{prefix}{name}_mean"] = e.mean() if n else nan
            out[f"{prefix}{name}_median"] = torch.quantile(e, 0.5) if n else nan
        for kind in ("inplane", "3d", "mtre"):
            if SUCCESS_KINDS[kind] not in errors:
                continue
            for mm, deg in self.thresholds:
                ok = errors[SUCCESS_KINDS[kind]] <= mm
                if kind != "mtre":
                    ok &= errors["geodesic"] <= deg
                out[f"{prefix}success_{success_key(kind, mm, deg)}"] = (
                    ok.double().mean() if n else errors["x"].new_tensor(float("nan"))
                )
        return out

    def compute(self) -> dict[str, Tensor]:
        preds, targets = _cat(self.preds), _cat(self.targets)
        out = self._summarise(pose_errors(preds, targets, self.vertices), "")
        chosen, use_twin = trap_aware_poses(preds, targets)
        out.update(self._summarise(pose_errors(chosen, targets, self.vertices), "trap_"))
        out["trap_rate"] = use_twin.double().mean() if len(preds) else preds.new_tensor(float("nan"))
        out["n"] = torch.tensor(float(len(preds)), dtype=torch.float64)
        return out

    def nested(self, values: dict[str, Tensor] | None = None) -> dict[str, Any]:
        """``compute()``'s flat dict as the ``score-poses`` JSON: ``{"x": {"mean", "median"}, …,
        "success": {"inplane_2mm_2deg", "3d_2mm_2deg", "mtre_2mm", …}, "trap_rate", "n",
        "trap_aware": {same layout}}`` with plain floats
        (NaN becomes None so the JSON stays standard)."""
        values = self.compute() if values is None else values

        def num(v: Tensor) -> float | None:
            f = float(v)
            return f if np.isfinite(f) else None

        def block(prefix: str) -> dict[str, Any]:
            out: dict[str, Any] = {
                name: {s: num(values[f"{prefix}{name}_{s}"]) for s in ("mean", "median")}
                for name in self.error_names
            }
            out["success"] = {k: num(values[f"{prefix}success_{k}"]) for k in self.success_keys}
            return out

        out = block("")
        out["trap_rate"] = num(values["trap_rate"])
        out["n"] = int(values["n"])
        out["trap_aware"] = block("trap_")
        return out
