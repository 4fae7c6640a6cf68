"""Silhouette masks as fields: the signed distance to a mask's boundary, one implementation for
the mask degradation (data), the registration costs and the outline fit."""

from __future__ import annotations

import cv2
import numpy as np

__all__ = ["signed_distance"]


def signed_distance(mask: np.ndarray) -> np.ndarray:
    """Pixels from the boundary (float32), positive inside: ``d − ½`` with ``d`` the distance to the
    nearest pixel centre on the other side, so 0 halfway between an inside and an outside pixel
    centre (±½ at the boundary pixels; ``> 0`` is the mask)."""
    m = np.asarray(mask) > 0
    u8 = m.astype(np.uint8)
    inside = cv2.distanceTransform(u8, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    outside = cv2.distanceTransform(1 - u8, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    return np.where(m, inside - 0.5, 0.5 - outside).astype(np.float32)
