"""Registration's precise step: Gauss–Newton on the silhouette's outline (an ``outline`` stage).

A CMA-ES stage scores whole renders, whose overlap moves in steps of a pixel: near the optimum the
cost is flat to within its quantisation, and the search can stop a degree or a few millimetres short
of the truth (a small tibial tray, ~7000 px at 1024², is where this shows). The model's outline, by
contrast, moves continuously with the pose, so the distance from each outline point to the mask's
edge has a gradient at any precision: the contour/distance-map formulation of silhouette registration.

At a pose, outline points are sampled every ~0.75 px along the contour generator (mesh edges between
a face turned to the X-ray source and one turned away), projected by the one projection
(:func:`jtml.geometry.camera.pinhole_project`), and kept where the rendered silhouette lies on one
side of them and not on the other (an interior fold has it on both). The residuals (px) are both
ways, the two sets weighted equally: each outline point's signed distance to the mask's edge, and
each mask edge point's distance, along its normal, to the nearest outline point — one way alone
lets a silhouette sit inside part of the mask. Near the edge the distance is read off the mask
blurred by a Gaussian (``σ·Φ⁻¹`` of it: unbiased for a straight edge sampled at pixel centres, where
a distance transform of the pixels is biased by a fraction of a pixel — millimetres of depth).
Levenberg–Marquardt with Huber weights (ICP: pairs fixed while it converges, then paired again)
moves the search's own offsets (:func:`jtml.registration.search.offset_transforms`: in-plane, along
the line of sight, turns about the model's centre) within the stage's box, the Jacobian by central
differences in one batch; points farther than ``far_px`` from the mask's edge (a segmentation's
holes, the other implant's overlap) are left out. A search keeps the result only when its own cost
(overlap and edge distance at full resolution, with the prior) is not worse
(:func:`jtml.registration.search.search`), so an outline stage never undoes a good search.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from jtml.geometry import SilhouetteRenderer
from jtml.geometry.camera import pinhole_project
from jtml.geometry.masks import signed_distance
from jtml.registration.costs import SilhouetteTarget, boundary

__all__ = ["ContourFit", "Outline", "fit_outline"]


class Outline:
    """A model's edges and their two faces, for the contour generator at any pose."""

    def __init__(self, renderer: SilhouetteRenderer, spacing_px: float = 0.75) -> None:
        vertices = renderer.vertices.detach().cpu().numpy().astype(np.float64)
        faces = renderer.faces.detach().cpu().numpy().astype(np.int64)
        pairs = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
        owner = np.tile(np.arange(len(faces)), 3)
        pairs = np.sort(pairs, axis=1)
        key = pairs[:, 0] * len(vertices) + pairs[:, 1]
        order = np.argsort(key, kind="stable")
        key, pairs, owner = key[order], pairs[order], owner[order]
        start = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
        count = np.diff(np.r_[start, len(key)])
        two = start[count == 2]  # edges of exactly two faces (a closed model: all of them)
        self.edges = pairs[two]
        self.faces = np.stack([owner[two], owner[two + 1]], axis=1)
        self.open_edges = pairs[start[count == 1]]  # a boundary of an open model: always outline
        p = vertices[faces]
        self.normals = np.cross(p[:, 1] - p[:, 0], p[:, 2] - p[:, 0])
        self.offsets = (self.normals * p[:, 0]).sum(axis=1)
        self.vertices = vertices
        # model mm per pixel at the model's distance: the lab's fluoroscopes image ~1 m from the source
        cam = renderer.camera
        self.spacing = spacing_px * 1000.0 / cam.focal_px if cam.focal_px > 0 else 0.25

    def points(self, R: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Model-frame sample points ``(M, 3)`` on the contour generator at rotation ``R``,
        translation ``t`` (the model-to-camera transform), and each one's edge direction ``(M, 3)``."""
        source = -R.T @ t  # the X-ray source in model coordinates
        facing = self.normals @ source - self.offsets >= 0
        contour = self.edges[facing[self.faces[:, 0]] != facing[self.faces[:, 1]]]
        edges = np.concatenate([contour, self.open_edges])
        a, b = self.vertices[edges[:, 0]], self.vertices[edges[:, 1]]
        # samples every `spacing` along each edge (its far end is the next edge's first sample)
        count = np.maximum(np.ceil(np.linalg.norm(b - a, axis=1) / self.spacing), 1).astype(np.int64)
        which = np.repeat(np.arange(len(edges)), count)
        first = np.cumsum(count) - count
        frac = (np.arange(len(which)) - first[which]) / count[which]
        d = b - a
        return a[which] + frac[:, None] * d[which], d[which]


@dataclass
class ContourFit:
    """What :func:`fit_outline` did: the offsets found, how many LM iterations and renders, the
    outline points used at the end, and whether the box was hit."""

    offsets: np.ndarray  # (6,) search offsets (mm, °) from the start
    iterations: int
    renders: int
    points: int
    rms_px: float  # the kept points' RMS distance to the mask's boundary at the result
    hit_bounds: bool


SIGMA = 1.5  # px: the Gaussian that turns the binary mask into a sub-pixel edge
_NEAR = 2.5  # px: within this of the mask's edge the residual comes from the blurred mask


def _levels(mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """A binary mask's signed distance (px, + inside) two ways: from the distance transform (far
    from the edge; on a staircase of pixels it is biased by a fraction of a pixel), and the mask
    blurred by a Gaussian of ``SIGMA`` px (near the edge: for a straight edge sampled at pixel
    centres the blurred step is ``Φ(d/σ)``, so ``σ·Φ⁻¹`` of it is the distance, unbiased)."""
    m = np.asarray(mask).astype(np.uint8)
    sd = signed_distance(m > 0).astype(np.float64)
    blurred = cv2.GaussianBlur(m.astype(np.float64), (0, 0), SIGMA, borderType=cv2.BORDER_CONSTANT)
    return torch.as_tensor(sd, dtype=torch.float64), torch.as_tensor(blurred, dtype=torch.float64)


def _signed_distance(target: SilhouetteTarget) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_levels` of the target's mask, cached on it."""
    cached = getattr(target, "_signed", None)
    if cached is None:
        cached = _levels(target.mask)
        object.__setattr__(target, "_signed", cached)
    return cached


def _distance(sd: torch.Tensor, blurred: torch.Tensor, uv: torch.Tensor) -> torch.Tensor:
    """Signed distance (px, + inside) to the mask's edge at continuous pixel coordinates ``uv``."""
    far = _bilinear(sd, uv)
    g = _bilinear(blurred, uv).clamp(1e-6, 1 - 1e-6)
    near = SIGMA * math.sqrt(2.0) * torch.erfinv(2 * g - 1)
    return torch.where(far.abs() < _NEAR, near, far)


def _bilinear(image: torch.Tensor, uv: torch.Tensor) -> torch.Tensor:
    """``image`` ``(H, W)`` at continuous pixel coordinates ``uv`` ``(M, 2)`` (pixel ``(r, c)``'s
    centre at ``(c + 0.5, r + 0.5)``), differentiable in ``uv``; clamped at the border."""
    h, w = image.shape
    x = (uv[:, 0] - 0.5).clamp(0, w - 1.000001)
    y = (uv[:, 1] - 0.5).clamp(0, h - 1.000001)
    x0, y0 = x.detach().floor(), y.detach().floor()
    fx, fy = x - x0, y - y0
    i, j = y0.long(), x0.long()
    flat = image.reshape(-1)

    def at(r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return flat.index_select(0, r * w + c)

    top = at(i, j) * (1 - fx) + at(i, j + 1) * fx
    bottom = at(i + 1, j) * (1 - fx) + at(i + 1, j + 1) * fx
    return top * (1 - fy) + bottom * fy


def _mask_edge(target: SilhouetteTarget) -> tuple[torch.Tensor, torch.Tensor]:
    """The mask's edge as sub-pixel points ``(K, 2)`` (each boundary pixel's centre moved along the
    outward normal by its signed distance, :func:`_distance`) and their outward normals, cached."""
    cached = getattr(target, "_edge", None)
    if cached is None:
        sd, blurred = _signed_distance(target)
        r, c = np.nonzero(boundary(target.mask))
        gy, gx = np.gradient(blurred.numpy())
        n = -np.stack([gx[r, c], gy[r, c]], axis=1)  # outward: the blurred mask falls
        n /= np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)
        centres = torch.as_tensor(np.stack([c + 0.5, r + 0.5], axis=1))
        d = _distance(sd, blurred, centres).numpy()
        q = centres.numpy() + d[:, None] * n
        cached = (torch.as_tensor(q), torch.as_tensor(n))
        object.__setattr__(target, "_edge", cached)
    return cached


def fit_outline(
    renderer: SilhouetteRenderer,
    target: SilhouetteTarget,
    centre: np.ndarray,
    pivot: np.ndarray,
    half: np.ndarray,
    iterations: int = 8,
    inner: int = 4,
    huber_px: float = 1.0,
    far_px: float = 8.0,
    on_outline_px: float = 0.5,
) -> ContourFit:
    """LM from the pose row ``centre`` (module docstring): offsets within ``±half`` (the stage's
    box, mm and °) that bring the model's outline onto the mask's boundary and back: each outline
    point's signed distance to the mask's boundary, and each mask boundary point's distance (along
    its normal) to the nearest outline point, the two sets weighted equally."""
    from scipy.spatial import cKDTree

    from jtml.registration.search import offset_transforms

    cam = renderer.camera
    f, (u0, v0) = cam.focal_px, cam.principal_point
    outline = _outline(renderer)
    sd, blurred = _signed_distance(target)
    edge_q, edge_n = _mask_edge(target)
    bound = torch.as_tensor(half, dtype=torch.float64)
    renders = 0

    def project(theta: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        """Pixels ``(B, M, 2)`` of model points ``(M, 3)`` at offsets ``(B, 6)``."""
        T = offset_transforms(centre, theta.reshape(-1, 6), pivot)
        return pinhole_project(points @ T[:, :3, :3].transpose(1, 2) + T[:, None, :3, 3], f, u0, v0)

    def state(theta: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """The outline points on the rendered silhouette's outer boundary at ``theta``, the mask
        boundary points paired with their nearest outline point, and the per-residual weights."""
        nonlocal renders
        T = offset_transforms(centre, theta[None], pivot)[0].numpy()
        pts, along = outline.points(T[:3, :3], T[:3, 3])
        win = renderer.render_windows(torch.as_tensor(T[None]))
        renders += 1
        if not bool(win.valid[0]) or len(pts) == 0:
            return None
        mask = win.masks[0].cpu().numpy()
        # an outer outline point lies on the rendered silhouette's edge (an interior fold lies
        # inside it): its distance to that edge, read off the render as off the mask, is ~0
        corner = torch.tensor([float(win.x0[0]), float(win.y0[0])], dtype=torch.float64)
        uv_t = project(theta, torch.as_tensor(pts))[0]
        rendered = _levels(mask)
        keep = (_distance(*rendered, uv_t - corner).abs() <= on_outline_px).numpy()
        uv = uv_t.numpy()
        if keep.sum() < 12:
            return None
        points, uv = torch.as_tensor(pts[keep]), uv[keep]
        dist, k = cKDTree(uv).query(edge_q.numpy(), distance_upper_bound=far_px)
        paired = np.isfinite(dist)
        if paired.sum() < 12:
            return None
        return {"points": points, "k": torch.as_tensor(k[paired]), "q": edge_q[paired], "n": edge_n[paired]}

    def residuals(theta: torch.Tensor, s: dict[str, torch.Tensor]) -> torch.Tensor:
        """``(B, M)`` residuals (px) at offsets ``(B, 6)``, or ``(M,)`` at one ``(6,)``."""
        uv = project(theta, s["points"])
        b, m = uv.shape[:2]
        forward = _distance(sd, blurred, uv.reshape(-1, 2)).view(b, m)
        back = ((uv.index_select(1, s["k"]) - s["q"]) * s["n"]).sum(dim=2)
        out = torch.cat([forward, back], dim=1)
        return out[0] if theta.ndim == 1 else out

    def jacobian(theta: torch.Tensor, s: dict[str, torch.Tensor]) -> torch.Tensor:
        """``(M, 6)`` by central differences, all 12 offsets in one batch (the residuals are
        piecewise linear in the pixels: exact up to the kinks)."""
        h = 1e-3  # mm or degrees
        steps = torch.eye(6, dtype=torch.float64) * h
        both = residuals(torch.cat([theta + steps, theta - steps]), s)
        return ((both[:6] - both[6:]) / (2 * h)).T

    def robust(r: torch.Tensor, s: dict[str, torch.Tensor]) -> tuple[torch.Tensor, float]:
        """Huber weights (0 beyond ``far_px``), each set scaled by its size, and the total cost."""
        n_fwd = len(s["points"])
        a = r.abs()
        w = torch.where(a <= huber_px, 1.0, huber_px / a.clamp(min=1e-12))
        used = a <= far_px
        w = torch.where(used, w, 0.0)
        scale = torch.ones_like(r)
        scale[:n_fwd] = 1.0 / max(int(used[:n_fwd].sum()), 1)
        scale[n_fwd:] = 1.0 / max(int(used[n_fwd:].sum()), 1)
        rho = torch.where(a <= huber_px, 0.5 * a * a, huber_px * (a - 0.5 * huber_px))
        return w * scale, float((rho * scale * used).sum())

    theta = torch.zeros(6, dtype=torch.float64)
    s = state(theta)
    if s is None:
        return ContourFit(np.zeros(6), 0, renders, 0, float("nan"), False)
    done, lam = 0, 1e-3
    for _ in range(iterations):  # ICP: the pairs fixed while LM converges, then paired again
        before = theta
        r = residuals(theta, s)
        weights, cost = robust(r, s)
        for _ in range(inner):
            J = jacobian(theta, s)  # (M, 6)
            A = J.T @ (weights[:, None] * J)
            g = J.T @ (weights * r)
            accepted = False
            for _ in range(5):
                damped = A + lam * torch.diag(torch.diagonal(A)) + 1e-12 * torch.eye(6, dtype=torch.float64)
                trial = torch.maximum(torch.minimum(theta + torch.linalg.solve(damped, -g), bound), -bound)
                trial_r = residuals(trial, s)
                trial_w, trial_cost = robust(trial_r, s)
                if trial_cost < cost:
                    theta, r, weights, cost, accepted = trial, trial_r, trial_w, trial_cost, True
                    lam = max(lam / 3, 1e-7)
                    break
                lam *= 4
            if not accepted:
                break
        done += 1
        moved = float(((theta - before) / bound).abs().max())
        fresh = state(theta)
        if fresh is None:
            theta = before
            break
        s = fresh
        if moved < 1e-4:
            break
    r = residuals(theta, s)
    used = r.abs() <= far_px
    rms = float(torch.sqrt((r[used] ** 2).mean())) if bool(used.any()) else float("nan")
    hit = bool(((theta.abs() / bound) > 0.98).any())
    return ContourFit(theta.numpy().copy(), done, renders, int(used.sum()), rms, hit)


def _outline(renderer: SilhouetteRenderer) -> Outline:
    """The renderer's :class:`Outline`, built once per model."""
    cached = getattr(renderer, "_outline", None)
    if cached is None:
        cached = Outline(renderer)
        renderer._outline = cached  # type: ignore[attr-defined]
    return cached
