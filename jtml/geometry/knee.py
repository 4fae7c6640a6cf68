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

from jtml.errors import JTMLError
from jtml.geometry.camera import Camera
from jtml.geometry.render import project_mesh
from jtml.geometry.rotations import (
    euler312_to_matrix,
    matrix_to_euler312,
    matrix_to_pose,
    pose_to_matrix,
    symmetric_twin,
)

__all__ = [
    "KneeGeometry",
    "KneePose",
    "KneeRanges",
    "MIRROR_CAMERA",
    "MIRROR_MODEL",
    "knee_angles",
    "mirror_mesh",
    "mirror_pose_rows",
    "relative_tibia",
    "resolve_tibia_twin",
    "sample_knee",
    "varus_valgus",
]


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
    def from_models(
        cls, fem: trimesh.Trimesh | np.ndarray, tib: trimesh.Trimesh | np.ndarray
    ) -> KneeGeometry:
        """From the two meshes (or their vertex arrays ``(N, 3)``)."""
        (fx0, fy0, fz0), (fx1, _, fz1) = _bounds(fem)
        (tx0, _, tz0), (tx1, ty1, tz1) = _bounds(tib)
        radius = 0.35 * (fx1 - fx0)
        centre = np.array([fx1 - radius, fy0 + radius, (fz0 + fz1) / 2])
        return cls(centre, float(radius), np.array([(tx0 + tx1) / 2, ty1, (tz0 + tz1) / 2]))


def _bounds(model: trimesh.Trimesh | np.ndarray) -> np.ndarray:
    if isinstance(model, trimesh.Trimesh):
        return np.asarray(model.bounds, dtype=np.float64)
    v = np.asarray(model, dtype=np.float64)
    return np.stack([v.min(0), v.max(0)])


Range = tuple[float, float]


@dataclass(frozen=True)
class KneeRanges:
    """The training distribution of the knee sampler (degrees; ``depth``: ``|z|`` as a fraction of
    the principal distance), every angle uniform in its ``[low, high]``.

    The tibia relative to the femur (right-knee frames, module docstring): ``flexion``, ``varus``
    (varus–valgus) and ``axial`` (internal–external rotation). The femur in the camera, as its
    JointTrack angles: ``in_plane`` is ``z_rot``, the rotation about the optical axis — an exact
    symmetry of the camera, so the default covers the full circle (any leg direction in the
    image) —; ``tilt_x``/``tilt_y`` are ``x_rot``/``y_rot``, the out-of-plane rotations about the
    implant's own axes (unchanged by an in-plane turn), small in a near-lateral view.
    :meth:`from_poses` derives them from tracked frames.
    """

    flexion: Range = (0.0, 120.0)
    varus: Range = (-5.0, 5.0)
    axial: Range = (-8.0, 8.0)
    in_plane: Range = (-180.0, 180.0)
    tilt_x: Range = (-10.0, 10.0)
    tilt_y: Range = (-10.0, 10.0)
    depth: Range = (0.8, 0.95)

    @classmethod
    def from_poses(
        cls, femur: np.ndarray, tibia: np.ndarray, pd: float, margin: float = 10.0, side: str = "right"
    ) -> KneeRanges:
        """The ranges spanned by tracked frames (pose rows of a ``side`` knee), widened by ``margin``
        degrees (and ``margin``/100 in depth); the in-plane angle keeps the full circle. Rows with
        NaN (NOT_OPTIMIZED) are skipped."""
        femur = np.asarray(femur, dtype=np.float64).reshape(-1, 6)
        tibia = np.asarray(tibia, dtype=np.float64).reshape(-1, 6)
        ok = np.isfinite(femur).all(1) & np.isfinite(tibia).all(1)
        if len(femur) != len(tibia) or not ok.any():
            raise JTMLError(
                f"pose_ranges: from: needs femur and tibia poses of the same frames, got {len(femur)} and "
                f"{len(tibia)} rows with {int(ok.sum())} frame(s) having both"
            )
        if side == "left":
            femur, tibia = mirror_pose_rows(femur), mirror_pose_rows(tibia)
        angles = knee_angles(femur[ok], tibia[ok])
        tilt = matrix_to_euler312(euler312_to_matrix(femur[ok, 3:]))[:, 1:].numpy()
        depth = -femur[ok, 2] / float(pd)

        def span(x: np.ndarray, m: float) -> Range:
            return float(x.min() - m), float(x.max() + m)

        return cls(
            flexion=span(angles[:, 0], margin),
            varus=span(angles[:, 1], margin),
            axial=span(angles[:, 2], margin),
            tilt_x=span(tilt[:, 0], margin),
            tilt_y=span(tilt[:, 1], margin),
            depth=span(depth, margin / 100.0),
        )


MIRROR_CAMERA = np.diag([-1.0, 1.0, 1.0, 1.0])  # x → −x in the camera: the image flipped left–right
# x → −x: a left implant as the lab's STLs are (a left component's anterior flange at +x where the
# right one's is at −x: BRIO-lab's process-knee-data negates flexion and internal rotation for left knees)
MIRROR_MODEL = np.diag([-1.0, 1.0, 1.0, 1.0])


