"""Random poses of each part for rendered training samples: a realistic knee, or each part alone."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import trimesh

from jtml.errors import JTMLError
from jtml.geometry.camera import Camera
from jtml.geometry.knee import KneeGeometry, sample_knee
from jtml.geometry.render import project_mesh
from jtml.geometry.rotations import euler312_to_matrix

__all__ = ["MAX_ATTEMPTS", "PoseSampler"]

MAX_ATTEMPTS = 200  # pose samples before deciding pose_ranges cannot fit the field of view


_INDEPENDENT_DEFAULT = {"z_rot": (-180.0, 180.0), "x_rot": (-15.0, 15.0), "y_rot": (-15.0, 15.0)}


def _pair(value: Any, name: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise JTMLError(f"pose_ranges: {name} must be a [low, high] pair, got {value!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
        raise JTMLError(f"pose_ranges: {name} must be finite with low <= high, got {value!r}")
    return lo, hi


class PoseSampler:
    """Random poses of each part that keep its model inside the field of view.

    ``pose_ranges``:

    - ``{sampler: knee}`` (default): :func:`jtml.sim.synth.sample_knee`, the synthetic studies'
      realistic joint — flexion 0–120°, near-lateral view, ±10° out-of-plane tilt, depth 0.8–0.95
      of the principal distance, both implants inside a random circular collimator. Needs the parts
      ``fem``/``tib`` (the other one's model is the procedural one when not given).
    - ``{sampler: independent, depth: [0.8, 0.95], margin: 0.03, <part>: {z_rot: [lo, hi], x_rot:
      […], y_rot: […]}}``: each part on its own, angles uniform in the given ranges (degrees;
      defaults ±180, ±15, ±15), ``|z|`` uniform in ``depth`` × principal distance, placed uniformly
      where its whole model stays ``margin`` × width inside the frame.
    """

    def __init__(
        self, ranges: dict[str, Any] | None, meshes: dict[str, trimesh.Trimesh], camera: Camera
    ) -> None:
        ranges = dict(ranges or {})
        self.kind = str(ranges.pop("sampler", "knee"))
        self.camera = camera
        self.vertices = {
            p: np.unique(np.asarray(m.vertices, dtype=np.float64), axis=0) for p, m in meshes.items()
        }
        if self.kind == "knee":
            if ranges:
                raise JTMLError(f"pose_ranges: the knee sampler takes no other keys, got {sorted(ranges)}")
            if not {"fem", "tib"} <= set(meshes):
                raise JTMLError("pose_ranges: the knee sampler needs fem and tib models")
            self.geom = KneeGeometry.from_models(meshes["fem"], meshes["tib"])
        elif self.kind == "independent":
            self.depth = _pair(ranges.pop("depth", (0.8, 0.95)), "depth")
            if self.depth[0] <= 0:
                raise JTMLError(
                    f"pose_ranges: depth {list(self.depth)} must be > 0 (|z| as a fraction of the principal "
                    "distance): depth <= 0 puts the model at or behind the X-ray source"
                )
            self.margin = float(ranges.pop("margin", 0.03))
            self.angles: dict[str, dict[str, tuple[float, float]]] = {}
            for part in meshes:
                spec = dict(ranges.pop(part, None) or {})
                unknown = sorted(set(spec) - set(_INDEPENDENT_DEFAULT))
                if unknown:
                    raise JTMLError(f"pose_ranges.{part}: unknown key(s) {unknown}; use z_rot, x_rot, y_rot")
                self.angles[part] = {
                    k: _pair(spec.get(k, d), f"{part}.{k}") for k, d in _INDEPENDENT_DEFAULT.items()
                }
            if ranges:
                raise JTMLError(
                    f"pose_ranges: unknown key(s) {sorted(ranges)}; expected sampler, depth, margin "
                    f"and parts {sorted(meshes)}"
                )
        else:
            raise JTMLError(f"pose_ranges: sampler must be 'knee' or 'independent', got {self.kind!r}")

    def _knee(self, rng: np.random.Generator) -> dict[str, np.ndarray] | None:
        W, H = self.camera.width, self.camera.height
        circle = (
            W / 2 + rng.normal(0.0, 0.01) * W,
            H / 2 + rng.normal(0.0, 0.01) * H,
            rng.uniform(0.44, 0.53) * W,
        )
        knee = sample_knee(rng, self.geom, self.vertices, self.camera, circle, max(2.0, 0.03 * W))
        return None if knee is None else {"fem": knee.fem, "tib": knee.tib}

    def _independent(self, rng: np.random.Generator, part: str) -> np.ndarray | None:
        cam = self.camera
        angles = np.array([rng.uniform(*self.angles[part][k]) for k in ("z_rot", "x_rot", "y_rot")])
        R = euler312_to_matrix(angles).numpy()
        V = self.vertices[part]
        centre = (V.min(0) + V.max(0)) / 2
        depth = rng.uniform(*self.depth) * cam.pd
        t = np.array([0.0, 0.0, -depth]) - R @ centre
        P = V @ R.T + t
        f = cam.focal_px
        uv = cam.project(torch.from_numpy(P)).numpy()
        m = self.margin * cam.width
        lo_u, hi_u = m - uv[:, 0].min(), cam.width - m - uv[:, 0].max()
        lo_v, hi_v = m - uv[:, 1].min(), cam.height - m - uv[:, 1].max()
        if lo_u > hi_u or lo_v > hi_v:
            return None
        su, sv = rng.uniform(lo_u, hi_u), rng.uniform(lo_v, hi_v)
        # An image-plane shift (su, sv) at the model's depth, to first order; then checked exactly.
        k = depth / f
        pose = np.array([t[0] + su * k, t[1] - sv * k, t[2], *angles])
        uv = project_mesh(V, pose, cam)
        inside = (uv[:, 0] >= m).all() and (uv[:, 0] <= cam.width - m).all()
        inside = inside and (uv[:, 1] >= m).all() and (uv[:, 1] <= cam.height - m).all()
        return pose if inside else None

    def __call__(self, rng: np.random.Generator, part: str) -> np.ndarray:
        """One pose row of ``part``; JTMLError when the ranges cannot fit the field of view."""
        for _ in range(MAX_ATTEMPTS):
            if self.kind == "knee":
                poses = self._knee(rng)
                pose = None if poses is None else poses[part]
            else:
                pose = self._independent(rng, part)
            if pose is not None:
                return pose
        raise JTMLError(
            f"pose_ranges cannot place the {part} model inside the {self.camera.width}x{self.camera.height} "
            f"field of view after {MAX_ATTEMPTS} tries: is the model in mm, the calibration right, and the "
            "depth range realistic?"
        )
