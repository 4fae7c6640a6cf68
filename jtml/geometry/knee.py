"""The knee joint: where femur and tibia sit relative to each other, random plausible knee poses,
and the varus–valgus rule for the tibia's symmetric trap.

Implant frames as the lab's STLs: x anterior–posterior, y proximal–distal, z medio-lateral; the
tibia relative to the femur is ``R_femᵀ·R_tib = Rz(flexion)·Rx(varus–valgus)·Ry(axial rotation)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import trimesh

from jtml.geometry.camera import Camera
from jtml.geometry.render import project_mesh
from jtml.geometry.rotations import euler312_to_matrix, matrix_to_euler312, matrix_to_pose, symmetric_twin

__all__ = ["KneeGeometry", "KneePose", "resolve_tibia_twin", "sample_knee", "varus_valgus"]


def _rot(z_rot: float, x_rot: float, y_rot: float) -> np.ndarray:
    """``Rz · Rx · Ry`` (degrees), JointTrack's order."""
    return euler312_to_matrix(np.array([z_rot, x_rot, y_rot], dtype=np.float64)).numpy()


@dataclass(frozen=True)
class KneeGeometry:
    """Where the joint is, read off the models' bounds (model frames as the lab's STLs).

    ``centre``: the femoral flexion centre (femur frame), ``radius``: the condyles' radius about
    it, ``tray_top``: the centre of the tibial tray's top (tibia frame).
    """

    centre: np.ndarray
    radius: float
    tray_top: np.ndarray

    @classmethod
    def from_models(cls, fem: trimesh.Trimesh, tib: trimesh.Trimesh) -> KneeGeometry:
        (fx0, fy0, fz0), (fx1, _, fz1) = np.asarray(fem.bounds, dtype=np.float64)
        (tx0, _, tz0), (tx1, ty1, tz1) = np.asarray(tib.bounds, dtype=np.float64)
        radius = 0.35 * (fx1 - fx0)
        centre = np.array([fx1 - radius, fy0 + radius, (fz0 + fz1) / 2])
        return cls(centre, float(radius), np.array([(tx0 + tx1) / 2, ty1, (tz0 + tz1) / 2]))


@dataclass(frozen=True)
class KneePose:
    """One frame's sampled knee: the JointTrack pose rows and a few parameters the image uses."""

    fem: np.ndarray  # (6,) pose row
    tib: np.ndarray  # (6,) pose row
    flexion: float  # degrees


def _relative_tibia(rng: np.random.Generator, geom: KneeGeometry, flexion: float) -> np.ndarray:
    """4×4 tibia-to-femur transform: the tray's top a polyethylene insert's thickness below the
    condyles, rolled about the flexion centre, with small varus/valgus and axial rotation."""
    varus = float(np.clip(rng.normal(0.0, 2.0), -5.0, 5.0))
    axial = rng.uniform(-8.0, 8.0)
    insert = rng.uniform(6.0, 11.0)
    shift = np.array([rng.uniform(-3.0, 3.0), 0.0, rng.uniform(-2.0, 2.0)])
    flex = _rot(flexion, 0.0, 0.0)
    R = flex @ _rot(0.0, varus, axial)
    contact = geom.centre + flex @ (shift + np.array([0.0, -(geom.radius + insert), 0.0]))
    T = np.eye(4)
    T[:3, :3] = R
    T[:3, 3] = contact - R @ geom.tray_top
    return T


def _pose_row(T: np.ndarray) -> np.ndarray:
    return matrix_to_pose(torch.from_numpy(T)).numpy().astype(np.float64)


