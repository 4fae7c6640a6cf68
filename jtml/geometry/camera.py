"""A calibrated single-plane fluoroscope, projecting exactly as JointTrack does.

With ``f = pd / pp`` (pixels), image ``W × H``, row 0 the top row, pixel ``(col, row)``
centred at ``(col + 0.5, row + 0.5)``::

    u = W/2 + xo/pp − f · P_x / P_z
    v = H/2 − yo/pp + f · P_y / P_z        (P_z < 0)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from jtml.errors import JTMLError
from jtml.io.calibration import Calibration


@dataclass(frozen=True)
class Camera:
    """Intrinsics (mm) plus the image size (pixels) they apply to."""

    pd: float
    xo: float
    yo: float
    pp: float
    width: int
    height: int

    @classmethod
    def from_calibration(cls, calib: Calibration, width: int, height: int) -> Camera:
        return cls(calib.pd, calib.xo, calib.yo, calib.pp, int(width), int(height))

    @classmethod
    def from_intrinsics(cls, K: np.ndarray, width: int, height: int, pixel_size: float = 1.0) -> Camera:
        """From an OpenCV 3×3 matrix (pixel centres at integers, +y down, looking down +z).

        ``pixel_size`` (mm/pixel) turns the focal length in pixels back into a principal
        distance in mm; projections do not depend on it.
        """
        K = np.asarray(K, dtype=np.float64)
        if K.shape != (3, 3):
            raise JTMLError(f"intrinsic matrix must be 3x3, got {K.shape}")
        fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
        if fx <= 0 or abs(fx - fy) > 1e-9 * fx or abs(K[0, 1]) > 1e-12:
            raise JTMLError("intrinsic matrix must have fx == fy > 0 and no skew (a fluoroscope)")
        return cls(
            pd=fx * pixel_size,
            xo=(cx + 0.5 - width / 2) * pixel_size,
            yo=-(cy + 0.5 - height / 2) * pixel_size,
            pp=pixel_size,
            width=int(width),
            height=int(height),
        )

    @property
    def calibration(self) -> Calibration:
        return Calibration(self.pd, self.xo, self.yo, self.pp)

    @property
    def focal_px(self) -> float:
        return self.pd / self.pp

    @property
    def principal_point(self) -> tuple[float, float]:
        """Principal point ``(u0, v0)`` in continuous pixel coordinates."""
        return self.width / 2 + self.xo / self.pp, self.height / 2 - self.yo / self.pp

    def intrinsics(self) -> np.ndarray:
        """The equivalent OpenCV 3×3 matrix (for cv2.projectPoints / solvePnP users)."""
        u0, v0 = self.principal_point
        f = self.focal_px
        return np.array([[f, 0.0, u0 - 0.5], [0.0, f, v0 - 0.5], [0.0, 0.0, 1.0]])

    def scaled(self, width: int, height: int) -> Camera:
        """The same fluoroscope imaged onto ``width × height`` pixels (resized frames)."""
        sx, sy = self.width / width, self.height / height
        if abs(sx - sy) > 1e-9:
            raise JTMLError("non-uniform resize changes the pixel aspect; a fluoroscope needs square pixels")
        return Camera(self.pd, self.xo, self.yo, self.pp * sx, int(width), int(height))

    def project(self, points: torch.Tensor | np.ndarray) -> torch.Tensor:
        """``(..., 3)`` camera-frame points (mm, P_z < 0) → ``(..., 2)`` pixel coordinates (u, v)."""
        P = (
            points
            if isinstance(points, torch.Tensor)
            else torch.as_tensor(np.asarray(points), dtype=torch.float64)
        )
        return pinhole_project(P, self.focal_px, *self.principal_point)

    def backproject(self, uv: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Pixel ``(u, v)`` at depth ``z`` (mm, negative) → camera-frame point; inverse of project."""
        return pinhole_backproject(uv, z, self.focal_px, *self.principal_point)


# ------------------------------------------------------------------------------------------------
# The projection (written once), and cameras as the (..., 6) vectors that batches carry
# ------------------------------------------------------------------------------------------------


def pinhole_project(P: torch.Tensor, f: Any, u0: Any, v0: Any) -> torch.Tensor:
    """JointTrack's projection of ``(..., 3)`` camera-frame points with focal length ``f`` (pixels)
    and principal point ``(u0, v0)`` (numbers, or tensors broadcasting against ``P[..., 0]``)."""
    u = u0 - f * P[..., 0] / P[..., 2]
    v = v0 + f * P[..., 1] / P[..., 2]
    return torch.stack([u, v], dim=-1)


def pinhole_backproject(uv: torch.Tensor, z: torch.Tensor, f: Any, u0: Any, v0: Any) -> torch.Tensor:
    """Inverse of :func:`pinhole_project`: pixels ``(..., 2)`` at depths ``z`` (mm, < 0) → points."""
    x = -(uv[..., 0] - u0) * z / f
    y = (uv[..., 1] - v0) * z / f
    return torch.stack([x, y, z], dim=-1)


def camera_vector(camera: Camera) -> np.ndarray:
    """A camera as the ``(6,)`` float64 ``pd, xo, yo, pp, width, height`` the batches carry."""
    return np.array(
        [camera.pd, camera.xo, camera.yo, camera.pp, camera.width, camera.height], dtype=np.float64
    )


def vector_intrinsics(camera: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``f`` (pixels) and the principal point ``(u0, v0)`` of ``(..., 6)`` camera vectors
    (:func:`camera_vector`), as :attr:`Camera.focal_px` and :attr:`Camera.principal_point` give them."""
    pd, xo, yo, pp, w, h = camera.unbind(-1)
    return pd / pp, w / 2 + xo / pp, h / 2 - yo / pp


def project_points(points: torch.Tensor, camera: torch.Tensor) -> torch.Tensor:
    """:meth:`Camera.project` for a batch: points ``(B, 3)`` through cameras ``(B, 6)`` → ``(B, 2)``."""
    return pinhole_project(points, *vector_intrinsics(camera))


def backproject_points(uv: torch.Tensor, z: torch.Tensor, camera: torch.Tensor) -> torch.Tensor:
    """:meth:`Camera.backproject` for a batch: pixels ``(B, 2)`` at depths ``(B,)`` → ``(B, 3)``."""
    return pinhole_backproject(uv, z, *vector_intrinsics(camera))
