"""Silhouette rendering of an STL at a pose: a pixel is set when its centre lies in a triangle.

This is the rule JointTrack's labels follow (see the kneel1 README), reproduced exactly. The
rasteriser is a vectorised scanline fill in torch, float64 throughout (a CPU and a GPU can differ
only where a pixel centre lies within rounding, ~1e-12 px, of an edge): every (triangle, row) pair
yields a span of pixel centres, spans are accumulated as +1/−1 events per row and a cumulative sum
fills them. It renders any number of poses in one call (:meth:`SilhouetteRenderer.render_windows`,
what registration evaluates), one pose for data loaders (:meth:`~SilhouetteRenderer.render_window`)
or a whole frame (:meth:`~SilhouetteRenderer.render`): one implementation behind all of them. No
Python loop over triangles, no OpenGL context; on a CPU with one torch thread (:func:`one_cpu_thread`).

Every render is done inside the window around the projected model: shifting pixel coordinates
by an integer offset leaves every pixel-centre test unchanged, so the cost is that of the window,
not of the frame. A shared edge is crossed at the same x by both of its triangles (each edge's
crossing is computed from its endpoints ordered by v), so no pixel falls through a crack.

Closed models: the silhouette of a closed, consistently wound surface (:func:`closed_mesh`) is the
union of the triangles turned to the source — a line of sight that meets the surface goes in and
out as often, so it crosses a triangle turned to the source whenever it crosses any — so
:class:`SilhouetteRenderer` rasterises only those (about half the work, the same pixels; triangles
within a rounding margin of edge-on are kept, which can only add pixels the silhouette has anyway)
when the model is closed, and every triangle otherwise.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import trimesh

from jtml.errors import JTMLError
from jtml.geometry.camera import Camera, pinhole_project
from jtml.geometry.rotations import euler312_to_matrix, matrix_to_pose, pose_to_matrix

__all__ = [
    "RenderedWindows",
    "SilhouetteRenderer",
    "closed_mesh",
    "one_cpu_thread",
    "project_mesh",
    "project_vertices",
    "rasterize",
    "rasterize_triangles",
    "render_silhouette",
]


@contextlib.contextmanager
def one_cpu_thread(device: torch.device | str = "cpu") -> Iterator[None]:
    """One torch intra-op thread while rendering on a CPU (the caller's setting comes back after).

    A render is a few hundred small ops; those over torch's grain size (a span list of 30k) go
    parallel, and waking a second thread for each costs more than the op — 13x slower renders on a
    busy 2-core machine with 2 threads. More cores are for more processes (DataLoader workers, DDP)."""
    previous = torch.get_num_threads()
    if torch.device(device).type != "cpu" or previous == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _transforms(poses: torch.Tensor | np.ndarray, device: torch.device | None = None) -> torch.Tensor:
    """``(N, 6)`` pose rows or ``(N, 4, 4)`` matrices → ``(N, 4, 4)`` float64 on ``device``."""
    p = poses if isinstance(poses, torch.Tensor) else torch.as_tensor(np.asarray(poses, dtype=np.float64))
    p = p.to(device=device, dtype=torch.float64)
    if p.shape[-2:] == (4, 4):
        return p.reshape(-1, 4, 4)
    return pose_to_matrix(p.reshape(-1, 6))


def _rotation_translation(
    poses: torch.Tensor | np.ndarray, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N, 6)`` pose rows (or ``(N, 4, 4)`` matrices) → rotations ``(N, 3, 3)`` and translations
    ``(N, 3, 1)``, float64 on ``device``."""
    p = poses if isinstance(poses, torch.Tensor) else torch.as_tensor(np.asarray(poses, dtype=np.float64))
    p = p.to(device=device, dtype=torch.float64)
    if p.shape[-2:] == (4, 4):
        T = p.reshape(-1, 4, 4)
        return T[:, :3, :3], T[:, :3, 3:]
    p = p.reshape(-1, 6)
    return euler312_to_matrix(p[:, 3:]), p[:, :3, None]


def _camera_points(vertices_t: torch.Tensor, R: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``P = R·p + t`` of vertices ``(3, V)`` for rotations ``(N, 3, 3)``, translations ``(N, 3, 1)``:
    ``(N, 3, V)`` (rows x, y, z, each contiguous)."""
    return torch.matmul(R, vertices_t) + t


def _pixels(P: torch.Tensor, camera: Camera) -> tuple[torch.Tensor, torch.Tensor]:
    """Camera-frame points ``(N, 3, V)`` → pixel ``u, v`` ``(N, V)``, by the one projection
    (:func:`jtml.geometry.camera.pinhole_project`, :meth:`Camera.project`'s formula)."""
    uv = pinhole_project(P.transpose(1, 2), camera.focal_px, *camera.principal_point)
    return uv[..., 0].contiguous(), uv[..., 1].contiguous()


def project_vertices(
    vertices: torch.Tensor, T: torch.Tensor, camera: Camera
) -> tuple[torch.Tensor, torch.Tensor]:
    """Model vertices ``(V, 3)`` through ``(N, 4, 4)`` model-to-camera transforms → pixel coordinates
    ``(N, V, 2)`` and ``(N,)`` True where the model lies at or behind the X-ray source (z ≥ 0)."""
    P = _camera_points(vertices.to(torch.float64).T, T[:, :3, :3], T[:, :3, 3:])
    u, v = _pixels(P, camera)
    return torch.stack([u, v], dim=-1), (P[:, 2] >= 0).any(dim=1)


def _check_pose(pose: np.ndarray) -> np.ndarray:
    pose = np.asarray(pose, dtype=np.float64)
    if pose.shape not in ((6,), (4, 4)) or not np.isfinite(pose).all():
        raise JTMLError(f"a pose needs 6 finite numbers (or a finite 4x4 matrix), got {pose.tolist()}")
    return pose


def _behind_error(pose: np.ndarray) -> JTMLError:
    shown = pose.tolist() if pose.shape == (6,) else matrix_to_pose(torch.from_numpy(pose)).tolist()
    return JTMLError(f"pose {shown} puts the model at or behind the X-ray source (needs z < 0)")


def project_mesh(vertices: np.ndarray, pose: np.ndarray, camera: Camera) -> np.ndarray:
    """Model vertices ``(N, 3)`` at a pose → pixel coordinates ``(N, 2)`` (float64).

    ``pose``: a JointTrack pose row ``(6,)`` or the 4×4 model-to-camera matrix it stands for."""
    pose = _check_pose(pose)
    V = torch.as_tensor(np.asarray(vertices, dtype=np.float64)).reshape(-1, 3)
    uv, behind = project_vertices(V, _transforms(pose[None]), camera)
    if bool(behind[0]):
        raise _behind_error(pose)
    return uv[0].numpy()


# ------------------------------------------------------------------------------------------------
# The scanline fill (the one rasteriser)
# ------------------------------------------------------------------------------------------------


def _stable_orders() -> torch.Tensor:
    """``(8, 3)``: for the code ``4·[v1 < v0] + 2·[v2 < v0] + [v2 < v1]`` of a triangle, its vertex
    indices in the order a stable sort by v gives them (ties keep their order)."""
    table = []
    for code in range(8):
        c01, c02, c12 = code >> 2 & 1, code >> 1 & 1, code & 1
        rank = [c01 + c02, 1 - c01 + c12, 2 - c02 - c12]
        table.append([rank.index(r) for r in range(3)] if sorted(rank) == [0, 1, 2] else [0, 1, 2])
    return torch.tensor(table, dtype=torch.int64)


_ORDERS: dict[torch.device, torch.Tensor] = {}


def _orders(device: torch.device) -> torch.Tensor:
    if device not in _ORDERS:
        _ORDERS[device] = _stable_orders().to(device)
    return _ORDERS[device]


def _fill(
    U: torch.Tensor,
    V: torch.Tensor,
    image: torch.Tensor | None,
    hs: torch.Tensor,
    ws: torch.Tensor,
    H: int,
    W: int,
) -> torch.Tensor:
    """The scanline fill: triangles given by their corners' ``U``, ``V`` ``(3, K)`` (row j: corner
    j of each triangle, pixel coordinates) in images ``image`` ``(K,)`` (None: all in image 0) of
    sizes ``hs``, ``ws`` ``(N,)`` → bool ``(N, H, W)``; pixels beyond an image's own size stay False."""
    n_img = len(hs)
    dev = hs.device
    k_all = U.shape[1]
    if k_all == 0 or n_img == 0 or H == 0 or W == 0:
        return torch.zeros((n_img, H, W), dtype=torch.bool, device=dev)
    f64 = torch.float64
    u0, u1, u2 = U[0], U[1], U[2]
    v0, v1, v2 = V[0], V[1], V[2]
    if image is None:
        hf, wf = hs[0].to(f64), ws[0].to(f64)
    else:
        hf, wf = hs.to(f64).index_select(0, image), ws.to(f64).index_select(0, image)
    vmin, vmax = torch.minimum(torch.minimum(v0, v1), v2), torch.maximum(torch.maximum(v0, v1), v2)
    umin, umax = torch.minimum(torch.minimum(u0, u1), u2), torch.maximum(torch.maximum(u0, u1), u2)
    # Rows whose centre y = r + 0.5 lies in [va, vc], clipped to the image.
    r0 = torch.clamp(torch.ceil(vmin - 0.5), min=0).minimum(hf)
    r1 = torch.clamp(torch.floor(vmax - 0.5), min=-1).minimum(hf - 1)
    # Drop triangles entirely off-image or degenerate in v.
    kept = ((r1 >= r0) & (vmax > vmin) & (umax >= 0.5) & (umin <= wf - 0.5)).nonzero().squeeze(1)
    if kept.numel() == 0:
        return torch.zeros((n_img, H, W), dtype=torch.bool, device=dev)
    # Each kept triangle's corners a, b, c ordered by v (stably), gathered from the stacked corners.
    code = (v1 < v0).to(torch.uint8) * 4 + (v2 < v0).to(torch.uint8) * 2 + (v2 < v1).to(torch.uint8)
    order = _orders(dev).index_select(0, code.index_select(0, kept).to(torch.int64))
    Uf, Vf = U.reshape(-1), V.reshape(-1)
    ia, ib, ic = (kept + order[:, j] * k_all for j in range(3))
    ua, ub, uc = Uf.index_select(0, ia), Uf.index_select(0, ib), Uf.index_select(0, ic)
    va, vb, vc = Vf.index_select(0, ia), Vf.index_select(0, ib), Vf.index_select(0, ic)
    r0, r1 = r0.index_select(0, kept), r1.index_select(0, kept)
    # Each triangle is two halves: the rows above its middle corner b (short edge a→b) and the rows
    # from b down (short edge b→c); y < vb exactly when row < ceil(vb − 0.5). Each edge is crossed
    # at x = top.u + (y − top.v)·slope, its slope from its endpoints: the same x in both triangles
    # that share it.
    rb = torch.ceil(vb - 0.5).clamp(min=r0, max=r1 + 1)
    k_ac = (uc - ua) / (vc - va)
    k_ab = (ub - ua) / (vb - va)  # not finite only where the upper half has no rows (va == vb)
    # A flat bottom (vb == vc) reached exactly at its own row: the short edge is the point b.
    k_bc = ((uc - ub) / (vc - vb)).masked_fill(vc == vb, 0.0)
    first_row = torch.cat([r0, rb])
    counts = (torch.cat([rb, r1 + 1]) - first_row).to(torch.int64)
    spans = int(counts.sum())
    if spans == 0:
        return torch.zeros((n_img, H, W), dtype=torch.bool, device=dev)
    # Span s belongs to half tid[s]; its row is that half's first row + (s − the half's first span).
    tid = torch.repeat_interleave(torch.arange(len(counts), device=dev), counts, output_size=spans)
    row_shift = first_row - (torch.cumsum(counts, 0) - counts).to(f64)
    if image is not None:  # every image's rows in one sequence: image n's row r is n·H + r
        img2 = image.index_select(0, kept).to(f64).repeat(2) * H
        row_shift = row_shift + img2
    per_half = ((ua, ua), (va, va), (k_ac, k_ac), (ua, ub), (va, vb), (k_ab, k_bc))
    a_u, a_v, a_k, s_u, s_v, s_k = (torch.cat(c).index_select(0, tid) for c in per_half)
    rows = row_shift.index_select(0, tid) + torch.arange(spans, device=dev, dtype=f64)
    y = (rows - img2.index_select(0, tid) if image is not None else rows) + 0.5
    # The long edge a→c and the half's short edge cross the row at these x; the span lies between.
    x_long = a_u + (y - a_v) * a_k
    x_short = s_u + (y - s_v) * s_k
    xl, xr = torch.minimum(x_long, x_short), torch.maximum(x_long, x_short)
    # Columns [c0, c1) (pixel centre c + 0.5 in [xl, xr]), clipped to the output; a span covering
    # no centre adds +1 and −1 at the same place: nothing. What lies beyond an image's own width
    # is cleared at the end.
    c0 = torch.clamp(torch.ceil(xl - 0.5), min=0, max=W)
    c1 = torch.maximum(torch.clamp(torch.floor(xr + 0.5), max=W), c0)
    stride = W + 1
    base = rows * stride
    ones = torch.ones(spans, dtype=torch.int32, device=dev)
    events = torch.zeros(n_img * H * stride, dtype=torch.int32, device=dev)
    events.scatter_add_(0, (base + c0).to(torch.int64), ones)
    events.scatter_add_(0, (base + c1).to(torch.int64), -ones)
    out = events.view(n_img, H, stride).cumsum(dim=2, dtype=torch.int32)[:, :, :W] > 0
    if bool((ws < W).any()):
        out &= torch.arange(W, device=dev) < ws[:, None, None]
    return out


def rasterize(tri_uv: torch.Tensor, height: int | torch.Tensor, width: int | torch.Tensor) -> torch.Tensor:
    """Fill ``(N, M, 3, 2)`` triangles (N images of M triangles, pixel coordinates) → bool
    ``(N, H, W)`` masks.

    Pixel ``(col, row)`` of image ``n`` is set when ``(col + 0.5, row + 0.5)`` lies inside (or on the
    edge of) any of its triangles: closed edges, so triangles sharing an edge leave no crack.
    ``height``/``width``: the image size, an int or one per image ``(N,)`` (the output has the
    largest; pixels beyond an image's own size stay False).
    """
    n_img, m = tri_uv.shape[:2]
    dev = tri_uv.device
    hs = torch.as_tensor(height, device=dev).to(torch.int64).expand(n_img).contiguous()
    ws = torch.as_tensor(width, device=dev).to(torch.int64).expand(n_img).contiguous()
    H, W = (int(hs.max()), int(ws.max())) if n_img else (0, 0)
    t = tri_uv.to(torch.float64).reshape(n_img * m, 3, 2).permute(2, 1, 0)  # (2, 3, N·M)
    image = torch.arange(n_img, device=dev).repeat_interleave(m) if n_img > 1 else None
    return _fill(t[0].contiguous(), t[1].contiguous(), image, hs, ws, H, W)


def rasterize_triangles(tri_uv: np.ndarray, height: int, width: int) -> np.ndarray:
    """Fill ``(M, 3, 2)`` triangles given in pixel coordinates; returns a bool ``(H, W)`` mask.

    Pixel ``(col, row)`` is set when ``(col + 0.5, row + 0.5)`` lies inside (or on the edge of)
    any triangle: closed edges, so triangles sharing an edge leave no crack (:func:`rasterize`).
    Only the window around the triangles is filled (integer shifts keep every test as it is).
    """
    with one_cpu_thread():
        return _rasterize_triangles(np.asarray(tri_uv, dtype=np.float64).reshape(-1, 3, 2), height, width)


def _rasterize_triangles(tri: np.ndarray, height: int, width: int) -> np.ndarray:
    mask = np.zeros((int(height), int(width)), dtype=bool)
    finite = tri[np.isfinite(tri).all(axis=(1, 2))]
    if len(finite) == 0 or height <= 0 or width <= 0:
        return mask
    lo, hi = finite.reshape(-1, 2).min(0), finite.reshape(-1, 2).max(0)
    x0, y0 = (int(np.clip(np.floor(c) - 1, 0, s)) for c, s in zip(lo, (width, height), strict=True))
    x1, y1 = (int(np.clip(np.ceil(c) + 1, 0, s)) for c, s in zip(hi, (width, height), strict=True))
    if x1 <= x0 or y1 <= y0:
        return mask
    local = torch.as_tensor(tri - np.array([x0, y0], dtype=np.float64))[None]
    mask[y0:y1, x0:x1] = rasterize(local, y1 - y0, x1 - x0).numpy()[0]
    return mask


# ------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------


def closed_mesh(vertices: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
    """Exactly equal vertices merged (STLs repeat them per triangle): ``(vertices, faces, closed)``.

    ``closed``: every edge a→b of a triangle is matched by an edge b→a of another — a closed,
    consistently wound surface (watertight; several closed solids that touch count too: the
    built-in implants are unions of closed parts)."""
    vertices = np.asarray(vertices, dtype=np.float64)
    unique, inverse = np.unique(vertices, axis=0, return_inverse=True)
    faces = inverse.reshape(-1)[np.asarray(faces, dtype=np.int64)].reshape(-1, 3)
    a, b = faces.reshape(-1), faces[:, [1, 2, 0]].reshape(-1)
    n = len(unique)
    closed = len(faces) > 0 and bool(np.array_equal(np.sort(a * n + b), np.sort(b * n + a)))
    return unique, faces, closed


@dataclass
class RenderedWindows:
    """Silhouettes of N poses, each inside its own window of the frame.

    ``masks`` bool ``(N, h, w)``: image ``n``'s window is ``masks[n, :heights[n], :widths[n]]``
    (the rest is False), placed at ``(x0[n], y0[n])`` in the frame; ``valid`` False where the pose
    puts the model at or behind the source (nothing rendered)."""

    masks: torch.Tensor
    x0: torch.Tensor  # (N,) int64
    y0: torch.Tensor
    heights: torch.Tensor
    widths: torch.Tensor
    valid: torch.Tensor  # (N,) bool


class SilhouetteRenderer:
    """Renders one implant model's silhouette through one camera at any number of poses.

    ``device``: where the renders run (``"cpu"``, ``"cuda"``); :meth:`render` and
    :meth:`render_window` return numpy arrays wherever they ran, :meth:`render_windows` tensors.
    :meth:`near` gives a renderer for the poses near one pose that skips the faces none of them
    can turn to the source (what a registration stage renders: the same pixels, less work)."""

    def __init__(self, mesh: trimesh.Trimesh, camera: Camera, device: str | torch.device = "cpu") -> None:
        vertices, faces, closed = closed_mesh(mesh.vertices, mesh.faces)
        p = vertices[faces]
        normals = np.cross(p[:, 1] - p[:, 0], p[:, 2] - p[:, 0])
        length = np.linalg.norm(normals, axis=1)
        self.closed = closed
        self.camera = camera
        self._arrays = {
            "vertices": vertices,
            "faces": faces,
            # Outward or inward, a closed mesh's normals all point the same way: n·(c − p) >= 0 picks
            # the faces turned to a source at c (or all the others: either set covers the silhouette).
            "normals": normals,
            "offsets": (normals * p[:, 0]).sum(axis=1),
            # far above rounding, far below any face that truly faces away
            "margins": 1e-9 * length * (np.abs(p).max(axis=(1, 2)) + 1.0),
        }
        self._units = normals / np.maximum(length, 1e-300)[:, None]
        self._centroids = p.mean(axis=1)
        self._subset: np.ndarray | None = None  # faces rendered without a per-pose test (near())
        self._place(torch.device(device))

    def _place(self, device: torch.device) -> None:
        self.device = device
        a = {k: torch.as_tensor(v, device=device) for k, v in self._arrays.items()}
        self.vertices, self.faces = a["vertices"], a["faces"]
        self._normals, self._offsets, self._margins = a["normals"], a["offsets"], a["margins"]
        self._vertices_t = self.vertices.T.contiguous()
        self._corners = (
            torch.as_tensor(self._arrays["faces"][self._subset].T.reshape(-1), device=device)
            if self._subset is not None
            else None
        )

    def with_camera(self, camera: Camera) -> SilhouetteRenderer:
        """The same model through another camera (e.g. the frame at half resolution), sharing arrays."""
        other = object.__new__(SilhouetteRenderer)
        other.__dict__.update(self.__dict__)
        other.camera = camera
        return other

    def to(self, device: str | torch.device) -> SilhouetteRenderer:
        """The same model and camera, rendering on ``device``."""
        other = self.with_camera(self.camera)
        other._place(torch.device(device))
        return other

    def near(self, poses: np.ndarray, degrees: float, mm: float) -> SilhouetteRenderer:
        """This renderer for poses within ``degrees`` of rotation (about any point of the model) and
        ``mm`` of translation of one of ``poses`` ``(6,)``/``(S, 6)``: it renders only the faces that
        such a pose can turn to the source — every other face faces away for all of them, so the
        pixels are the same (a closed model; any other model is rendered whole)."""
        if not self.closed:
            return self
        T = _transforms(np.asarray(poses, dtype=np.float64).reshape(-1, 6)).numpy()
        R, t = T[:, :3, :3], T[:, :3, 3]
        source = -np.einsum("nji,nj->ni", R, t)  # the source in model coordinates
        c = self._centroids
        radius = float(np.linalg.norm(self._arrays["vertices"] - c.mean(0), axis=1).max())
        keep = np.zeros(len(c), dtype=bool)
        for s in source:
            d = s - c
            dist = np.linalg.norm(d, axis=1)
            cos = (self._units * d).sum(axis=1) / np.maximum(dist, 1e-300)
            # how far the direction to the source can turn: the rotation itself, and the face moving
            # (by the translation and by the rotation about a point up to the model's size away)
            turn = np.radians(degrees) + np.arcsin(
                np.clip((mm + 2 * radius * np.radians(degrees)) / max(float(dist.min()) - radius, 1e-9), 0, 1)
            )
            slack = min(turn + np.radians(1.0), np.pi / 2)
            keep |= cos >= -np.sin(slack)
        other = self.with_camera(self.camera)
        other._subset = np.flatnonzero(keep)
        other._corners = torch.as_tensor(
            self._arrays["faces"][other._subset].T.reshape(-1), device=self.device
        )
        return other

    def project(self, poses: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """``(N, 6)`` poses (or ``(N, 4, 4)``) → vertex pixel coordinates ``(N, V, 2)`` and ``behind``."""
        return project_vertices(self.vertices, _transforms(poses, self.device), self.camera)

    def render(self, pose: np.ndarray) -> np.ndarray:
        """Bool ``(H, W)`` silhouette at a JointTrack pose row ``(x, y, z, z_rot, x_rot, y_rot)``."""
        win, x0, y0 = self.render_window(pose)
        mask = np.zeros((self.camera.height, self.camera.width), dtype=bool)
        mask[y0 : y0 + win.shape[0], x0 : x0 + win.shape[1]] = win
        return mask

    def render_window(self, pose: np.ndarray) -> tuple[np.ndarray, int, int]:
        """The silhouette inside the bounding window of the projected model: ``(mask, x0, y0)``,
        equal to the full frame's render there, pixel for pixel (renders for training take a few ms)."""
        pose = _check_pose(pose)
        win = self.render_windows(pose[None])
        if not bool(win.valid[0]):
            raise _behind_error(pose)
        h, w = int(win.heights[0]), int(win.widths[0])
        return win.masks[0, :h, :w].cpu().numpy(), int(win.x0[0]), int(win.y0[0])

    def render_windows(self, poses: torch.Tensor | np.ndarray) -> RenderedWindows:
        """N poses in one call, each in its own window (:class:`RenderedWindows`); a pose at or
        behind the source renders nothing and is marked invalid instead of raising."""
        with one_cpu_thread(self.device):
            return self._render_windows(poses)

    def _render_windows(self, poses: torch.Tensor | np.ndarray) -> RenderedWindows:
        R, t = _rotation_translation(poses, self.device)
        n, cam = len(R), self.camera
        P = _camera_points(self._vertices_t, R, t)
        behind = (P[:, 2] >= 0).any(dim=1)
        u, v = _pixels(P, cam)
        # The window: the projected model's bounds, one pixel of margin, clipped to the frame.
        (u_lo, u_hi), (v_lo, v_hi) = torch.aminmax(u, dim=1), torch.aminmax(v, dim=1)
        lo = torch.stack([u_lo, v_lo]).floor_() - 1
        hi = torch.stack([u_hi, v_hi]).ceil_() + 1
        size = torch.tensor([[cam.width], [cam.height]], dtype=torch.float64, device=self.device)
        lo = torch.minimum(lo.clamp_(min=0), size)
        wh = (
            (torch.minimum(hi.clamp_(min=0), size) - lo).clamp_(min=0).masked_fill_(behind, 0).to(torch.int64)
        )
        lo = lo.masked_fill_(behind, 0)
        x0y0 = lo.to(torch.int64)
        H, W = (int(x) for x in wh.amax(dim=1).flip(0)) if n else (0, 0)
        u, v = u - lo[0, :, None], v - lo[1, :, None]
        image = None
        if self._corners is not None:  # the faces of near(): the same for every pose
            m = len(self._corners) // 3
            U, V = u.index_select(1, self._corners), v.index_select(1, self._corners)
            if n > 1:
                U, V = (X.view(n, 3, m).transpose(0, 1).reshape(3, n * m) for X in (U, V))
                image = torch.arange(n, device=self.device).repeat_interleave(m)
            else:
                U, V = U.view(3, m), V.view(3, m)
        else:  # which faces to fill: those turned to the source (a closed model), or all
            if self.closed:
                source = -(R.transpose(1, 2) @ t)[:, :, 0]  # the source in model coordinates
                use = source @ self._normals.T - self._offsets >= -self._margins
                img, face = use.nonzero(as_tuple=True)
            else:
                img = torch.arange(n, device=self.device).repeat_interleave(len(self.faces))
                face = torch.arange(len(self.faces), device=self.device).repeat(n)
            at = img * len(self.vertices)
            uf, vf = u.reshape(-1), v.reshape(-1)
            idx = [at + self.faces[:, j].index_select(0, face) for j in range(3)]
            U = torch.stack([uf.index_select(0, i) for i in idx])
            V = torch.stack([vf.index_select(0, i) for i in idx])
            image = img if n > 1 else None
        masks = _fill(U, V, image, wh[1], wh[0], H, W)
        return RenderedWindows(masks, x0y0[0], x0y0[1], wh[1], wh[0], ~behind)


def render_silhouette(mesh: trimesh.Trimesh, pose: np.ndarray, camera: Camera) -> np.ndarray:
    """One-off convenience around :class:`SilhouetteRenderer`."""
    return SilhouetteRenderer(mesh, camera).render(pose)