def mirror_pose_rows(poses: np.ndarray) -> np.ndarray:
    """Pose rows of a knee ↔ those of its mirror image (left ↔ right): ``T' = M_cam · T · M_model``,
    the pose of the mirrored model (x → −x, as the lab's left implants are) in the mirrored scene
    (camera x → −x; through a camera with ``xo → −xo`` the image is flipped left–right). Its own
    inverse."""
    poses = np.asarray(poses, dtype=np.float64).reshape(-1, 6)
    out = np.full_like(poses, np.nan)
    ok = np.isfinite(poses).all(1)
    if ok.any():
        T = pose_to_matrix(torch.from_numpy(poses[ok])).numpy()
        out[ok] = matrix_to_pose(torch.from_numpy(MIRROR_CAMERA @ T @ MIRROR_MODEL)).numpy()
    return out


def mirror_mesh(mesh: trimesh.Trimesh) -> trimesh.Trimesh:
    """The mirror image of a model by :data:`MIRROR_MODEL` (a right implant → the left one), faces
    re-wound so they still face outwards."""
    vertices = np.asarray(mesh.vertices, dtype=np.float64) * np.diag(MIRROR_MODEL)[:3]
    return trimesh.Trimesh(vertices, np.asarray(mesh.faces)[:, ::-1].copy(), process=False)


def knee_angles(femur: np.ndarray, tibia: np.ndarray) -> np.ndarray:
    """``(N, 3)`` flexion, varus–valgus, axial rotation (°) of the tibia relative to the femur: the
    312 decomposition of ``R_femᵀ·R_tib`` in the lab's (right-knee) implant frames."""
    R_f = euler312_to_matrix(np.asarray(femur, dtype=np.float64).reshape(-1, 6)[:, 3:])
    R_t = euler312_to_matrix(np.asarray(tibia, dtype=np.float64).reshape(-1, 6)[:, 3:])
    return matrix_to_euler312(R_f.transpose(-1, -2) @ R_t).numpy()


@dataclass(frozen=True)
class KneePose:
    """One frame's sampled knee: the JointTrack pose rows and a few parameters the image uses."""

    fem: np.ndarray  # (6,) pose row
    tib: np.ndarray  # (6,) pose row
    flexion: float  # degrees


def relative_tibia(
    geom: KneeGeometry, flexion: float, abduction: float, internal: float, insert: float, shift: np.ndarray
) -> np.ndarray:
    """4×4 tibia-to-femur transform of a right knee: ``R = Rz(flexion) · Rx(abduction) ·
    Ry(internal)``, the tray's top a polyethylene insert's thickness (``insert``, mm) below the
    condyles (``geom.radius`` below the flexion centre), rolled with the flexion, offset by ``shift``
    (mm, in the flexed femoral frame)."""
    flex = _rot(flexion, 0.0, 0.0)
    R = flex @ _rot(0.0, abduction, internal)
    contact = geom.centre + flex @ (
        np.asarray(shift, dtype=np.float64) + np.array([0.0, -(geom.radius + insert), 0.0])
    )
    T = np.eye(4)
    T[:3, :3] = R
    T[:3, 3] = contact - R @ geom.tray_top
    return T


def _relative_tibia(
    rng: np.random.Generator, geom: KneeGeometry, flexion: float, ranges: KneeRanges | None = None
) -> np.ndarray:
    """A random :func:`relative_tibia`: small varus/valgus and axial rotation, the insert 6–11 mm
    (``ranges`` None: the synthetic studies' fixed distribution)."""
    if ranges is None:
        varus = float(np.clip(rng.normal(0.0, 2.0), -5.0, 5.0))
        axial = rng.uniform(-8.0, 8.0)
    else:
        varus, axial = rng.uniform(*ranges.varus), rng.uniform(*ranges.axial)
    insert = rng.uniform(6.0, 11.0)
    shift = np.array([rng.uniform(-3.0, 3.0), 0.0, rng.uniform(-2.0, 2.0)])
    return relative_tibia(geom, flexion, varus, axial, insert, shift)


def _pose_row(T: np.ndarray) -> np.ndarray:
    return matrix_to_pose(torch.from_numpy(T)).numpy().astype(np.float64)


def sample_knee(
    rng: np.random.Generator,
    geom: KneeGeometry,
    vertices: dict[str, np.ndarray],
    camera: Camera,
    circle: tuple[float, float, float],
    margin: float,
    ranges: KneeRanges | None = None,
) -> KneePose | None:
    """One random knee pose whose implants' vertices all lie ``margin`` pixels inside the image
    and the collimator ``circle`` ``(cu, cv, radius)``; None when this sample does not fit.

    ``ranges`` None: the synthetic studies' distribution (a near-lateral view, the femur's in-plane
    angle within ±35° of −flexion/2, varus–valgus normal with σ 2°), which their byte-exact
    reproducibility depends on; training samplers pass :class:`KneeRanges`."""
    if ranges is None:
        flexion = rng.uniform(0.0, 120.0)
        T_rel = _relative_tibia(rng, geom, flexion)
        # Near-lateral view: the leg's in-plane angle varies, the out-of-plane tilts stay small.
        fem_angles = (
            -flexion / 2 + rng.uniform(-35.0, 35.0),
            rng.uniform(-10.0, 10.0),
            rng.uniform(-10.0, 10.0),
        )
        depth = rng.uniform(0.8, 0.95) * camera.pd
    else:
        flexion = rng.uniform(*ranges.flexion)
        T_rel = _relative_tibia(rng, geom, flexion, ranges)
        fem_angles = (rng.uniform(*ranges.in_plane), rng.uniform(*ranges.tilt_x), rng.uniform(*ranges.tilt_y))
        depth = rng.uniform(*ranges.depth) * camera.pd
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
    return knee_angles(femur, tibia)[:, 1]


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
