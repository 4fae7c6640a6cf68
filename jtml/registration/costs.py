"""How well a pose explains a silhouette: overlap (IoU) and a distance-map edge cost.

The target is one part's mask in one frame. Candidate poses are rendered in one call with the
exact pixel-centre rule (:meth:`SilhouetteRenderer.render_windows`: each pose only in the window
around its model) and compared with the mask:

- ``iou``: |rendered ∩ mask| / |rendered ∪ mask| (1 at a perfect match);
- ``edge``: the mean distance (pixels) from the rendered silhouette's boundary pixels to the mask's
  boundary — a chamfer distance, in the spirit of JTML's dilated-edge cost: it keeps a gradient
  where the overlap is already high (depth changes the size by a fraction of a pixel per mm);
- ``cost = (1 − iou) + edge_weight · edge``, lower is better. A pose that renders nothing (outside
  the view, behind the source) costs ``INVALID``.

With the frame (:meth:`SilhouetteTarget.from_frame`) the mask is refined by the image first: a
segmentation network's mask is off by pixels at the edge (and a uniform offset of its boundary is
indistinguishable from a change of depth — 2 px on a 170 px implant is 2 % of its size, ~25 mm at
1 m), while the implant's edge in the image is where it is. Within ``band`` pixels of the mask's
boundary each pixel gets the fraction of it the implant covers, read off its intensity between the
local implant (inside) and background (outside) levels; further in it is 1, further out 0, and
where the other implant is near (both are dark) or there is no contrast the mask is kept; then once
more with the levels read just inside and outside the edge so found (:func:`image_coverage`).

At a fraction of the frame's resolution (:meth:`SilhouetteTarget.at_size`, the coarse search
stages) the mask keeps what the full resolution knows: the overlap is taken with the fraction of
each coarse pixel that the mask covers (area average), and the edge distance is read off the
full-resolution distance map at the coarse pixel centres, in full-resolution pixels — so a coarse
cost moves with sub-pixel changes of the pose and is on the scale of the full-resolution one.

Everything is torch on the target's device (the renderer's), so the same code batches candidate
poses on the CPU and on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np
import torch

from jtml.errors import JTMLError
from jtml.geometry import SilhouetteRenderer
from jtml.geometry.masks import signed_distance
from jtml.geometry.render import one_cpu_thread

__all__ = ["INVALID", "SilhouetteTarget", "boundary", "image_coverage"]

INVALID = 10.0  # the cost of a pose with no silhouette in the frame


def boundary(mask: np.ndarray) -> np.ndarray:
    """The silhouette's boundary pixels (inside pixels with an outside 8-neighbour; outside the
    array counts as outside), bool."""
    m = mask.astype(np.uint8)
    return (m > 0) & (
        cv2.erode(m, np.ones((3, 3), np.uint8), borderType=cv2.BORDER_CONSTANT, borderValue=0) == 0
    )


LOOK_PX = 1.5  # the second look: levels from rings this far inside/outside the refined edge
LOOK_RING = 2.0  # px wide, alpha within LOOK_PX + 0.5 of it
OTHER_PX = 3  # px: this close to the other implant an edge may be that one's (not measured)


def image_coverage(
    frame: np.ndarray, mask: np.ndarray, other: np.ndarray | None = None, band: float = 6.0
) -> np.ndarray:
    """float32 ``(H, W)``: how much of each pixel the implant covers, from the frame near the mask's
    boundary (:meth:`SilhouetteTarget.from_frame`): ``(I_out − I) / (I_out − I_in)`` with the local
    mean intensities of a ring inside (``I_in``, the implant, dark) and outside (``I_out``), the frame
    smoothed by a 1 px Gaussian against noise. Two looks: the first with rings beyond ``band`` px of
    the mask's edge (a segmentation's edge is off by pixels), the second with rings just beyond the
    first look's edge — an implant is darker where it is thicker, so a ring deep inside reads it
    darker than at its edge, and the edge came out ~0.15 px inside the truth on ``jtml synth`` frames
    (~0.05 px with the second look: 3 mm → 1 mm of depth on a tibial tray 85 px wide)."""
    image = cv2.GaussianBlur(np.asarray(frame, np.float32), (0, 0), 1.0)
    m = np.asarray(mask) > 0
    near_other = None
    if other is not None and np.asarray(other).any():
        size = 2 * OTHER_PX + 1
        near_other = cv2.dilate((np.asarray(other) > 0).astype(np.uint8), np.ones((size, size), np.uint8)) > 0
    first = _coverage_look(image, m, m.astype(np.float32), near_other, band, band, 6.0)
    refined = cv2.morphologyEx((first > 0.5).astype(np.uint8), cv2.MORPH_OPEN, np.ones((3, 3), np.uint8)) > 0
    if not refined.any():
        return first
    return _coverage_look(image, refined, first, near_other, LOOK_PX + 0.5, LOOK_PX, LOOK_RING)


def _coverage_look(
    image: np.ndarray,
    m: np.ndarray,
    fallback: np.ndarray,
    near_other: np.ndarray | None,
    band: float,
    gap: float,
    ring: float,
) -> np.ndarray:
    """One look of :func:`image_coverage` about mask ``m``: the levels from rings ``gap`` to
    ``gap + ring`` px inside and outside its edge, alpha within ``band`` px of it; 1 further in, 0
    further out, ``fallback`` where it cannot be measured (the other implant near, no contrast)."""
    sd = signed_distance(m)
    inner = ((sd > gap) & (sd < gap + ring)).astype(np.float32)
    outer = ((sd < -gap) & (sd > -gap - ring)).astype(np.float32)
    keep = np.ones(m.shape, dtype=bool)
    if near_other is not None:
        outer[near_other] = 0.0
        keep &= ~near_other
    k = (41, 41)

    def box(x: np.ndarray) -> np.ndarray:
        return cv2.boxFilter(x, -1, k, normalize=False, borderType=cv2.BORDER_CONSTANT)

    n_in, n_out = box(inner), box(outer)
    level_in = box(image * inner) / np.maximum(n_in, 1e-6)
    level_out = box(image * outer) / np.maximum(n_out, 1e-6)
    contrast = level_out - level_in
    measured = (n_in > 5) & (n_out > 5)
    # the implant is darker than its surroundings (X-ray attenuation); a frame stored the other way
    # round has its contrast negative almost everywhere: flip it
    if measured.any() and float(np.median(contrast[measured])) < 0:
        contrast, level_out, image = -contrast, -level_out, -image
    alpha = np.clip((level_out - image) / np.maximum(contrast, 1e-3), 0.0, 1.0)
    usable = keep & measured & (contrast > 0.05 * (float(image.max()) - float(image.min())))
    near_edge = np.abs(sd) <= band
    coverage = np.where(
        sd > band, 1.0, np.where(sd < -band, 0.0, np.where(usable & near_edge, alpha, fallback))
    )
    return coverage.astype(np.float32)


def _boundary(masks: torch.Tensor) -> torch.Tensor:
    """:func:`boundary` of ``(N, h, w)`` bool masks, in torch (a separable 3×3 erosion)."""
    p = torch.nn.functional.pad(masks, (1, 1, 1, 1), value=False)
    rows = p[:, :, :-2] & p[:, :, 1:-1] & p[:, :, 2:]
    return masks & ~(rows[:, :-2] & rows[:, 1:-1] & rows[:, 2:])


@dataclass
class SilhouetteTarget:
    """One part's mask in one frame, with what every cost evaluation needs precomputed."""

    mask: np.ndarray  # bool (H, W)
    distance: np.ndarray  # float32 (H, W): pixels to the nearest boundary pixel of the mask
    area: float
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    coverage: np.ndarray | None = None  # float32 (H, W) fraction of each pixel in the mask (coarse)
    _flat: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)
    _scaled: dict[tuple[int, int], SilhouetteTarget] = field(default_factory=dict, repr=False)

    @classmethod
    def from_mask(cls, mask: np.ndarray, device: str | torch.device = "cpu") -> SilhouetteTarget:
        m = np.asarray(mask) > 0
        if m.ndim != 2:
            raise JTMLError(f"a mask must be a 2-D image, got shape {m.shape}")
        if not m.any():
            raise JTMLError("the mask is empty: nothing to register to")
        edge = boundary(m)
        distance = cv2.distanceTransform((~edge).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
        return cls(m, distance.astype(np.float32), float(m.sum()), torch.device(device))

    @classmethod
    def from_frame(
        cls,
        frame: np.ndarray,
        mask: np.ndarray,
        other: np.ndarray | None = None,
        band: float = 6.0,
        device: str | torch.device = "cpu",
    ) -> SilhouetteTarget:
        """The mask refined by the frame's intensities near its boundary (module docstring);
        ``other``: the other implants' masks (their edges are not this one's)."""
        m = np.asarray(mask) > 0
        frame = np.asarray(frame)
        if frame.shape[:2] != m.shape:
            raise JTMLError(
                f"the frame is {frame.shape[1]}x{frame.shape[0]} but the mask is {m.shape[1]}x{m.shape[0]}"
            )
        if not m.any():
            raise JTMLError("the mask is empty: nothing to register to")
        coverage = image_coverage(frame, m, other, band)
        refined = coverage > 0.5
        refined = cv2.morphologyEx(refined.astype(np.uint8), cv2.MORPH_OPEN, np.ones((3, 3), np.uint8)) > 0
        if not refined.any():
            return cls.from_mask(m, device)
        target = cls.from_mask(refined, device)
        target.coverage, target.area = coverage, float(coverage.sum())
        return target

    @property
    def shape(self) -> tuple[int, int]:
        return self.mask.shape  # type: ignore[return-value]

    def to(self, device: str | torch.device) -> SilhouetteTarget:
        """The same target, its costs computed on ``device`` (the coverage of a frame-refined one too)."""
        return SilhouetteTarget(
            self.mask, self.distance, self.area, torch.device(device), coverage=self.coverage
        )

    def at_size(self, width: int, height: int) -> SilhouetteTarget:
        """The target at another (coarser) resolution, the same field of view (module docstring), cached."""
        if (height, width) == self.shape:
            return self
        key = (height, width)
        if key not in self._scaled:
            full = self.mask.astype(np.float32) if self.coverage is None else self.coverage
            coverage = cv2.resize(full, (width, height), interpolation=cv2.INTER_AREA)
            if not (coverage > 0).any():
                raise JTMLError(f"the mask vanishes at {width}x{height}: too small to register at that scale")
            distance = cv2.resize(self.distance, (width, height), interpolation=cv2.INTER_LINEAR)
            self._scaled[key] = SilhouetteTarget(
                coverage > 0.5, distance, float(coverage.sum()), self.device, coverage=coverage
            )
        return self._scaled[key]

    def _tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._flat is None:
            under = self.mask if self.coverage is None else self.coverage
            self._flat = (
                torch.as_tensor(under, device=self.device),
                torch.as_tensor(self.distance, device=self.device),
            )
        return self._flat

    def evaluate(
        self,
        renderer: SilhouetteRenderer,
        poses: torch.Tensor | np.ndarray,
        edge_weight: float = 0.02,
        outlier_px: float | None = None,
    ) -> dict[str, torch.Tensor]:
        """``cost``, ``iou``, ``edge`` and ``area`` (rendered pixels) ``(N,)`` tensors of pose rows
        ``(N, 6)`` rendered by ``renderer``, in one batched call; with ``outlier_px`` also
        ``outliers``: the fraction of the rendered boundary farther than that from the mask's (a
        part of the model where the mask is not — what a wrong basin leaves and a segmentation's
        ragged or shifted edge does not)."""
        with one_cpu_thread(renderer.device):
            return self._evaluate(renderer, poses, edge_weight, outlier_px)

    def _evaluate(
        self,
        renderer: SilhouetteRenderer,
        poses: torch.Tensor | np.ndarray,
        edge_weight: float,
        outlier_px: float | None,
    ) -> dict[str, torch.Tensor]:
        h, w = self.shape
        if (renderer.camera.height, renderer.camera.width) != (h, w):
            raise JTMLError(
                f"the renderer's camera is {renderer.camera.width}x{renderer.camera.height} but the mask "
                f"is {w}x{h}"
            )
        win = renderer.render_windows(poses)
        masks = win.masks
        n, wh, ww = masks.shape
        dev = masks.device
        if self.device != dev:  # once: the target follows the renderer
            self.device, self._flat = dev, None
        mask_t, dist_t = self._tensors()
        if n == 1:  # the target under the window: a slice
            x0, y0 = int(win.x0[0]), int(win.y0[0])
            under = mask_t[y0 : y0 + wh, x0 : x0 + ww][None]
            dist = dist_t[y0 : y0 + wh, x0 : x0 + ww][None]
        else:  # under each pose's window (indices clamped: beyond its window nothing is rendered)
            rows = (win.y0[:, None] + torch.arange(wh, device=dev)).clamp(max=h - 1)
            cols = (win.x0[:, None] + torch.arange(ww, device=dev)).clamp(max=w - 1)
            index = (rows[:, :, None] * w + cols[:, None, :]).reshape(-1)
            under = mask_t.view(-1).index_select(0, index).view(n, wh, ww)
            dist = dist_t.view(-1).index_select(0, index).view(n, wh, ww)
        area = torch.count_nonzero(masks, dim=(1, 2))
        if under.dtype == torch.bool:
            inter = torch.count_nonzero(masks & under, dim=(1, 2)).double()
        else:  # a coarse target: the covered fraction of each rendered pixel
            inter = (under * masks).sum(dim=(1, 2), dtype=torch.float64)
        iou = inter / (self.area + area - inter)
        edges = _boundary(masks)
        count = torch.count_nonzero(edges, dim=(1, 2))
        edge = (dist * edges).sum(dim=(1, 2), dtype=torch.float64) / count.clamp(min=1)
        ok = win.valid & (area > 0)
        cost = torch.where(ok, (1.0 - iou) + edge_weight * edge, INVALID)
        out = {
            "cost": cost,
            "iou": iou.masked_fill(~ok, 0.0),
            "edge": edge.masked_fill(~ok, float("inf")),
            "area": area,
        }
        if outlier_px is not None:
            far = torch.count_nonzero(edges & (dist > outlier_px), dim=(1, 2))
            out["outliers"] = (far / count.clamp(min=1)).double().masked_fill(~ok, 1.0)
        return out

    def costs(
        self, renderer: SilhouetteRenderer, poses: np.ndarray, edge_weight: float = 0.02
    ) -> dict[str, np.ndarray]:
        """``cost``, ``iou`` and ``edge`` (N,) numpy arrays of pose rows ``(N, 6)``: :meth:`evaluate`."""
        poses = np.asarray(poses, dtype=np.float64).reshape(-1, 6)
        out = self.evaluate(renderer, torch.as_tensor(poses), edge_weight)
        return {k: out[k].cpu().numpy() for k in ("cost", "iou", "edge")}
