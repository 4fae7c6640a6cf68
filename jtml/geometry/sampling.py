"""Random poses of each part for rendered training samples: a realistic knee, or each part alone."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import trimesh
from scipy.spatial import ConvexHull, QhullError

from jtml.errors import JTMLError
from jtml.geometry.camera import Camera
from jtml.geometry.knee import MIRROR_MODEL, KneeGeometry, KneeRanges, mirror_pose_rows, sample_knee
from jtml.geometry.render import project_mesh
from jtml.geometry.rotations import euler312_to_matrix, matrix_to_euler312
from jtml.io import read_poses

__all__ = ["MAX_ATTEMPTS", "SIDES", "PoseSampler"]

SIDES = ("right", "left", "both")

MAX_ATTEMPTS = 200  # pose samples before deciding pose_ranges cannot fit the field of view


_INDEPENDENT_DEFAULT = {"z_rot": (-180.0, 180.0), "x_rot": (-15.0, 15.0), "y_rot": (-15.0, 15.0)}
_KNEE_KEYS = tuple(KneeRanges.__dataclass_fields__)


def _poses_file(path: Any, what: str) -> np.ndarray:
    if not isinstance(path, str | Path):
        raise JTMLError(f"pose_ranges: {what} must be a pose file path (.jts/.jtak), got {path!r}")
    return read_poses(path)


def _hull_vertices(mesh: trimesh.Trimesh) -> np.ndarray:
    v = np.unique(np.asarray(mesh.vertices, dtype=np.float64), axis=0)
    if len(v) < 5:
        return v
    try:
        return v[ConvexHull(v).vertices]
    except QhullError:  # flat or degenerate: every vertex
        return v


def _margin(value: Any) -> float:
    try:
        m = float(value)
    except (TypeError, ValueError):
        m = -1.0
    if not (math.isfinite(m) and m >= 0):
        raise JTMLError(f"pose_ranges: margin must be a number of degrees >= 0, got {value!r}")
    return m


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

    - ``{sampler: knee}`` (default): :func:`jtml.geometry.knee.sample_knee`, a realistic joint —
      both implants inside a random circular collimator — drawn from :class:`KneeRanges`: its
      defaults (flexion 0–120°, varus–valgus ±5°, axial ±8°, the femur at any in-plane angle,
      ±10° out-of-plane tilt about its own axes, depth 0.8–0.95 of the principal distance), any of
      its keys given as ``[low, high]`` (e.g. ``flexion: [0, 60]``), or ``from: {fem: FEM.jts, tib:
      TIB.jts}`` (tracked frames of the knee, e.g. a study's existing pose files) with ``margin:``
      degrees (default 10) around the angles they span. Needs the parts ``fem``/``tib`` (the other
      one's model is the procedural one when not given).
    - ``{sampler: independent, depth: [0.8, 0.95], margin: 0.03, <part>: {z_rot: [lo, hi], x_rot:
      […], y_rot: […]}}``: each part on its own, angles uniform in the given ranges (degrees;
      defaults ±180, ±15, ±15), ``|z|`` uniform in ``depth`` × principal distance, placed uniformly
      where its whole model stays ``margin`` × width inside the frame. ``<part>: {from: PART.jts,
      margin: 10}`` takes ``x_rot``/``y_rot`` from the span of a pose file (± margin degrees) and
      keeps ``z_rot`` the full circle.

    ``side`` (knee sampler): ``right`` — the lab's right-knee frames (module docstring of
    :mod:`jtml.geometry.knee`) —, ``left`` — the mirror image: the models are left implants, every
    sample is a right knee of the mirrored models seen through the mirrored camera, mirrored back
    (:func:`mirror_pose_rows`; exact) —, or ``both`` (each sample either, at random).
    """

    def __init__(
        self,
        ranges: dict[str, Any] | None,
        meshes: dict[str, trimesh.Trimesh],
        camera: Camera,
        side: str = "right",
    ) -> None:
        ranges = dict(ranges or {})
        self.kind = str(ranges.pop("sampler", "knee"))
        self.camera = camera
        if side not in SIDES:
            raise JTMLError(f"side must be one of {list(SIDES)}, got {side!r}")
        self.side = side
        # Whether a model fits the field of view is decided by its convex hull's vertices alone (a
        # projection keeps convex sets convex): a few hundred points instead of every vertex.
        self.vertices = {p: _hull_vertices(m) for p, m in meshes.items()}
        if self.kind == "knee":
            if not {"fem", "tib"} <= set(meshes):
                raise JTMLError("pose_ranges: the knee sampler needs fem and tib models")
            self.knee_ranges = self._knee_ranges(ranges)
            # the mirrored (right-knee) world a left knee is sampled in: models mirrored, camera xo -> -xo
            self.mirrored_vertices = {p: v * np.diag(MIRROR_MODEL)[:3] for p, v in self.vertices.items()}
            self.mirrored_camera = Camera(
                camera.pd, -camera.xo, camera.yo, camera.pp, camera.width, camera.height
            )
            self.geom = {
                False: KneeGeometry.from_models(meshes["fem"], meshes["tib"]),
                True: KneeGeometry.from_models(self.mirrored_vertices["fem"], self.mirrored_vertices["tib"]),
            }
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
                if "from" in spec:
                    spec = self._part_from(part, spec)
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

    def _knee_ranges(self, spec: dict[str, Any]) -> KneeRanges:
        if "from" in spec:
            src = spec.pop("from")
            margin = _margin(spec.pop("margin", 10.0))
            if spec:
                raise JTMLError(f"pose_ranges: with from:, only margin may be given, got {sorted(spec)}")
            if not isinstance(src, dict) or set(src) != {"fem", "tib"}:
                raise JTMLError(f"pose_ranges: from: needs {{fem: FEM.jts, tib: TIB.jts}}, got {src!r}")
            fem, tib = _poses_file(src["fem"], "from.fem"), _poses_file(src["tib"], "from.tib")
            if self.side == "both":
                raise JTMLError("pose_ranges: from: tracked frames are of one knee: give side left or right")
            return KneeRanges.from_poses(fem, tib, self.camera.pd, margin, side=self.side)
        unknown = sorted(set(spec) - set(_KNEE_KEYS))
        if unknown:
            raise JTMLError(
                f"pose_ranges: unknown key(s) {unknown} for the knee sampler; expected "
                f"{list(_KNEE_KEYS)}, or from: {{fem: FEM.jts, tib: TIB.jts}} with margin"
            )
        ranges = KneeRanges(**{k: _pair(v, k) for k, v in spec.items()})
        if ranges.depth[0] <= 0:
            raise JTMLError(
                f"pose_ranges: depth {list(ranges.depth)} must be > 0 (a fraction of the principal distance)"
            )
        return ranges

    def _knee(self, rng: np.random.Generator) -> dict[str, np.ndarray] | None:
        W, H = self.camera.width, self.camera.height
        circle = (
            W / 2 + rng.normal(0.0, 0.01) * W,
            H / 2 + rng.normal(0.0, 0.01) * H,
            rng.uniform(0.44, 0.53) * W,
        )
        left = self.side == "left" or (self.side == "both" and rng.uniform() < 0.5)
        if left:  # a right knee of the mirrored models through the mirrored camera, mirrored back
            circle = (W - circle[0], circle[1], circle[2])
            vertices, camera = self.mirrored_vertices, self.mirrored_camera
        else:
            vertices, camera = self.vertices, self.camera
        knee = sample_knee(
            rng, self.geom[left], vertices, camera, circle, max(2.0, 0.03 * W), self.knee_ranges
        )
        if knee is None:
            return None
        if left:
            fem, tib = mirror_pose_rows(np.stack([knee.fem, knee.tib]))
            return {"fem": fem, "tib": tib}
        return {"fem": knee.fem, "tib": knee.tib}

    def knee(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Both parts' poses of one random knee (knee sampler)."""
        for _ in range(MAX_ATTEMPTS):
            poses = self._knee(rng)
            if poses is not None:
                return poses
        raise self._no_fit("knee")

    @staticmethod
    def _part_from(part: str, spec: dict[str, Any]) -> dict[str, Any]:
        poses = _poses_file(spec.pop("from"), f"{part}.from")
        margin = _margin(spec.pop("margin", 10.0))
        if spec:
            raise JTMLError(f"pose_ranges.{part}: with from:, only margin may be given, got {sorted(spec)}")
        ok = np.isfinite(poses).all(1)
        if not ok.any():
            raise JTMLError(f"pose_ranges.{part}: from: the pose file has no pose")
        tilt = matrix_to_euler312(euler312_to_matrix(poses[ok, 3:]))[:, 1:].numpy()
        return {
            "x_rot": (tilt[:, 0].min() - margin, tilt[:, 0].max() + margin),
            "y_rot": (tilt[:, 1].min() - margin, tilt[:, 1].max() + margin),
        }

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
        if self.kind == "knee":
            return self.knee(rng)[part]
        for _ in range(MAX_ATTEMPTS):
            pose = self._independent(rng, part)
            if pose is not None:
                return pose
        raise self._no_fit(part)

    def _no_fit(self, part: str) -> JTMLError:
        return JTMLError(
            f"pose_ranges cannot place the {part} model inside the {self.camera.width}x{self.camera.height} "
            f"field of view after {MAX_ATTEMPTS} tries: is the model in mm, the calibration right, and the "
            "depth range realistic?"
        )