def sample_knee(
    rng: np.random.Generator,
    geom: KneeGeometry,
    vertices: dict[str, np.ndarray],
    camera: Camera,
    circle: tuple[float, float, float],
    margin: float,
) -> KneePose | None:
    """One random knee pose whose implants' vertices all lie ``margin`` pixels inside the image
    and the collimator ``circle`` ``(cu, cv, radius)``; None when this sample does not fit."""
    flexion = rng.uniform(0.0, 120.0)
    T_rel = _relative_tibia(rng, geom, flexion)
    # Near-lateral view: the leg's in-plane angle varies, the out-of-plane tilts stay small.
    fem_angles = (-flexion / 2 + rng.uniform(-35.0, 35.0), rng.uniform(-10.0, 10.0), rng.uniform(-10.0, 10.0))
    depth = rng.uniform(0.8, 0.95) * camera.pd
    T_fem = np.eye(4)
    T_fem[:3, :3] = _rot(*fem_angles)
    T_fem[:3, 3] = np.array([0.0, 0.0, -depth]) - T_fem[:3, :3] @ geom.centre
    uv = np.concatenate(
        [project_mesh(vertices["fem"], T_fem, camera), project_mesh(vertices["tib"], T_fem @ T_rel, camera)]
    )
    cu, cv, radius = circle
    lo, hi = uv.min(0), uv.max(0)
    mid = (lo + hi) / 2
    reach = np.sqrt(((uv - mid) ** 2).sum(1).max())
    room = radius - margin - reach
    if room <= 0:
        return None
    r, a = room * np.sqrt(rng.uniform()), rng.uniform(0.0, 2 * np.pi)
    du, dv = cu + r * np.cos(a) - mid[0], cv + r * np.sin(a) - mid[1]
    # A shift parallel to the image plane moves the projection by (du, dv) at the joint's depth.
    k = depth / camera.focal_px
    T_fem[:3, 3] += np.array([du * k, -dv * k, 0.0])
    T_tib = T_fem @ T_rel
    uv = np.concatenate(
        [project_mesh(vertices["fem"], T_fem, camera), project_mesh(vertices["tib"], T_tib, camera)]
    )
    inside_circle = (((uv - np.array([cu, cv])) ** 2).sum(1) <= (radius - margin) ** 2).all()
    inside_image = (uv >= margin).all() and (uv[:, 0] <= camera.width - margin).all()
    inside_image = inside_image and (uv[:, 1] <= camera.height - margin).all()
    if not (inside_circle and inside_image):
        return None
    fem = np.array([*T_fem[:3, 3], *fem_angles], dtype=np.float64)
    return KneePose(fem=fem, tib=_pose_row(T_tib), flexion=float(flexion))


def varus_valgus(femur: np.ndarray, tibia: np.ndarray) -> np.ndarray:
    """``(N,)`` varus–valgus angle (°) of the tibia relative to the femur: the ``x_rot`` of the
    312 decomposition of ``R_femᵀ·R_tib`` = ``Rz(flexion)·Rx(varus–valgus)·Ry(axial rotation)``
    in the lab's implant frames (x anterior–posterior, y proximal–distal, z medio-lateral)."""
    R_f = euler312_to_matrix(np.asarray(femur, dtype=np.float64).reshape(-1, 6)[:, 3:])
    R_t = euler312_to_matrix(np.asarray(tibia, dtype=np.float64).reshape(-1, 6)[:, 3:])
    return matrix_to_euler312(R_f.transpose(-1, -2) @ R_t)[:, 1].numpy()


def resolve_tibia_twin(femur: np.ndarray, tibia: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """JointTrack's answer to the symmetric trap: per frame, the tibia pose or its symmetric twin,
    whichever has the smaller ``|varus–valgus|`` relative to the femur. Returns the chosen ``(N, 6)``
    tibia poses and a bool ``(N,)`` that is True where the twin was chosen; frames missing either
    pose (NaN rows) are left as they are."""
    femur = np.asarray(femur, dtype=np.float64).reshape(-1, 6)
    tibia = np.asarray(tibia, dtype=np.float64).reshape(-1, 6)
    ok = np.isfinite(femur).all(axis=1) & np.isfinite(tibia).all(axis=1)
    out, flip = tibia.copy(), np.zeros(len(tibia), dtype=bool)
    if ok.any():
        twin = symmetric_twin(tibia[ok]).numpy()
        keep = np.abs(varus_valgus(femur[ok], tibia[ok]))
        swap = np.abs(varus_valgus(femur[ok], twin)) < keep
        out[np.flatnonzero(ok)[swap]] = twin[swap]
        flip[np.flatnonzero(ok)[swap]] = True
    return out, flip
