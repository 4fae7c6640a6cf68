"""Tibiofemoral kinematics from femur and tibia poses: the lab's 312 convention, Grood & Suntay's
joint coordinate system, and the lowest points of the femoral condyles in the tibial frame.

Every function takes ``(N, 6)`` JointTrack pose rows ``(x, y, z, z_rot, x_rot, y_rot)`` or
``(N, 4, 4)`` model-to-camera transforms (a single ``(6,)`` or ``(4, 4)`` is one frame), and returns
``(N,)`` float64 columns. A frame with NaN in either pose (a ``NOT_OPTIMIZED`` row) is NaN in every
output column: a gap, never interpolated.

Anatomical frames: an implant's STL frame by default, or ``A · p_stl`` for a rigid 4×4 ``A`` per
implant (:mod:`jtml.kinematics.axes`). Their axes follow the lab's implant models
(``process-knee-data``, ``process.py`` line 19): x anterior–posterior, y proximal, z medial. For a
right knee (x posterior +, y proximal +, z medial +, a right-handed frame), a left knee's models are
the mirror image x → −x (x anterior +, z still medial); the left/right sign rules below make every
column read the same clinically on both sides.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jtml.errors import JTMLError
from jtml.geometry.rotations import matrix_to_euler312, pose_to_matrix
from jtml.kinematics.axes import check_rigid

__all__ = [
    "COLUMNS",
    "CONDYLE_COLUMNS",
    "GAP_COLUMNS",
    "GS_COLUMNS",
    "LAB_COLUMNS",
    "SIDES",
    "anatomical_poses",
    "as_matrices",
    "check_side",
    "condyle_lowest_points",
    "grood_suntay",
    "knee_kinematics",
    "lab_kinematics",
    "relative_pose",
]

SIDES = ("left", "right")

# The lab's convention (process-knee-data): rotations of the tibia relative to the femur, 312
# Euler angles; translations of the femoral origin in the tibial frame.
FLEXION = "flexion_deg(+flex)"
ABDUCTION = "abduction_deg(+abd/valgus)"
INTERNAL = "internal_rotation_deg(+int)"
FEMUR_AP = "femur_ap_mm(+ant)"
FEMUR_SI = "femur_si_mm(+sup)"
FEMUR_ML = "femur_ml_mm(+med)"
LAB_COLUMNS = (FLEXION, ABDUCTION, INTERNAL, FEMUR_AP, FEMUR_SI, FEMUR_ML)

# Grood & Suntay (1983): e1 femoral z (flexion axis), e3 tibial y (long axis), e2 = e3 × e1 the
# floating axis; translations of the tibial origin from the femoral origin along e1, e2, e3.
GS_FLEXION = "gs_flexion_deg(+flex)"
GS_ABDUCTION = "gs_abduction_deg(+abd/valgus)"
GS_INTERNAL = "gs_internal_rotation_deg(+int)"
GS_ML = "gs_tibia_ml_mm(+med)"
GS_AP = "gs_tibia_ap_mm(+ant)"
GS_SI = "gs_tibia_si_mm(+sup)"
GS_COLUMNS = (GS_FLEXION, GS_ABDUCTION, GS_INTERNAL, GS_ML, GS_AP, GS_SI)

# Lowest points of the medial / lateral femoral condyles, in the tibial (anatomical) frame.
CONDYLE_COLUMNS = tuple(
    f"{half}_{axis}"
    for half in ("medial", "lateral")
    for axis in ("ap_mm(+ant)", "si_mm(+sup)", "ml_mm(+med)")
)
# Their height above the tibial tray's highest point (needs the tibial model).
GAP_COLUMNS = ("medial_gap_mm(+above tray)", "lateral_gap_mm(+above tray)")
COLUMNS = LAB_COLUMNS + GS_COLUMNS + CONDYLE_COLUMNS + GAP_COLUMNS

# Per side: the sign that turns (z_rot, x_rot, y_rot) into (flexion, abduction, internal), and the
# sign that turns the frame's (x, y, z) into (anterior, superior, medial). process-knee-data
# process.py lines 146-150: a left knee negates flexion and internal rotation, a right knee the
# AP translation (its x axis points posterior).
_ROT_SIGN = {"right": np.array([1.0, 1.0, 1.0]), "left": np.array([-1.0, 1.0, -1.0])}
_AXIS_SIGN = {"right": np.array([-1.0, 1.0, 1.0]), "left": np.array([1.0, 1.0, 1.0])}


def check_side(side: Any) -> str:
    """``"left"`` or ``"right"``; anything else is a :class:`JTMLError` (the signs depend on it)."""
    if side is None:
        raise JTMLError("the knee's side is required (left or right): the sign conventions depend on it")
    if not isinstance(side, str) or side.lower() not in SIDES:
        raise JTMLError(f"side must be 'left' or 'right', got {side!r}")
    return side.lower()


def as_matrices(poses: Any, name: str = "poses") -> np.ndarray:
    """``(N, 6)`` pose rows or ``(N, 4, 4)`` transforms → ``(N, 4, 4)`` float64 (a copy).

    A row or matrix with any NaN becomes an all-NaN matrix (a missing frame). Finite matrices must
    be proper rigid transforms (:func:`~jtml.kinematics.axes.check_rigid`)."""
    a = np.array(poses, dtype=np.float64)
    if a.ndim in (1, 2) and a.shape[-1] == 6:
        rows = a.reshape(-1, 6)
        missing = ~np.isfinite(rows).all(axis=1)
        T = pose_to_matrix(np.where(missing[:, None], 0.0, rows)).numpy()
    elif a.ndim in (2, 3) and a.shape[-2:] == (4, 4):
        T = a.reshape(-1, 4, 4)
        missing = ~np.isfinite(T).all(axis=(1, 2))
        for i in np.flatnonzero(~missing):
            check_rigid(T[i], f"{name} frame {i}")
    else:
        raise JTMLError(
            f"{name}: expected (N, 6) JointTrack pose rows or (N, 4, 4) transforms, got {a.shape}"
        )
    T[missing] = np.nan
    return T


def _rigid_inverse(T: np.ndarray) -> np.ndarray:
    R, t = T[..., :3, :3], T[..., :3, 3]
    out = np.zeros_like(T)
    out[..., :3, :3] = np.swapaxes(R, -1, -2)
    out[..., :3, 3] = -np.einsum("...ji,...j->...i", R, t)
    out[..., 3, 3] = 1.0
    return out


def _axes(A: Any, name: str) -> np.ndarray:
    return np.eye(4) if A is None else check_rigid(A, f"{name} axes")


def anatomical_poses(poses: Any, axes: Any = None, name: str = "poses") -> np.ndarray:
    """``(N, 4, 4)`` anatomical-frame-to-camera transforms: ``T · A⁻¹`` for STL → anatomical ``A``."""
    return as_matrices(poses, name) @ _rigid_inverse(_axes(axes, name))


def relative_pose(femur: Any, tibia: Any, fem_axes: Any = None, tib_axes: Any = None) -> np.ndarray:
    """``(N, 4, 4)`` the tibia's anatomical frame in the femur's: ``(T_f A_f⁻¹)⁻¹ · T_t A_t⁻¹``
    (process-knee-data ``jtsFunctions.py`` line 130, ``inv(fixed) @ moving`` with the femur fixed)."""
    F = anatomical_poses(femur, fem_axes, "femur")
    T = anatomical_poses(tibia, tib_axes, "tibia")
    if len(F) != len(T):
        raise JTMLError(f"femur has {len(F)} pose(s) but tibia has {len(T)}: they must cover the same frames")
    return _rigid_inverse(F) @ T


def lab_kinematics(
    femur: Any, tibia: Any, side: str, fem_axes: Any = None, tib_axes: Any = None
) -> dict[str, np.ndarray]:
    """The lab's convention (BRIO-lab ``process-knee-data``, ``process.py`` lines 137-150).

    ``R_rel = R_fᵀ R_t = Rz(a)·Rx(b)·Ry(c)`` (``jtsFunctions.py`` lines 178-190: ``b = asin R21``,
    ``a = atan2(−R01, R11)``, ``c = atan2(−R20, R22)``); flexion ``a``, abduction ``b``, internal
    rotation ``c``, with the left knee's flexion and internal rotation negated. Translations are
    ``−R_relᵀ t_rel``: the femoral origin in the tibial frame, x negated for a right knee so that
    anterior is +. Keys: :data:`LAB_COLUMNS`.
    """
    side = check_side(side)
    rel = relative_pose(femur, tibia, fem_axes, tib_axes)
    angles = matrix_to_euler312(rel[:, :3, :3]).numpy() * _ROT_SIGN[side]
    femur_in_tibia = -np.einsum("nji,nj->ni", rel[:, :3, :3], rel[:, :3, 3]) * _AXIS_SIGN[side]
    return dict(zip(LAB_COLUMNS, [*angles.T, *femur_in_tibia.T], strict=True))


def grood_suntay(
    femur: Any, tibia: Any, side: str, fem_axes: Any = None, tib_axes: Any = None
) -> dict[str, np.ndarray]:
    """Grood & Suntay's joint coordinate system (J Biomech Eng 1983; 105:136-144), from its axes.

    In the femoral frame: ``e1`` the femoral z axis (flexion), ``e3`` the tibial y axis (long
    axis), ``e2 = e3 × e1 / |e3 × e1|`` the floating axis. Flexion: the angle about ``e1`` from
    the femoral x axis to ``e2``; abduction: ``asin(e1 · e3)`` (the angle between ``e1`` and
    ``e3`` minus 90°); internal rotation: the angle about ``e3`` from the tibial x axis to ``e2``
    (so these three equal the lab's 312 angles). Translations: the vector ``H`` from the femoral
    origin to the tibial origin as ``H = q1 e1 + q2 e2 + q3 e3`` (the non-orthogonal JCS basis):
    ``q1`` medial (+), ``q2`` along the floating axis (anterior +), ``q3`` along the tibial long
    axis (superior +). Same left/right signs as :func:`lab_kinematics`. Keys: :data:`GS_COLUMNS`.
    """
    side = check_side(side)
    rel = relative_pose(femur, tibia, fem_axes, tib_axes)
    out = np.full((len(rel), 6), np.nan)
    ok = np.isfinite(rel).all(axis=(1, 2))
    R, H = rel[ok, :3, :3], rel[ok, :3, 3]
    e1 = np.broadcast_to(np.array([0.0, 0.0, 1.0]), H.shape)
    e3 = R[:, :, 1]
    e2 = np.cross(e3, e1)
    e2 /= np.linalg.norm(e2, axis=1, keepdims=True)
    flexion = np.arctan2(e2[:, 1], e2[:, 0])
    abduction = np.arcsin(np.clip(np.sum(e1 * e3, axis=1), -1.0, 1.0))
    internal = np.arctan2(np.sum(e2 * R[:, :, 2], axis=1), np.sum(e2 * R[:, :, 0], axis=1))
    q = np.linalg.solve(np.stack([e1, e2, e3], axis=-1), H[..., None])[..., 0]
    out[ok, :3] = np.rad2deg(np.stack([flexion, abduction, internal], axis=1)) * _ROT_SIGN[side]
    # e1 is medial on both sides; e2 is the frame's x direction at zero flexion; e3 superior.
    out[ok, 3:] = q * np.array([1.0, _AXIS_SIGN[side][0], 1.0])
    return dict(zip(GS_COLUMNS, out.T, strict=True))


def _vertices(mesh: Any, name: str) -> np.ndarray:
    v = np.asarray(getattr(mesh, "vertices", mesh), dtype=np.float64)
    if v.ndim != 2 or v.shape[1] != 3 or len(v) == 0:
        raise JTMLError(f"{name}: expected a mesh or (V, 3) vertices, got shape {v.shape}")
    if not np.isfinite(v).all():
        raise JTMLError(f"{name}: NaN or infinite vertex coordinates")
    return np.unique(v, axis=0)


def condyle_lowest_points(
    femur: Any,
    tibia: Any,
    fem_model: Any,
    side: str,
    fem_axes: Any = None,
    tib_axes: Any = None,
    tib_model: Any = None,
) -> dict[str, np.ndarray]:
    """Per frame, the lowest point of the medial and of the lateral femoral condyle in the tibial
    frame (``process.py`` lines 152-157, 196 and 223-231): the femoral vertices of each half —
    medial: anatomical z > 0, lateral: z < 0 — mapped into the tibial anatomical frame, the one
    with the smallest y (the tibial superior axis) kept. Coordinates as anterior (+), superior (+),
    medial (+) (right knees: x negated). ``tib_model``: also each point's height above the tibial
    tray's highest point (condylar lift-off). Keys: :data:`CONDYLE_COLUMNS` (+ :data:`GAP_COLUMNS`).
    """
    side = check_side(side)
    rel = relative_pose(femur, tibia, fem_axes, tib_axes)
    A_f = _axes(fem_axes, "femur")
    v = _vertices(fem_model, "femoral model") @ A_f[:3, :3].T + A_f[:3, 3]
    halves = {"medial": v[v[:, 2] > 0], "lateral": v[v[:, 2] < 0]}
    for half, pts in halves.items():
        if len(pts) == 0:
            raise JTMLError(
                f"femoral model has no {half} vertices (anatomical z {'>' if half == 'medial' else '<'} 0): "
                "is the model centred mediolaterally, or do its axes need a --fem-axes file?"
            )
    inv = _rigid_inverse(rel)  # femur anatomical frame -> tibia anatomical frame
    out: dict[str, np.ndarray] = {}
    sign = _AXIS_SIGN[side]
    lowest_y = {}
    for half, pts in halves.items():
        xyz = np.full((len(rel), 3), np.nan)
        for i in np.flatnonzero(np.isfinite(rel).all(axis=(1, 2))):
            y = pts @ inv[i, 1, :3] + inv[i, 1, 3]
            k = int(np.argmin(y))
            xyz[i] = inv[i, :3, :3] @ pts[k] + inv[i, :3, 3]
        lowest_y[half] = xyz[:, 1]
        for axis, values in zip(("ap_mm(+ant)", "si_mm(+sup)", "ml_mm(+med)"), (xyz * sign).T, strict=True):
            out[f"{half}_{axis}"] = values
    if tib_model is not None:
        A_t = _axes(tib_axes, "tibia")
        top = float((_vertices(tib_model, "tibial model") @ A_t[:3, :3].T + A_t[:3, 3])[:, 1].max())
        for half, column in zip(("medial", "lateral"), GAP_COLUMNS, strict=True):
            out[column] = lowest_y[half] - top
    return out


def knee_kinematics(
    femur: Any,
    tibia: Any,
    side: str,
    *,
    fem_axes: Any = None,
    tib_axes: Any = None,
    fem_model: Any = None,
    tib_model: Any = None,
) -> dict[str, np.ndarray]:
    """Every column for one knee, in the order of :data:`COLUMNS`: the lab's 312 angles and
    translations, Grood & Suntay's, and (with ``fem_model``: a mesh or ``(V, 3)`` vertices in
    STL coordinates) the condyles' lowest points, plus their heights above the tray with
    ``tib_model``. Gaps (NaN) where either pose is missing."""
    if tib_model is not None and fem_model is None:
        raise JTMLError("a tibial model alone gives nothing: the tray gaps need the femoral model too")
    out = lab_kinematics(femur, tibia, side, fem_axes, tib_axes)
    out.update(grood_suntay(femur, tibia, side, fem_axes, tib_axes))
    if fem_model is not None:
        out.update(condyle_lowest_points(femur, tibia, fem_model, side, fem_axes, tib_axes, tib_model))
    return out
