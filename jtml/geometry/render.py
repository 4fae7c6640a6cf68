"""Silhouette rendering of an STL at a pose: a pixel is set when its centre lies in a triangle.

This is the rule JointTrack's labels follow (see the kneel1 README), reproduced exactly. The
rasteriser is a vectorised scanline fill: every (triangle, row) pair yields a span of pixel
centres, spans are accumulated as +1/−1 events per row and a cumulative sum fills them. No
Python loop over triangles, no GPU, no OpenGL context: it runs in data-loader workers.
"""

from __future__ import annotations

import numpy as np
import torch
import trimesh

from jtml.errors import JTMLError
from jtml.geometry.camera import Camera
from jtml.geometry.rotations import matrix_to_pose, pose_to_matrix


def project_mesh(vertices: np.ndarray, pose: np.ndarray, camera: Camera) -> np.ndarray:
    """Model vertices ``(N, 3)`` at a pose → pixel coordinates ``(N, 2)`` (float64).

    ``pose``: a JointTrack pose row ``(6,)`` or the 4×4 model-to-camera matrix it stands for."""
    pose = np.asarray(pose, dtype=np.float64)
    if pose.shape not in ((6,), (4, 4)) or not np.isfinite(pose).all():
        raise JTMLError(f"a pose needs 6 finite numbers (or a finite 4x4 matrix), got {pose.tolist()}")
    T = pose if pose.shape == (4, 4) else pose_to_matrix(pose).numpy()
    P = np.asarray(vertices, dtype=np.float64) @ T[:3, :3].T + T[:3, 3]
    if (P[:, 2] >= 0).any():
        shown = pose.tolist() if pose.shape == (6,) else matrix_to_pose(torch.from_numpy(pose)).tolist()
        raise JTMLError(f"pose {shown} puts the model at or behind the X-ray source (needs z < 0)")
    return camera.project(torch.from_numpy(P)).numpy()


def rasterize_triangles(tri_uv: np.ndarray, height: int, width: int) -> np.ndarray:
    """Fill ``(M, 3, 2)`` triangles given in pixel coordinates; returns a bool ``(H, W)`` mask.

    Pixel ``(col, row)`` is set when ``(col + 0.5, row + 0.5)`` lies inside (or on the edge of)
    any triangle: closed edges, so triangles sharing an edge leave no crack.
    """
    mask = np.zeros((height, width), dtype=bool)
    if len(tri_uv) == 0:
        return mask
    # Sort each triangle's vertices by v: a (top) <= b <= c (bottom).
    order = np.argsort(tri_uv[:, :, 1], axis=1, kind="stable")
    tri = np.take_along_axis(tri_uv, order[:, :, None], axis=1)
    ua, va = tri[:, 0, 0], tri[:, 0, 1]
    ub, vb = tri[:, 1, 0], tri[:, 1, 1]
    uc, vc = tri[:, 2, 0], tri[:, 2, 1]
    # Rows whose centre y = r + 0.5 lies in [va, vc], clipped to the image.
    r0 = np.maximum(np.ceil(va - 0.5), 0).astype(np.int64)
    r1 = np.minimum(np.floor(vc - 0.5), height - 1).astype(np.int64)
    # Drop triangles entirely off-image or degenerate in v.
    keep = (
        (r1 >= r0)
        & (vc > va)
        & (np.maximum(np.maximum(ua, ub), uc) >= 0.5)
        & (np.minimum(np.minimum(ua, ub), uc) <= width - 0.5)
    )
    if not keep.any():
        return mask
    ua, va, ub, vb, uc, vc, r0, r1 = (x[keep] for x in (ua, va, ub, vb, uc, vc, r0, r1))
    counts = r1 - r0 + 1
    tid = np.repeat(np.arange(len(counts)), counts)
    starts = np.cumsum(counts) - counts
    rows = r0[tid] + (np.arange(tid.size) - starts[tid])
    y = rows + 0.5
    # Long edge a→c and the short edge (a→b above vb, b→c below).
    x_long = ua[tid] + (y - va[tid]) * (uc[tid] - ua[tid]) / (vc[tid] - va[tid])
    upper = y < vb[tid]
    with np.errstate(divide="ignore", invalid="ignore"):
        x_ab = ua[tid] + (y - va[tid]) * (ub[tid] - ua[tid]) / (vb[tid] - va[tid])
        x_bc = ub[tid] + (y - vb[tid]) * (uc[tid] - ub[tid]) / (vc[tid] - vb[tid])
    x_short = np.where(upper, x_ab, x_bc)
    # A flat top/bottom edge makes one short edge degenerate exactly at its own row: use b.
    x_short = np.where(np.isfinite(x_short), x_short, ub[tid])
    xl = np.minimum(x_long, x_short)
    xr = np.maximum(x_long, x_short)
    c0 = np.maximum(np.ceil(xl - 0.5), 0).astype(np.int64)
    c1 = np.minimum(np.floor(xr - 0.5), width - 1).astype(np.int64) + 1  # exclusive
    ok = c1 > c0
    rows, c0, c1 = rows[ok], c0[ok], c1[ok]
    if rows.size == 0:
        return mask
    # Accumulate only over the silhouette's bounding box (integer offsets keep it exact).
    top, left = int(rows.min()), int(c0.min())
    h, w = int(rows.max()) - top + 1, int(c1.max()) - left
    stride = w + 1
    base = (rows - top) * stride - left
    events = np.bincount(base + c0, minlength=h * stride).astype(np.int32)
    events -= np.bincount(base + c1, minlength=h * stride).astype(np.int32)
    box = events.reshape(h, stride).cumsum(axis=1)[:, :w] > 0
    mask[top : top + h, left : left + w] = box
    return mask


