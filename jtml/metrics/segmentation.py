"""Per-part segmentation metrics for multilabel implant masks (one channel per part, parts may overlap).

Both metrics take ``preds`` (B,P,H,W) as probabilities in [0, 1] (or logits with ``from_logits=True``)
and ``target`` (B,P,H,W) with values in {0, 1}. Predictions are binarised with ``preds > threshold``
*before* anything else: torchmetrics' own stat-score metrics argmax single-channel float input, which
turns every pixel into foreground, so we never hand them soft multilabel input.

States are per-part sums and counts registered with ``add_state(..., dist_reduce_fx="sum")``, so
``compute()`` is exact under DDP without any hand-written syncing. Every score is a mean over images
(each image counts once, whatever the implant's size), and empty masks have defined values, so no
output is ever NaN or inf.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = ["BoundaryDistance", "DiceIoU"]


def _check_parts(parts: list[str]) -> list[str]:
    parts = [str(p) for p in parts]
    if not parts or len(set(parts)) != len(parts) or any(not p or p == "mean" for p in parts):
        # "mean" would collide with the averaged outputs (dice_mean, hd_mean_px, ...).
        raise ValueError(f"parts must be unique, non-empty names other than 'mean', got {parts}")
    return parts


def _binarise(preds: Tensor, target: Tensor, n_parts: int, threshold: float, from_logits: bool):
    if preds.ndim != 4 or preds.shape != target.shape or preds.shape[1] != n_parts:
        raise ValueError(
            f"expected preds and target of shape (B,{n_parts},H,W), got {tuple(preds.shape)} and "
            f"{tuple(target.shape)}"
        )
    if preds.dtype == torch.bool:
        pred = preds
    else:
        pred = (preds.sigmoid() if from_logits else preds) > threshold
    return pred, target > 0.5


class DiceIoU(Metric):
    """Per-image Dice and IoU for each part, averaged over images.

    ``update(preds, target)``: ``preds`` probabilities (``from_logits=False``, the default) or logits
    (``from_logits=True``), binarised with ``> threshold``; a bool ``preds`` is used as is. ``target``
    is binarised with ``> 0.5``.

    Empty masks: prediction and target both empty → 1.0 (a correct "part absent"); exactly one
    empty → 0.0. With no update at all every value is 0.0.

    ``compute()`` returns ``dice_<part>``, ``iou_<part>`` for each part, ``dice_mean`` and ``iou_mean``
    (means over parts).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, parts: list[str], threshold: float = 0.5, from_logits: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.parts = _check_parts(parts)
        self.threshold = float(threshold)
        self.from_logits = bool(from_logits)
        n = len(self.parts)
        # float64 sums: exact enough over any realistic number of images.
        self.add_state("dice_sum", torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("iou_sum", torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        pred, tgt = _binarise(preds, target, len(self.parts), self.threshold, self.from_logits)
        inter = (pred & tgt).sum(dim=(2, 3)).double()
        p_sum = pred.sum(dim=(2, 3)).double()
        t_sum = tgt.sum(dim=(2, 3)).double()
        denom = p_sum + t_sum
        union = denom - inter
        # denom == 0 ⇔ union == 0 ⇔ both empty → perfect; one empty gives inter = 0 → 0.
        dice = torch.where(denom > 0, 2 * inter / denom.clamp(min=1), torch.ones_like(denom))
        iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
        self.dice_sum += dice.sum(dim=0)
        self.iou_sum += iou.sum(dim=0)
        self.count += pred.shape[0]

    def compute(self) -> dict[str, Tensor]:
        n = self.count.clamp(min=1).double()
        dice = (self.dice_sum / n).float()
        iou = (self.iou_sum / n).float()
        out: dict[str, Tensor] = {}
        for i, part in enumerate(self.parts):
            out[f"dice_{part}"] = dice[i]
            out[f"iou_{part}"] = iou[i]
        out["dice_mean"] = dice.mean()
        out["iou_mean"] = iou.mean()
        return out


_CROSS = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))


def _boundary(mask: np.ndarray) -> np.ndarray:
    """Foreground pixels with a 4-neighbour in the background; outside the image counts as background,
    so a mask touching the image edge still has a boundary there."""
    eroded = cv2.erode(mask, _CROSS, borderType=cv2.BORDER_CONSTANT, borderValue=0)
    return (mask > 0) & (eroded == 0)


