"""Segmentation training losses built from a declarative spec (``"dice+bce"``, weighted terms, lists).

Every loss takes logits and a ``(B, P, H, W)`` target whose parts are independent labels (multilabel),
so overlapping implants (a femoral component over the tibial tray) are both right.
"""

from __future__ import annotations

import re
from typing import Any

import segmentation_models_pytorch as smp
import torch
from torch import Tensor, nn

from jtml.errors import JTMLError

__all__ = ["LOSSES", "CombinedLoss", "build_loss"]

# name -> factory(**kwargs). All take logits and a (B,P,H,W) target with parts as independent labels.
LOSSES: dict[str, Any] = {
    "dice": lambda **kw: smp.losses.DiceLoss(mode="multilabel", from_logits=True, **kw),
    "bce": lambda **kw: smp.losses.SoftBCEWithLogitsLoss(**_bce_kwargs(kw)),
    "focal": lambda **kw: smp.losses.FocalLoss(mode="multilabel", **kw),
    "jaccard": lambda **kw: smp.losses.JaccardLoss(mode="multilabel", from_logits=True, **kw),
    "lovasz": lambda **kw: smp.losses.LovaszLoss(mode="multilabel", from_logits=True, **kw),
    "tversky": lambda **kw: smp.losses.TverskyLoss(mode="multilabel", from_logits=True, **kw),
}
_TERM = re.compile(r"^\s*(?:([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*\*\s*)?([a-z_]+)\s*$")


def _bce_kwargs(kw: dict[str, Any]) -> dict[str, Any]:
    # YAML gives pos_weight as a number or a per-part list; broadcast a list over (B,P,H,W).
    if kw.get("pos_weight") is not None and not isinstance(kw["pos_weight"], Tensor):
        pw = torch.as_tensor(kw["pos_weight"], dtype=torch.float32)
        kw = {**kw, "pos_weight": pw.view(-1, 1, 1) if pw.ndim == 1 else pw}
    return kw


class CombinedLoss(nn.Module):
    """Weighted sum of losses (all on logits)."""

    def __init__(self, terms: list[tuple[str, float, nn.Module]]):
        super().__init__()
        self.names = [n for n, _, _ in terms]
        self.weights = [w for _, w, _ in terms]
        self.losses = nn.ModuleList([m for _, _, m in terms])

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return sum(w * fn(logits, target) for w, fn in zip(self.weights, self.losses, strict=True))


def build_loss(spec: str | list[dict[str, Any]]) -> CombinedLoss:
    """Build the training loss from a declarative spec.

    String form: ``"bce"``, ``"dice+bce"``, ``"0.7*dice+0.3*focal"`` (terms joined by ``+``, optional
    ``weight*`` prefix). List form, for loss arguments:
    ``[{name: dice, weight: 1.0}, {name: bce, weight: 0.5, pos_weight: [2.0, 1.0]}]`` (every key other
    than ``name``/``weight`` goes to the smp loss). Names: dice, bce, focal, jaccard, lovasz, tversky.
    """
    if isinstance(spec, str):
        items = []
        for term in spec.split("+"):
            m = _TERM.match(term.lower())
            if not m:
                raise JTMLError(f"cannot parse loss term {term!r} in {spec!r} (expected e.g. 'dice+bce')")
            items.append({"name": m.group(2), "weight": float(m.group(1) or 1.0)})
    else:
        items = [dict(item) for item in spec]
    terms = []
    for item in items:
        name = str(item.pop("name", "")).lower()
        weight = float(item.pop("weight", 1.0))
        if name not in LOSSES:
            raise JTMLError(f"unknown loss {name!r}; choose from {sorted(LOSSES)}")
        try:
            terms.append((name, weight, LOSSES[name](**item)))
        except TypeError as e:
            raise JTMLError(f"bad arguments for loss {name!r}: {e}") from None
    if not terms:
        raise JTMLError("loss spec is empty")
    return CombinedLoss(terms)
