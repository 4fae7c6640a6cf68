"""Knee motion sequences for synthetic studies (``jtml synth --sequence``): one smooth activity
instead of independent random frames, so tracking and kinematics have a ground truth over time.

The tibia relative to the femur follows a flexion cycle ``0 → MAX_FLEXION → 0°`` (a raised cosine
over the frames) with coupled tibial internal rotation, a small varying ab/adduction and femoral
rollback (the femur's contact moving posterior on the tibia as it flexes), all with a per-seed
amplitude; the femur's camera pose drifts a little and smoothly (sinusoids of under one to a few
cycles per sequence: tilts of 0.5–2°, 0.5–3 mm in-plane and in depth) about a near-lateral view.
Every value comes from the ``numpy`` generator it is given, so a seed fixes the sequence.

Frames: the lab's implant axes (x anterior–posterior, y proximal, z medial; a right knee's x
points posterior). A left knee is the mirror image: its models are the right ones mirrored
x → −x (:func:`mirror_mesh`), its poses the right knee's mirrored in the camera too (x → −x), so
``R_left = S · R_right · S`` with ``S = diag(−1, 1, 1)`` (pose rows ``(−x, y, z, −z_rot, x_rot,
−y_rot)``) and, with the principal point at the image centre, a left study is a right study seen
in a mirror.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from jtml.geometry.camera import Camera
from jtml.geometry.knee import KneeGeometry, KneePose, relative_tibia
from jtml.geometry.render import project_mesh
from jtml.geometry.rotations import euler312_to_matrix, matrix_to_pose

__all__ = [
    "MAX_FLEXION",
    "SIDES",
    "KneeMotion",
    "knee_motion",
    "plan_sequence",
]

MAX_FLEXION = 90.0
SIDES = ("left", "right")
_S = np.diag([-1.0, 1.0, 1.0])  # x -> -x: right <-> left models (and, in the camera, the image)


def _rot(z_rot: float, x_rot: float, y_rot: float) -> np.ndarray:
    return euler312_to_matrix(np.array([z_rot, x_rot, y_rot], dtype=np.float64)).numpy()


@dataclass(frozen=True)
class KneeMotion:
    """A right knee's motion, per frame: the tibia's 312 angles relative to the femur (flexion +,
    abduction +, internal rotation +, degrees), the femoral rollback (mm, posterior on the tibia)
    and the constant insert thickness and contact offsets (mm)."""

    flexion: np.ndarray
    abduction: np.ndarray
    internal: np.ndarray
    rollback: np.ndarray
    insert: float
    ap_offset: float
    ml_offset: float

    def transforms(self, geom: KneeGeometry) -> np.ndarray:
        """``(N, 4, 4)`` tibia-to-femur transforms (right knee) through :func:`relative_tibia`."""
        return np.stack(
            [
                relative_tibia(
                    geom, f, a, i, self.insert, np.array([self.ap_offset - r, 0.0, self.ml_offset])
                )
                for f, a, i, r in zip(self.flexion, self.abduction, self.internal, self.rollback, strict=True)
            ]
        )


def knee_motion(rng: np.random.Generator, frames: int, max_flexion: float = MAX_FLEXION) -> KneeMotion:
    """A smooth flexion cycle ``0 → max_flexion → 0`` over ``frames`` frames with coupled internal
    rotation (−2…2° at extension plus 5–10° at full flexion), ab/adduction (N(0, 1.5°) clipped to
    ±4°, plus up to ±1.5° with flexion) and 4–9 mm of femoral rollback at full flexion."""
    t = np.linspace(0.0, 1.0, frames) if frames > 1 else np.zeros(1)
    flexion = max_flexion * 0.5 * (1.0 - np.cos(2.0 * np.pi * t))
    s = flexion / max_flexion
    internal = rng.uniform(-2.0, 2.0) + rng.uniform(5.0, 10.0) * s
    abduction = float(np.clip(rng.normal(0.0, 1.5), -4.0, 4.0)) + rng.uniform(-1.5, 1.5) * s
    rollback = rng.uniform(4.0, 9.0) * s
    return KneeMotion(
        flexion=flexion,
        abduction=abduction,
        internal=internal,
        rollback=rollback,
        insert=float(rng.uniform(6.0, 11.0)),
        ap_offset=float(rng.uniform(-2.0, 2.0)),
        ml_offset=float(rng.uniform(-1.5, 1.5)),
    )


def _drift(rng: np.random.Generator, t: np.ndarray, low: float, high: float) -> np.ndarray:
    """A smooth drift: one sinusoid of amplitude ``low…high``, 0.3–1 cycles per sequence."""
    amp, freq, phase = rng.uniform(low, high), rng.uniform(0.3, 1.0), rng.uniform(0.0, 2.0 * np.pi)
    return amp * np.sin(2.0 * np.pi * freq * t + phase)


def plan_sequence(
    rng: np.random.Generator,
    frames: int,
    geom: KneeGeometry,
    vertices: dict[str, np.ndarray],
    camera: Camera,
    circle: tuple[float, float, float],
    margin: float,
    side: str = "right",
) -> tuple[list[KneePose], KneeMotion] | None:
    """One sequence's knee poses (and the right-knee motion they came from), or None when some
    frame's implants do not all lie ``margin`` pixels inside the image and the collimator
    ``circle``. ``geom``: the right knee's geometry (of the right, or un-mirrored, models);
    ``vertices``: the ``side``'s model vertices; ``circle``: for a left knee, already mirrored."""
    motion = knee_motion(rng, frames)
    t = np.linspace(0.0, 1.0, frames) if frames > 1 else np.zeros(1)
    in_plane = rng.uniform(-25.0, 25.0) + _drift(rng, t, 0.5, 2.0)
    tilt_x = rng.uniform(-8.0, 8.0) + _drift(rng, t, 0.5, 2.0)
    tilt_y = rng.uniform(-8.0, 8.0) + _drift(rng, t, 0.5, 2.0)
    depth = rng.uniform(0.8, 0.95) * camera.pd + _drift(rng, t, 0.5, 3.0)
    cu, cv, radius = circle
    du, dv = rng.uniform(-0.15, 0.15, size=2) * radius
    mm = depth / camera.focal_px  # mm per pixel at the joint's depth
    left = side == "left"
    # Offsets from the collimator's centre; a left knee's are mirrored (its circle already is).
    u = cu + (-1.0 if left else 1.0) * (du + _drift(rng, t, 0.5, 3.0) / mm)
    v = cv + dv + _drift(rng, t, 0.5, 3.0) / mm
    T_rel = motion.transforms(geom)
    target = camera.backproject(torch.from_numpy(np.stack([u, v], -1)), torch.from_numpy(-depth)).numpy()
    centre = _S @ geom.centre if left else geom.centre
    knees = []
    for i in range(frames):
        angles = np.array([-motion.flexion[i] / 2 + in_plane[i], tilt_x[i], tilt_y[i]])
        if left:  # S · Rz(a)Rx(b)Ry(c) · S = Rz(−a)Rx(b)Ry(−c)
            angles *= np.array([-1.0, 1.0, -1.0])
        T_fem = np.eye(4)
        T_fem[:3, :3] = _rot(*angles)
        T_fem[:3, 3] = target[i] - T_fem[:3, :3] @ centre
        rel = T_rel[i]
        if left:
            rel = rel.copy()
            rel[:3, :3] = _S @ rel[:3, :3] @ _S
            rel[:3, 3] = _S @ rel[:3, 3]
        T_tib = T_fem @ rel
        uv = np.concatenate(
            [project_mesh(vertices["fem"], T_fem, camera), project_mesh(vertices["tib"], T_tib, camera)]
        )
        inside_circle = (((uv - np.array([cu, cv])) ** 2).sum(1) <= (radius - margin) ** 2).all()
        inside_image = (uv >= margin).all() and (uv[:, 0] <= camera.width - margin).all()
        if not (inside_circle and inside_image and (uv[:, 1] <= camera.height - margin).all()):
            return None
        fem = np.array([*T_fem[:3, 3], *angles], dtype=np.float64)
        tib = matrix_to_pose(torch.from_numpy(T_tib)).numpy().astype(np.float64)
        knees.append(KneePose(fem=fem, tib=tib, flexion=float(motion.flexion[i])))
    return knees, motion
