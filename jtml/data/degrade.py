"""Segmentation-like masks from perfect ones: the errors a segmentation network makes at an edge.

A pose network trained only on exact renders has never seen the masks it gets in use (a
segmentation network's), and a registration benchmark on exact masks says nothing about real
ones. :class:`MaskDegradation` turns an exact silhouette into a plausible network output:

- ``boundary_px``: the whole boundary moves in or out by up to this many pixels (erosion or
  dilation; a sub-pixel amount too — the mask is thresholded from its signed distance);
- ``ragged_px``: the boundary wanders by up to this many pixels with a smooth random field of
  correlation length ``ragged_scale_px`` (ragged edges);
- ``holes``: up to this many holes of radius up to ``hole_px`` inside the silhouette;
- ``overlap``: with this probability, where the other implant overlaps this one the overlap is
  removed from this mask (assigned to the other implant) or, half the time, the other implant's
  pixels next to the overlap are merged into it.

Every operation only changes the input, never the pose, so it is a pose-consistent augmentation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import cv2
import numpy as np

from jtml.errors import JTMLError
from jtml.geometry.masks import signed_distance

__all__ = ["MaskDegradation", "degrade_mask"]


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], scale: float) -> np.ndarray:
    """A zero-mean, unit-std random field with correlation length ``scale`` pixels."""
    h, w = shape
    gh, gw = max(2, int(np.ceil(h / scale)) + 1), max(2, int(np.ceil(w / scale)) + 1)
    field = cv2.resize(
        rng.standard_normal((gh, gw)).astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC
    )
    std = float(field.std())
    return field / std if std > 0 else field


@dataclass(frozen=True)
class MaskDegradation:
    """Random segmentation-like errors (module docstring); ``p``: the fraction of masks touched."""

    p: float = 0.8
    boundary_px: float = 2.0
    ragged_px: float = 1.5
    ragged_scale_px: float = 12.0
    holes: int = 2
    hole_px: float = 4.0
    overlap: float = 0.5

    def __post_init__(self) -> None:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        if not all(np.isfinite(float(v)) and float(v) >= 0 for v in values.values()):
            raise JTMLError(f"mask_degradation: every setting must be a finite number >= 0, got {values}")
        if self.p > 1 or self.overlap > 1 or self.ragged_scale_px < 1:
            raise JTMLError(
                "mask_degradation: p and overlap are probabilities (<= 1) and ragged_scale_px >= 1, "
                f"got {values}"
            )

    @classmethod
    def from_config(cls, spec: bool | dict[str, Any] | None) -> MaskDegradation | None:
        """``true``/``{}``: the defaults; a dict overrides some; ``false``/``null``: none."""
        if spec is None or spec is False:
            return None
        if spec is True:
            return cls()
        if not isinstance(spec, dict):
            raise JTMLError(f"mask_degradation must be true, false or a mapping, got {spec!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(spec) - known)
        if unknown:
            raise JTMLError(f"mask_degradation: unknown key(s) {unknown}; known: {sorted(known)}")
        try:
            return cls(**{k: type(getattr(cls, k))(v) for k, v in spec.items()})
        except (TypeError, ValueError) as e:
            raise JTMLError(f"mask_degradation: {e}") from None

    @property
    def reach(self) -> int:
        """How far (pixels) the degraded boundary can move outwards: the padding a window needs."""
        return int(np.ceil(self.boundary_px + self.ragged_px * 3.0)) + 2

    def __call__(
        self,
        mask: np.ndarray,
        rng: np.random.Generator,
        other: np.ndarray | Callable[[], np.ndarray | None] | None = None,
    ) -> np.ndarray:
        """A degraded copy of the bool ``mask``. ``other``: the other implant's mask (same shape),
        or a function that makes it, called only when an overlap is degraded (renders are costly).
        Never returns an empty mask for a non-empty one (the input comes back instead)."""
        mask = np.asarray(mask) > 0
        if not mask.any() or rng.uniform() >= self.p:
            return mask
        out = mask.copy()
        if other is not None and self.overlap > 0 and rng.uniform() < self.overlap:
            other = other() if callable(other) else other
        else:
            other = None
        if other is not None:
            other = np.asarray(other) > 0
            both = out & other
            if both.any():
                if rng.uniform() < 0.5:
                    out &= ~other
                else:
                    r = int(rng.integers(2, 11))
                    near = cv2.dilate(
                        both.astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1,) * 2)
                    )
                    out |= other & (near > 0)
        if not out.any():
            return mask
        ys, xs = np.nonzero(out)
        pad = self.reach
        y0, y1 = max(0, ys.min() - pad), min(out.shape[0], ys.max() + pad + 1)
        x0, x1 = max(0, xs.min() - pad), min(out.shape[1], xs.max() + pad + 1)
        win = out[y0:y1, x0:x1]
        sd = signed_distance(win)
        level = rng.uniform(-self.boundary_px, self.boundary_px) if self.boundary_px > 0 else 0.0
        if self.ragged_px > 0:
            amp = rng.uniform(0.0, self.ragged_px)
            level = level + amp * _smooth_noise(rng, win.shape, self.ragged_scale_px)
        win = sd + level > 0
        n_holes = int(rng.integers(0, self.holes + 1)) if self.holes > 0 else 0
        if n_holes and self.hole_px >= 1:
            inner = np.argwhere(sd > self.hole_px + 1)
            for _ in range(min(n_holes, len(inner))):
                cy, cx = inner[rng.integers(len(inner))]
                radius = int(round(rng.uniform(1.0, self.hole_px)))
                hole = np.zeros(win.shape, np.uint8)
                cv2.circle(hole, (int(cx), int(cy)), radius, 1, thickness=-1)
                win &= hole == 0
        if not win.any():
            return mask
        result = np.zeros_like(out)
        result[y0:y1, x0:x1] = win
        return result


def degrade_mask(
    mask: np.ndarray,
    rng: np.random.Generator,
    other: np.ndarray | None = None,
    degradation: MaskDegradation | None = None,
) -> np.ndarray:
    """One segmentation-like version of ``mask`` (always degraded: ``p = 1``), for benchmarks."""
    d = degradation or MaskDegradation(p=1.0)
    return d(mask, rng, other)
