"""The pose parameterisation: what the pose network predicts, and how it becomes a JointTrack pose.

Calibration-aware and resolution-independent. Each sample is a square ROI of side ``s`` frame pixels
centred at ``c = (cu, cv)`` around one part's silhouette (see :mod:`jtml.geometry.roi`), with the
frame's camera (``f = pd / pp`` pixels, principal point ``(u0, v0)``). The network predicts, per part:

- ``offset = (o − c) / s``: where the model origin projects (``o``), relative to the ROI centre,
  in ROI units;
- ``log_depth = log(|z| · s / (f · D))``: the depth relative to the depth at which an object of
  ``D = depth_ref_mm`` would span the ROI — the apparent size carries the depth, and the ratio
  ``s / f`` makes it independent of the frame's resolution and of the calibration (any constant
  ``D`` works; per-part offsets are learned by the head's bias);
- the rotation as Zhou et al.'s continuous 6-D representation, **allocentric**: relative to the
  ray through the ROI centre (``R = R_ray · R_allo``, ``R_ray`` the smallest rotation taking the
  optical axis onto that ray), since an implant seen off-axis is seen from another direction, and
  what the network sees is ``R_allo``, not the camera-frame ``R``.

The translation is recovered with the camera: ``t = backproject(c + s·offset, z)``. Resizing the
frame scales ``c``, ``s`` and ``f`` alike, so the same network serves any frame size and pixel size.
Everything is batched and float64; cameras are the ``(B, 6)`` vectors ``pd, xo, yo, pp, width,
height`` of :func:`jtml.geometry.camera.camera_vector`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from jtml.geometry import euler312_to_matrix, matrix_to_euler312, symmetric_twin
from jtml.geometry.camera import backproject_points, project_points, vector_intrinsics

__all__ = ["decode_pose", "encode_pose", "ray_rotation"]


def ray_rotation(uv: Tensor, camera: Tensor) -> Tensor:
    """``(B, 3, 3)``: the smallest rotation taking the optical axis ``(0, 0, −1)`` onto the ray
    through pixel ``uv`` (Rodrigues; the ray never points backwards, so it is well defined)."""
    f, u0, v0 = vector_intrinsics(camera)
    d = torch.stack([(uv[..., 0] - u0) / f, -(uv[..., 1] - v0) / f, -torch.ones_like(f)], -1)
    d = d / d.norm(dim=-1, keepdim=True)
    a = torch.zeros_like(d)
    a[..., 2] = -1.0
    k = torch.cross(a, d, dim=-1)
    c = (a * d).sum(-1)
    K = torch.zeros(*k.shape[:-1], 3, 3, dtype=k.dtype, device=k.device)
    K[..., 0, 1], K[..., 0, 2], K[..., 1, 2] = -k[..., 2], k[..., 1], -k[..., 0]
    K[..., 1, 0], K[..., 2, 0], K[..., 2, 1] = k[..., 2], -k[..., 1], k[..., 0]
    eye = torch.eye(3, dtype=k.dtype, device=k.device).expand_as(K)
    return eye + K + (K @ K) / (1.0 + c)[..., None, None]


def encode_pose(
    pose: Tensor, roi: Tensor, camera: Tensor, depth_ref_mm: float, allocentric: bool = True
) -> dict[str, Tensor]:
    """JointTrack pose rows ``(B, 6)`` → network targets ``offset`` (B, 2), ``log_depth`` (B,),
    ``rotation`` (B, 3, 3) and ``twin_rotation`` (of the symmetric twin) in the ROI's frame."""
    pose, roi, camera = pose.double(), roi.double(), camera.double()
    f = vector_intrinsics(camera)[0]
    t = pose[:, :3]
    o = project_points(t, camera)
    c, s = roi[:, :2], roi[:, 2]
    R = euler312_to_matrix(pose[:, 3:])
    R_twin = euler312_to_matrix(symmetric_twin(pose)[:, 3:])
    if allocentric:
        Rc_t = ray_rotation(c, camera).transpose(-1, -2)
        R, R_twin = Rc_t @ R, Rc_t @ R_twin
    return {
        "offset": (o - c) / s[:, None],
        "log_depth": torch.log(-t[:, 2] * s / (f * depth_ref_mm)),
        "rotation": R,
        "twin_rotation": R_twin,
    }


def decode_pose(
    offset: Tensor,
    log_depth: Tensor,
    rotation: Tensor,
    roi: Tensor,
    camera: Tensor,
    depth_ref_mm: float,
    allocentric: bool = True,
) -> Tensor:
    """Inverse of :func:`encode_pose`: network outputs → JointTrack pose rows ``(B, 6)`` (float64)."""
    offset, log_depth, rotation = offset.double(), log_depth.double(), rotation.double()
    roi, camera = roi.double(), camera.double()
    f = vector_intrinsics(camera)[0]
    c, s = roi[:, :2], roi[:, 2]
    uv = c + offset * s[:, None]
    z = -torch.exp(log_depth) * f * depth_ref_mm / s
    t = backproject_points(uv, z, camera)
    R = ray_rotation(c, camera) @ rotation if allocentric else rotation
    return torch.cat([t, matrix_to_euler312(R)], -1)