def surface_distances(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Euclidean distances (px) from each boundary pixel of ``a`` to the boundary of ``b``, and back.

    ``a`` and ``b`` are non-empty (H,W) masks. The work is cropped to the union's bounding box (+1 px),
    which cannot change any distance but keeps 1024² frames cheap.
    """
    ys, xs = np.nonzero(a | b)
    y0, y1 = max(ys.min() - 1, 0), ys.max() + 2
    x0, x1 = max(xs.min() - 1, 0), xs.max() + 2
    a = np.ascontiguousarray(a[y0:y1, x0:x1], dtype=np.uint8)
    b = np.ascontiguousarray(b[y0:y1, x0:x1], dtype=np.uint8)
    ba, bb = _boundary(a), _boundary(b)
    # distanceTransform gives each pixel's distance to the nearest zero pixel; DIST_MASK_PRECISE is exact EDT.
    dist_to_b = cv2.distanceTransform((~bb).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    dist_to_a = cv2.distanceTransform((~ba).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    return dist_to_b[ba].astype(np.float64), dist_to_a[bb].astype(np.float64)


class BoundaryDistance(Metric):
    """Symmetric Hausdorff distance and its percentile variant (HD95) per part, in px and mm.

    For each image and part: ``hd = max(max d(A→B), max d(B→A))`` and
    ``hd95 = max(P95 d(A→B), P95 d(B→A))`` over boundary pixels (the MONAI convention, so
    ``percentile=100`` gives ``hd``); mm = px × that sample's ``pixel_size``. Computed on the CPU with
    OpenCV distance transforms (torchmetrics' HausdorffDistance is slow and returns inf on empty masks),
    so use it at test time rather than every validation epoch.

    ``update(preds, target, pixel_size)``: ``preds``/``target`` as for :class:`DiceIoU`; ``pixel_size``
    (B,) or a float, mm per pixel at this resolution.

    Empty masks: both empty → distance 0 (counted); exactly one empty → no distance exists, so the
    sample is skipped for that part and counted in ``n_empty_mismatch_<part>``. A part with no counted
    sample reports 0.0 (check ``n_empty_mismatch_<part>``).

    ``compute()`` returns ``hd_<part>_px``, ``hd95_<part>_px``, ``hd_<part>_mm``, ``hd95_<part>_mm``,
    ``n_empty_mismatch_<part>``, and ``hd_mean_px`` etc. averaged over the parts that have samples.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(
        self,
        parts: list[str],
        threshold: float = 0.5,
        percentile: float = 95.0,
        from_logits: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.parts = _check_parts(parts)
        self.threshold = float(threshold)
        if not 0 < percentile <= 100:
            raise ValueError(f"percentile must be in (0, 100], got {percentile}")
        self.percentile = float(percentile)
        self.from_logits = bool(from_logits)
        self._q = f"hd{self.percentile:g}"
        n = len(self.parts)
        for name in ("hd_px_sum", "hdq_px_sum", "hd_mm_sum", "hdq_mm_sum"):
            self.add_state(name, torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros(n, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("n_empty_mismatch", torch.zeros(n, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor, pixel_size: Tensor | float) -> None:
        pred, tgt = _binarise(preds, target, len(self.parts), self.threshold, self.from_logits)
        b, n = pred.shape[:2]
        ps = torch.as_tensor(pixel_size, dtype=torch.float64).flatten().cpu()
        if ps.numel() == 1:
            ps = ps.expand(b)
        if ps.numel() != b:
            raise ValueError(f"pixel_size must be a float or have shape ({b},), got {tuple(ps.shape)}")
        pred_np = pred.cpu().numpy()
        tgt_np = tgt.cpu().numpy()
        hd = torch.zeros(4, n, dtype=torch.float64)  # hd_px, hdq_px, hd_mm, hdq_mm
        count = torch.zeros(n, dtype=torch.long)
        mismatch = torch.zeros(n, dtype=torch.long)
        for i in range(b):
            for j in range(n):
                p, t = pred_np[i, j], tgt_np[i, j]
                p_any, t_any = bool(p.any()), bool(t.any())
                if p_any != t_any:
                    mismatch[j] += 1
                    continue
                count[j] += 1
                if not p_any:
                    continue  # both empty: distance 0
                d_pt, d_tp = surface_distances(p, t)
                h = max(d_pt.max(), d_tp.max())
                hq = max(np.percentile(d_pt, self.percentile), np.percentile(d_tp, self.percentile))
                s = float(ps[i])
                hd[:, j] += torch.tensor([h, hq, h * s, hq * s], dtype=torch.float64)
        dev = self.count.device
        self.hd_px_sum += hd[0].to(dev)
        self.hdq_px_sum += hd[1].to(dev)
        self.hd_mm_sum += hd[2].to(dev)
        self.hdq_mm_sum += hd[3].to(dev)
        self.count += count.to(dev)
        self.n_empty_mismatch += mismatch.to(dev)

    def compute(self) -> dict[str, Tensor]:
        n = self.count.clamp(min=1).double()
        values = {
            "hd_{}_px": self.hd_px_sum / n,
            f"{self._q}_{{}}_px": self.hdq_px_sum / n,
            "hd_{}_mm": self.hd_mm_sum / n,
            f"{self._q}_{{}}_mm": self.hdq_mm_sum / n,
        }
        has = self.count > 0
        out: dict[str, Tensor] = {}
        for i, part in enumerate(self.parts):
            for fmt, v in values.items():
                out[fmt.format(part)] = v[i].float()
            out[f"n_empty_mismatch_{part}"] = self.n_empty_mismatch[i].float()
        for fmt, v in values.items():
            out[fmt.format("mean")] = (v[has].mean() if has.any() else v.new_zeros(())).float()
        return out
