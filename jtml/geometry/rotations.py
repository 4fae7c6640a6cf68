"""Rotations and poses, batched in torch (float64 in, float64 out; any leading batch shape).

JointTrack's convention: a pose row is ``(x, y, z, z_rot, x_rot, y_rot)`` in mm and degrees,
``R = Rz(z_rot) · Rx(x_rot) · Ry(y_rot)``, and a model point ``p`` maps to ``P = R p + t``
in the camera frame (source at the origin, looking down −z, +x right, +y up).
"""

from __future__ import annotations

import math

import numpy as np
import torch

ArrayLike = torch.Tensor | np.ndarray


def _t(x: ArrayLike) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x), dtype=torch.float64)


def euler312_to_matrix(angles_deg: ArrayLike) -> torch.Tensor:
    """``(..., 3)`` angles ``(z_rot, x_rot, y_rot)`` in degrees → ``(..., 3, 3)`` R = Rz·Rx·Ry."""
    a = torch.deg2rad(_t(angles_deg))
    ca, cb, cc = torch.cos(a).unbind(-1)
    sa, sb, sc = torch.sin(a).unbind(-1)
    rows = [
        ca * cc - sa * sb * sc, -sa * cb, ca * sc + sa * sb * cc,
        sa * cc + ca * sb * sc, ca * cb, sa * sc - ca * sb * cc,
        -cb * sc, sb, cb * cc,
    ]  # fmt: skip
    return torch.stack(rows, dim=-1).reshape(*a.shape[:-1], 3, 3)


def matrix_to_euler312(R: ArrayLike) -> torch.Tensor:
    """``(..., 3, 3)`` → ``(..., 3)`` ``(z_rot, x_rot, y_rot)`` in degrees (x_rot in [−90°, 90°])."""
    R = _t(R)
    x = torch.asin(R[..., 2, 1].clamp(-1.0, 1.0))
    z = torch.atan2(-R[..., 0, 1], R[..., 1, 1])
    y = torch.atan2(-R[..., 2, 0], R[..., 2, 2])
    return torch.rad2deg(torch.stack([z, x, y], dim=-1))


def rot6d_to_matrix(d6: torch.Tensor) -> torch.Tensor:
    """Zhou et al. 2019 continuous 6-D rotation (first two columns) → rotation matrix."""
    a1, a2 = d6[..., :3], d6[..., 3:6]
    b1 = torch.nn.functional.normalize(a1, dim=-1)
    b2 = torch.nn.functional.normalize(a2 - (b1 * a2).sum(-1, keepdim=True) * b1, dim=-1)
    b3 = torch.cross(b1, b2, dim=-1)
    return torch.stack([b1, b2, b3], dim=-1)


def matrix_to_rot6d(R: torch.Tensor) -> torch.Tensor:
    """Rotation matrix → 6-D representation (its first two columns, concatenated)."""
    return torch.cat([R[..., :, 0], R[..., :, 1]], dim=-1)


def geodesic_angle(R1: torch.Tensor, R2: torch.Tensor) -> torch.Tensor:
    """Angle (radians) of ``R1ᵀ R2``; numerically safe near 0 and π."""
    M = R1.transpose(-1, -2) @ R2
    cos = ((M.diagonal(dim1=-2, dim2=-1).sum(-1) - 1.0) / 2.0).clamp(-1.0, 1.0)
    # atan2 of |skew| and cos is accurate at both ends, unlike acos alone.
    skew = torch.stack(
        [M[..., 2, 1] - M[..., 1, 2], M[..., 0, 2] - M[..., 2, 0], M[..., 1, 0] - M[..., 0, 1]], -1
    )
    return torch.atan2(skew.norm(dim=-1) / 2.0, cos)


def pose_to_matrix(pose: ArrayLike) -> torch.Tensor:
    """``(..., 6)`` JointTrack pose rows → ``(..., 4, 4)`` homogeneous model-to-camera transforms."""
    pose = _t(pose)
    T = torch.zeros(*pose.shape[:-1], 4, 4, dtype=pose.dtype, device=pose.device)
    T[..., :3, :3] = euler312_to_matrix(pose[..., 3:6])
    T[..., :3, 3] = pose[..., :3]
    T[..., 3, 3] = 1.0
    return T


def matrix_to_pose(T: ArrayLike) -> torch.Tensor:
    """``(..., 4, 4)`` (or ``(..., 3, 4)``) transforms → ``(..., 6)`` JointTrack pose rows."""
    T = _t(T)
    return torch.cat([T[..., :3, 3], matrix_to_euler312(T[..., :3, :3])], dim=-1)


def symmetric_twin(pose: ArrayLike) -> torch.Tensor:
    """The pose a single view cannot tell apart: the mirror about the line of sight.

    With ``v = −t/|t|``: ``R' = (I − 2vvᵀ) · R · diag(1, 1, −1)``, same ``t``. On the optical
    axis this is ``(z_rot, −x_rot, −y_rot)``. For an implant that is nearly mirror-symmetric
    about its model z = 0 plane, both poses project to (almost) the same silhouette, which is
    why silhouette-based trackers fall into this trap.
    """
    pose = _t(pose)
    t = pose[..., :3]
    R = euler312_to_matrix(pose[..., 3:6])
    v = -t / t.norm(dim=-1, keepdim=True)
    eye = torch.eye(3, dtype=pose.dtype, device=pose.device)
    H = eye - 2.0 * v[..., :, None] * v[..., None, :]
    flip = torch.diag(torch.tensor([1.0, 1.0, -1.0], dtype=pose.dtype, device=pose.device))
    return torch.cat([t, matrix_to_euler312(H @ R @ flip)], dim=-1)


def wrap_degrees(a: torch.Tensor) -> torch.Tensor:
    """Wrap angles to (−180°, 180°] so errors across the ±180° seam are small."""
    return a - 360.0 * torch.ceil((a - 180.0) / 360.0)


DEG = 180.0 / math.pi