class SilhouetteRenderer:
    """Renders one implant model's silhouette through one camera at any number of poses."""

    def __init__(self, mesh: trimesh.Trimesh, camera: Camera) -> None:
        self.vertices = np.asarray(mesh.vertices, dtype=np.float64)
        self.faces = np.asarray(mesh.faces, dtype=np.int64)
        self.camera = camera

    def with_camera(self, camera: Camera) -> SilhouetteRenderer:
        """The same model through another camera (e.g. the frame at half resolution), sharing arrays."""
        other = object.__new__(SilhouetteRenderer)
        other.vertices, other.faces, other.camera = self.vertices, self.faces, camera
        return other

    def render(self, pose: np.ndarray) -> np.ndarray:
        """Bool ``(H, W)`` silhouette at a JointTrack pose row ``(x, y, z, z_rot, x_rot, y_rot)``."""
        uv = project_mesh(self.vertices, pose, self.camera)
        return rasterize_triangles(uv[self.faces], self.camera.height, self.camera.width)

    def render_window(self, pose: np.ndarray) -> tuple[np.ndarray, int, int]:
        """The silhouette inside the bounding window of the projected model: ``(mask, x0, y0)``.

        Shifting pixel coordinates by the integer window offset leaves every pixel-centre test
        unchanged, so the window equals the full frame's render there, pixel for pixel — at the
        cost of the window, not of the frame (renders for training take a few ms)."""
        cam = self.camera
        uv = project_mesh(self.vertices, pose, cam)
        x0 = int(np.clip(np.floor(uv[:, 0].min()) - 1, 0, cam.width))
        x1 = int(np.clip(np.ceil(uv[:, 0].max()) + 1, 0, cam.width))
        y0 = int(np.clip(np.floor(uv[:, 1].min()) - 1, 0, cam.height))
        y1 = int(np.clip(np.ceil(uv[:, 1].max()) + 1, 0, cam.height))
        tri = uv[self.faces] - np.array([x0, y0], dtype=np.float64)
        return rasterize_triangles(tri, max(y1 - y0, 0), max(x1 - x0, 0)), x0, y0


def render_silhouette(mesh: trimesh.Trimesh, pose: np.ndarray, camera: Camera) -> np.ndarray:
    """One-off convenience around :class:`SilhouetteRenderer`."""
    return SilhouetteRenderer(mesh, camera).render(pose)
