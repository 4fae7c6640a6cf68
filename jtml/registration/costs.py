"""How well a pose explains a silhouette: overlap (IoU) and a distance-map edge cost.

The target is one part's mask in one frame. A candidate pose is rendered with the exact
pixel-centre rule (:meth:`SilhouetteRenderer.render_window`, only the window around the model)
and compared with the mask:

- ``iou``: |rendered ∩ mask| / |rendered ∪ mask| (1 at a perfect match);
- ``edge``: the mean distance (pixels) from the rendered silhouette's boundary pixels to the mask's
  boundary — a chamfer distance, in the spirit of JTML's dilated-edge cost: it keeps a gradient
  where the overlap is already high (depth changes the size by a fraction of a pixel per mm);
- ``cost = (1 − iou) + edge_weight · edge``, lower is better. A pose that renders nothing (outside
  the view, behind the source) costs ``INVALID``.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from jtml.errors import JTMLError
from jtml.geometry import SilhouetteRenderer

__all__ = ["INVALID", "SilhouetteTarget", "boundary"]

INVALID = 10.0  # the cost of a pose with no silhouette in the frame


def boundary(mask: np.ndarray) -> np.ndarray:
    """The silhouette's boundary pixels (inside pixels with an outside 4-neighbour), bool."""
    m = mask.astype(np.uint8)
    return (m > 0) & (
        cv2.erode(m, np.ones((3, 3), np.uint8), borderType=cv2.BORDER_CONSTANT, borderValue=0) == 0
    )


@dataclass
class SilhouetteTarget:
    """One part's mask in one frame, with what every cost evaluation needs precomputed."""

    mask: np.ndarray  # bool (H, W)
    distance: np.ndarray  # float32 (H, W): pixels to the nearest boundary pixel of the mask
    area: int

    @classmethod
    def from_mask(cls, mask: np.ndarray) -> SilhouetteTarget:
        m = np.asarray(mask) > 0
        if not m.any():
            raise JTMLError("the mask is empty: nothing to register to")
        edge = boundary(m)
        distance = cv2.distanceTransform((~edge).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
        return cls(m, distance.astype(np.float32), int(m.sum()))

    def costs(
        self, renderer: SilhouetteRenderer, poses: np.ndarray, edge_weight: float = 0.02
    ) -> dict[str, np.ndarray]:
        """``cost``, ``iou`` and ``edge`` (N,) of pose rows ``(N, 6)`` rendered by ``renderer``."""
        poses = np.asarray(poses, dtype=np.float64).reshape(-1, 6)
        n = len(poses)
        iou, edge = np.zeros(n), np.full(n, np.inf)
        h, w = self.mask.shape
        if (renderer.camera.height, renderer.camera.width) != (h, w):
            raise JTMLError(
                f"the renderer's camera is {renderer.camera.width}x{renderer.camera.height} but the mask "
                f"is {w}x{h}"
            )
        for i, pose in enumerate(poses):
            try:
                win, x0, y0 = renderer.render_window(pose)
            except JTMLError:  # behind the source
                continue
            area = int(win.sum())
            if area == 0:
                continue
            sub = self.mask[y0 : y0 + win.shape[0], x0 : x0 + win.shape[1]]
            inter = int((sub & win).sum())
            iou[i] = inter / (self.area + area - inter)
            edge[i] = float(
                self.distance[y0 : y0 + win.shape[0], x0 : x0 + win.shape[1]][boundary(win)].mean()
            )
        cost = np.where(np.isfinite(edge), (1.0 - iou) + edge_weight * edge, INVALID)
        return {"cost": cost, "iou": iou, "edge": edge}
