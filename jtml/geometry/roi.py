"""Regions of interest around one implant's silhouette, and the exact in-plane rotation.

A square ROI is cut around a part's silhouette (from its mask), resampled to the network's input
size (area filter, so a binary mask becomes a soft, sub-pixel-accurate one) and returned with its
place in the frame and the frame's camera: the pose network's input
(:func:`make_sample`), used alike by the datasets, :meth:`PoseModule.estimate` and exported models.

In-plane rotation by θ about the principal point is a rotation of the camera about its optical
axis, exact for any scene: ``R' = Rz(θ)·R``, ``t' = Rz(θ)·t`` (:func:`rotate_pose_in_plane`,
:func:`in_plane_rotation_matrix`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import cv2
import numpy as np
import torch

from jtml.errors import JTMLError
from jtml.geometry.camera import Camera, camera_vector
from jtml.geometry.rotations import euler312_to_matrix, matrix_to_pose

__all__ = [
    "INPUTS",
    "crop_roi",
    "in_plane_rotation_matrix",
    "make_sample",
    "mask_bbox",
    "roi_box",
    "rotate_pose_in_plane",
]

Input = Literal["mask", "frame", "both"]
INPUTS = ("mask", "frame", "both")


def mask_bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """``(col0, row0, col1, row1)`` (ends exclusive) of the pixels ``> 0.5``; None for an empty mask."""
    fg = np.asarray(mask) > 0.5
    rows, cols = np.flatnonzero(fg.any(axis=1)), np.flatnonzero(fg.any(axis=0))
    if rows.size == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def roi_box(
    bbox: tuple[int, int, int, int],
    margin: float,
    rng: np.random.Generator | None = None,
    jitter: Sequence[float] = (0.0, 0.0),
) -> tuple[int, int, int]:
    """Integer square ROI ``(x0, y0, side)`` around a silhouette bbox.

    ``side = round(max(w, h) · (1 + margin))``, centred on the bbox; ``jitter = (shift, scale)``
    with ``rng`` moves the centre by ``U(−shift, shift)·side`` per axis and scales the side by
    ``exp(U(−scale, scale))``. Integer boxes make the crop an exact pixel copy.
    """
    c0, r0, c1, r1 = bbox
    side = max(c1 - c0, r1 - r0) * (1.0 + margin)
    cu, cv = (c0 + c1) / 2.0, (r0 + r1) / 2.0
    shift, scale = float(jitter[0]), float(jitter[1])
    if rng is not None and (shift > 0 or scale > 0):
        side *= math.exp(rng.uniform(-scale, scale)) if scale > 0 else 1.0
        if shift > 0:
            cu += rng.uniform(-shift, shift) * side
            cv += rng.uniform(-shift, shift) * side
    side_i = max(8, int(round(side)))
    return int(round(cu - side_i / 2.0)), int(round(cv - side_i / 2.0)), side_i


def crop_roi(
    image: np.ndarray,
    box: tuple[int, int, int, int] | tuple[int, int, int],
    size: int,
    replicate: bool = False,
) -> np.ndarray:
    """The ``(x0, y0, side)`` window of ``image`` (zero- or edge-padded outside it) as float32
    ``size × size``: area filter when shrinking (a binary mask becomes a soft one), linear when
    enlarging."""
    x0, y0, side = box[:3]
    M = np.array([[1.0, 0.0, -x0], [0.0, 1.0, -y0]])
    border = cv2.BORDER_REPLICATE if replicate else cv2.BORDER_CONSTANT
    src = image.astype(np.float32) if image.dtype not in (np.float32,) else image
    win = cv2.warpAffine(src, M, (side, side), flags=cv2.INTER_NEAREST, borderMode=border, borderValue=0)
    if side == size:
        return win
    interp = cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
    return cv2.resize(win, (size, size), interpolation=interp)


def in_plane_rotation_matrix(camera: Camera, degrees: float) -> np.ndarray:
    """The 2×3 OpenCV warp that turns a frame by ``degrees`` about the principal point, matching
    :func:`rotate_pose_in_plane` (OpenCV puts pixel centres at integers, hence the −½)."""
    u0, v0 = camera.principal_point
    return cv2.getRotationMatrix2D((u0 - 0.5, v0 - 0.5), float(degrees), 1.0)


def rotate_pose_in_plane(pose: np.ndarray, degrees: float) -> np.ndarray:
    """The pose seen by a camera rolled by ``−degrees`` about its optical axis: ``R' = Rz·R``,
    ``t' = Rz·t`` — whose image is the original image turned by ``degrees`` about the principal
    point (:func:`in_plane_rotation_matrix`)."""
    pose = np.asarray(pose, dtype=np.float64)
    Rz = euler312_to_matrix(np.array([degrees, 0.0, 0.0])).numpy()
    T = np.eye(4)
    T[:3, :3] = Rz @ euler312_to_matrix(pose[3:6]).numpy()
    T[:3, 3] = Rz @ pose[:3]
    return matrix_to_pose(torch.from_numpy(T)).numpy()


def make_sample(
    mask: np.ndarray,
    camera: Camera,
    roi_size: int,
    margin: float,
    input: Input = "mask",
    frame: np.ndarray | None = None,
    invert: bool = False,
    rng: np.random.Generator | None = None,
    jitter: Sequence[float] = (0.0, 0.0),
    bbox: tuple[int, int, int, int] | None = None,
    offset: tuple[int, int] = (0, 0),
    pixel_transform: Any = None,
) -> dict[str, Any]:
    """The network input of one part: ROI tensors, the ROI box and the camera (no pose).

    ``mask`` may be a window of the frame whose top-left pixel is ``offset`` (renders); ``bbox``
    (frame coordinates) saves recomputing it. An empty mask gives ``valid: False`` and zero ROIs.
    """
    box_bbox = bbox
    if box_bbox is None:
        b = mask_bbox(mask)
        box_bbox = (
            None if b is None else (b[0] + offset[0], b[1] + offset[1], b[2] + offset[0], b[3] + offset[1])
        )
    out: dict[str, Any] = {"camera": torch.from_numpy(camera_vector(camera))}
    if box_bbox is None:
        out["valid"] = False
        out["roi"] = torch.tensor(
            [camera.width / 2, camera.height / 2, float(camera.width)], dtype=torch.float64
        )
        if input in ("mask", "both"):
            out["roi_mask"] = torch.zeros(1, roi_size, roi_size)
        if input in ("frame", "both"):
            out["roi_image"] = torch.zeros(1, roi_size, roi_size)
        out["roi_bbox"] = torch.zeros(4)
        return out
    x0, y0, side = roi_box(box_bbox, margin, rng, jitter)
    out["valid"] = True
    out["roi"] = torch.tensor([x0 + side / 2.0, y0 + side / 2.0, float(side)], dtype=torch.float64)
    c0, r0, c1, r1 = box_bbox
    out["roi_bbox"] = torch.tensor([c0 - x0, r0 - y0, c1 - x0, r1 - y0], dtype=torch.float32) / side
    if input in ("mask", "both"):
        m = crop_roi(mask, (x0 - offset[0], y0 - offset[1], side), roi_size)
        out["roi_mask"] = torch.from_numpy(np.clip(m, 0.0, 1.0))[None]
    if input in ("frame", "both"):
        if frame is None:
            raise JTMLError(f"input {input!r} needs the frame, got none")
        img = frame
        maxval = float(np.iinfo(img.dtype).max) if img.dtype.kind in "ui" else 1.0
        if invert:
            img = (maxval - img.astype(np.float64)).astype(img.dtype) if img.dtype.kind in "ui" else 1.0 - img
        roi = crop_roi(img, (x0, y0, side), roi_size, replicate=True)
        if pixel_transform is not None:
            roi = pixel_transform(image=np.clip(roi / np.float32(maxval), 0.0, 1.0).astype(np.float32))[
                "image"
            ]
        lo, hi = float(roi.min()), float(roi.max())
        roi = (roi - lo) / np.float32(hi - lo) if hi > lo else np.zeros_like(roi)
        out["roi_image"] = torch.from_numpy(np.ascontiguousarray(roi, dtype=np.float32))[None]
    return out
