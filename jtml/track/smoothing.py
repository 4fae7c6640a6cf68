"""Temporal smoothing of a pose sequence on SE(3) — never on Euler angles.

A centred moving window of ``window`` frames (odd): the translation is the mean of the window's
translations and the rotation their chordal L2 mean — the rotation nearest (Frobenius) to the sum
of the window's rotation matrices, its SVD projection onto SO(3) — which, unlike averaging 312
angles, does not depend on the parameterisation, has no wrap-around at ±180° and no gimbal lock.
Frames without a pose (NaN rows) stay without one and are left out of their neighbours' windows;
never interpolated. Off by default in ``jtml track`` (``--smooth W``): registration already makes
each frame's pose the silhouette's best match, and smoothing trades that match for smoothness.
"""

from __future__ import annotations

import numpy as np
import torch

from jtml.errors import JTMLError
from jtml.geometry import euler312_to_matrix, matrix_to_euler312

__all__ = ["rotation_mean", "smooth_poses"]


def rotation_mean(rotations: np.ndarray) -> np.ndarray:
    """Chordal L2 mean ``(3, 3)`` of ``(K, 3, 3)`` rotation matrices: ``U·diag(1, 1, det(U·Vᵀ))·Vᵀ``
    of the SVD of their sum."""
    U, _, Vt = np.linalg.svd(np.asarray(rotations, dtype=np.float64).sum(axis=0))
    d = np.sign(np.linalg.det(U @ Vt)) or 1.0
    return U @ np.diag([1.0, 1.0, d]) @ Vt


def smooth_poses(poses: np.ndarray, window: int) -> np.ndarray:
    """``(N, 6)`` JointTrack pose rows smoothed over a centred window of ``window`` frames
    (module docstring); ``window`` 0 or 1 returns a copy."""
    poses = np.asarray(poses, dtype=np.float64).reshape(-1, 6)
    window = int(window)
    if window in (0, 1):
        return poses.copy()
    if window < 0 or window % 2 == 0:
        raise JTMLError(f"the smoothing window must be an odd number of frames (or 0: off), got {window}")
    ok = np.isfinite(poses).all(axis=1)
    out = np.full_like(poses, np.nan)
    if not ok.any():
        return out
    R = np.full((len(poses), 3, 3), np.nan)
    R[ok] = euler312_to_matrix(torch.from_numpy(poses[ok, 3:])).numpy()
    half = window // 2
    for i in np.flatnonzero(ok):
        sel = np.arange(max(0, i - half), min(len(poses), i + half + 1))
        sel = sel[ok[sel]]
        out[i, :3] = poses[sel, :3].mean(axis=0)
        out[i, 3:] = matrix_to_euler312(torch.from_numpy(rotation_mean(R[sel])[None])).numpy()[0]
    return out
