"""The pose network as a plain ``nn.Module``: ROIs (and part, silhouette bbox) in, raw outputs out.

A timm backbone (optionally with two CoordConv channels), its feature map flattened or pooled,
optionally joined by exact silhouette features (:func:`shape_moments`, the ROI bbox), then a shared
hidden layer and one 9-output head per part: ``offset`` (2), ``log_depth`` (1) and a 6-D rotation
(see :mod:`jtml.models.parameterisation`). What the outputs mean lives there; this is only the net.
"""

from __future__ import annotations

from typing import Literal

import timm
import torch
from torch import Tensor, nn

from jtml.errors import JTMLError
from jtml.geometry import matrix_to_rot6d, rot6d_to_matrix

__all__ = ["N_BBOX", "N_MOMENTS", "OUTPUTS", "PoseNet", "shape_moments"]

OUTPUTS = 9  # offset (2), log_depth (1), rot6d (6)
N_MOMENTS = 6
N_BBOX = 4


def shape_moments(mask: Tensor) -> Tensor:
    """``(B, 6)`` image moments of soft ROI masks ``(B, 1, R, R)``, ROI coordinates in [−1, 1]:
    sqrt(area fraction), centroid (x, y), sqrt of the second central moments (xx, yy) and the
    normalised xy moment. Exact sub-pixel size and position cues that a CNN only approximates."""
    b, _, h, w = mask.shape
    ys = torch.linspace(-1.0, 1.0, h, device=mask.device, dtype=mask.dtype)[:, None]
    xs = torch.linspace(-1.0, 1.0, w, device=mask.device, dtype=mask.dtype)[None, :]
    m = mask[:, 0]
    total = m.sum(dim=(1, 2)).clamp(min=1e-6)
    cx = (m * xs).sum(dim=(1, 2)) / total
    cy = (m * ys).sum(dim=(1, 2)) / total
    dx, dy = xs - cx[:, None, None], ys - cy[:, None, None]
    sxx = (m * dx * dx).sum(dim=(1, 2)) / total
    syy = (m * dy * dy).sum(dim=(1, 2)) / total
    sxy = (m * dx * dy).sum(dim=(1, 2)) / total
    corr = sxy / (sxx * syy).clamp(min=1e-12).sqrt()
    area = (total / (h * w)).sqrt()
    return torch.stack([area, cx, cy, sxx.clamp(min=0).sqrt(), syy.clamp(min=0).sqrt(), corr], dim=1)


class PoseNet(nn.Module):
    """Backbone, neck and per-part heads (the arguments are :class:`~jtml.models.pose.PoseModule`'s).

    ``input`` sets the ROI channels: ``mask`` or ``frame`` one, ``both`` two (frame, then mask); with
    a mask channel, ``shape_features`` adds its moments. ``roi_size`` sizes the head's input.
    """

    def __init__(
        self,
        n_parts: int,
        input: Literal["mask", "frame", "both"] = "mask",
        backbone: str = "resnet18",
        backbone_kwargs: dict | None = None,
        roi_size: int = 128,
        coord_channels: bool = True,
        shape_features: bool = True,
        pool: Literal["flatten", "avg"] = "flatten",
        head_hidden: int = 256,
        dropout: float = 0.0,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.n_parts, self.input = int(n_parts), input
        self.coord_channels, self.shape_features, self.pool = bool(coord_channels), bool(shape_features), pool
        self.channels_last = bool(channels_last)
        in_chans = (2 if input == "both" else 1) + (2 if coord_channels else 0)
        try:
            self.backbone = timm.create_model(
                backbone,
                pretrained=False,
                in_chans=in_chans,
                num_classes=0,
                global_pool="",
                **(backbone_kwargs or {}),
            )
        except (RuntimeError, ValueError, TypeError, KeyError) as e:
            raise JTMLError(f"cannot build timm backbone {backbone!r}: {e}") from None
        with torch.no_grad():
            was_training = self.backbone.training
            feat = self.backbone.eval()(torch.zeros(1, in_chans, int(roi_size), int(roi_size)))
            self.backbone.train(was_training)
        if feat.ndim != 4:
            raise JTMLError(
                f"backbone {backbone!r} must return a feature map (B, C, H, W), got {tuple(feat.shape)}"
            )
        n_feat = feat[0].numel() if pool == "flatten" else feat.shape[1]
        if shape_features:
            n_feat += N_BBOX + (N_MOMENTS if input != "frame" else 0)
        if self.channels_last:
            self.backbone = self.backbone.to(memory_format=torch.channels_last)
        self.neck = nn.Sequential(nn.Linear(n_feat, head_hidden), nn.ReLU(inplace=True), nn.Dropout(dropout))
        self.head = nn.Linear(head_hidden, OUTPUTS * self.n_parts)
        nn.init.zeros_(self.head.bias)
        nn.init.normal_(self.head.weight, std=1e-3)
        # Zero output = identity allocentric rotation, not the degenerate 6-D zero vector.
        self.register_buffer("rot6d_bias", matrix_to_rot6d(torch.eye(3)), persistent=False)

    def forward(self, x: Tensor, part: Tensor, roi_bbox: Tensor | None = None) -> Tensor:
        """``(B, C, R, R)`` ROIs, part indices ``(B,)`` and (with ``shape_features``) the silhouette
        bboxes in ROI units ``(B, 4)`` → raw outputs ``(B, 9)``."""
        if self.shape_features and roi_bbox is None:
            raise JTMLError("this PoseModule uses shape_features: pass the batch's roi_bbox")
        mask = x[:, -1:] if self.shape_features and self.input != "frame" else None  # mask: last channel
        b = x.shape[0]  # a traced size, so exported models take any batch
        if self.coord_channels:
            _, _, h, w = x.shape
            ys = torch.linspace(-1.0, 1.0, h, device=x.device, dtype=x.dtype)
            xs = torch.linspace(-1.0, 1.0, w, device=x.device, dtype=x.dtype)
            grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij"))[None].expand(b, 2, h, w)
            x = torch.cat([x, grid], dim=1)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        feat = self.backbone(x)
        feat = feat.flatten(1) if self.pool == "flatten" else feat.mean(dim=(2, 3))
        # The head runs in float32 even under bf16 autocast: its outputs need ~1e-3 precision.
        with torch.autocast(x.device.type, enabled=False):
            feat = feat.float()
            if self.shape_features:
                extra = [roi_bbox.float()] + ([shape_moments(mask.float())] if mask is not None else [])
                feat = torch.cat([feat, *extra], dim=1)
            out = self.head(self.neck(feat)).view(b, self.n_parts, OUTPUTS)
        return out[torch.arange(b, device=x.device), part.long()]

    def split_outputs(self, out: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Raw ``(B, 9)`` → ``offset`` (B, 2), ``log_depth`` (B,), allocentric rotation (B, 3, 3)."""
        return out[:, :2], out[:, 2], rot6d_to_matrix(out[:, 3:9] + self.rot6d_bias.to(out))
