"""6-DoF implant pose from a silhouette ROI (and optionally the frame): a timm backbone with pose heads.

Parameterisation (calibration-aware, resolution-independent). Each sample is a square ROI of side
``s`` frame pixels centred at ``c = (cu, cv)`` around one part's silhouette (see
:mod:`jtml.data.pose`), with the frame's camera (``f = pd / pp`` pixels, principal point
``(u0, v0)``). The network predicts, per part:

- ``offset = (o − c) / s``: where the model origin projects (``o``), relative to the ROI centre,
  in ROI units;
- ``log_depth = log(|z| · s / (f · D))``: the depth relative to the depth at which an object of
  ``D = depth_ref_mm`` would span the ROI — the apparent size carries the depth, and the ratio
  ``s / f`` makes it independent of the frame's resolution and of the calibration (any constant
  ``D`` works; per-part offsets are learned by the head's bias);
- the rotation as Zhou et al.'s continuous 6-D representation, **allocentric**: relative to the
  ray through the ROI centre (``R = R_ray · R_allo``, ``R_ray`` the smallest rotation taking the
  optical axis onto that ray), since an implant seen off-axis is seen from another direction, and
  what the network sees is ``R_allo``, not the camera-frame ``R``.

The translation is recovered with the camera: ``t = backproject(c + s·offset, z)``. Resizing the
frame scales ``c``, ``s`` and ``f`` alike, so the same network serves any frame size and pixel size.

Loss: ``inplane_weight · L1(offset) + depth_weight · L1(log_depth) + rotation_weight · geodesic``
(radians). ``trap_aware_loss``: the rotation term is the smaller geodesic to the true rotation and
to its symmetric twin (:func:`jtml.geometry.symmetric_twin`), for implants (nearly) mirror-symmetric
about the line of sight, where a silhouette cannot tell the two apart and a plain loss would
average them into a pose that is neither. Metrics (:class:`~jtml.metrics.pose.PoseError`) report
both the plain and the trap-aware errors either way.

Parts: one module handles one part or several. Every sample is one part; the backbone is shared
and each part has its own output head (the batch's ``part`` index picks it), so adding a part
costs 9 outputs, not a network.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
import pytorch_lightning as pl
import timm
import torch
import torch.nn.functional as F
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from jtml.errors import JTMLError
from jtml.geometry import (
    Camera,
    euler312_to_matrix,
    geodesic_angle,
    matrix_to_euler312,
    matrix_to_rot6d,
    rot6d_to_matrix,
    symmetric_twin,
)
from jtml.io import Calibration
from jtml.metrics.pose import PoseError
from jtml.models import loadable_hparams
from jtml.models.schedules import check_restored_lengths, scheduler_config

__all__ = ["PoseModule", "decode_pose", "encode_pose", "ray_rotation"]

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


# ------------------------------------------------------------------------------------------------
# Parameterisation (batched, float64; cameras as (B, 6) pd, xo, yo, pp, width, height)
# ------------------------------------------------------------------------------------------------


def _intrinsics(camera: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    pd, xo, yo, pp, w, h = camera.unbind(-1)
    return pd / pp, w / 2 + xo / pp, h / 2 - yo / pp


def ray_rotation(uv: Tensor, camera: Tensor) -> Tensor:
    """``(B, 3, 3)``: the smallest rotation taking the optical axis ``(0, 0, −1)`` onto the ray
    through pixel ``uv`` (Rodrigues; the ray never points backwards, so it is well defined)."""
    f, u0, v0 = _intrinsics(camera)
    d = torch.stack([(uv[..., 0] - u0) / f, -(uv[..., 1] - v0) / f, -torch.ones_like(f)], -1)
    d = d / d.norm(dim=-1, keepdim=True)
    a = torch.zeros_like(d)
    a[..., 2] = -1.0
    k = torch.cross(a, d, dim=-1)
    c = (a * d).sum(-1)
    K = torch.zeros(*k.shape[:-1], 3, 3, dtype=k.dtype, device=k.device)
    K[..., 0, 1], K[..., 0, 2], K[..., 1, 2] = -k[..., 2], k[..., 1], -k[..., 0]
    K[..., 1, 0], K[..., 2, 0], K[..., 2, 1] = k[..., 2], -k[..., 1], k[..., 0]
    eye = torch.eye(3, dtype=k.dtype, device=k.device).expand_as(K)
    return eye + K + (K @ K) / (1.0 + c)[..., None, None]


def encode_pose(
    pose: Tensor, roi: Tensor, camera: Tensor, depth_ref_mm: float, allocentric: bool = True
) -> dict[str, Tensor]:
    """JointTrack pose rows ``(B, 6)`` → network targets ``offset`` (B, 2), ``log_depth`` (B,),
    ``rotation`` (B, 3, 3) and ``twin_rotation`` (of the symmetric twin) in the ROI's frame."""
    pose, roi, camera = pose.double(), roi.double(), camera.double()
    f, u0, v0 = _intrinsics(camera)
    t = pose[:, :3]
    o = torch.stack([u0 - f * t[:, 0] / t[:, 2], v0 + f * t[:, 1] / t[:, 2]], -1)
    c, s = roi[:, :2], roi[:, 2]
    R = euler312_to_matrix(pose[:, 3:])
    R_twin = euler312_to_matrix(symmetric_twin(pose)[:, 3:])
    if allocentric:
        Rc_t = ray_rotation(c, camera).transpose(-1, -2)
        R, R_twin = Rc_t @ R, Rc_t @ R_twin
    return {
        "offset": (o - c) / s[:, None],
        "log_depth": torch.log(-t[:, 2] * s / (f * depth_ref_mm)),
        "rotation": R,
        "twin_rotation": R_twin,
    }


def decode_pose(
    offset: Tensor,
    log_depth: Tensor,
    rotation: Tensor,
    roi: Tensor,
    camera: Tensor,
    depth_ref_mm: float,
    allocentric: bool = True,
) -> Tensor:
    """Inverse of :func:`encode_pose`: network outputs → JointTrack pose rows ``(B, 6)`` (float64)."""
    offset, log_depth, rotation = offset.double(), log_depth.double(), rotation.double()
    roi, camera = roi.double(), camera.double()
    f, u0, v0 = _intrinsics(camera)
    c, s = roi[:, :2], roi[:, 2]
    uv = c + offset * s[:, None]
    z = -torch.exp(log_depth) * f * depth_ref_mm / s
    t = torch.stack([-(uv[:, 0] - u0) * z / f, (uv[:, 1] - v0) * z / f, z], -1)  # Camera.backproject
    R = ray_rotation(c, camera) @ rotation if allocentric else rotation
    return torch.cat([t, matrix_to_euler312(R)], -1)


# ------------------------------------------------------------------------------------------------
# LightningModule
# ------------------------------------------------------------------------------------------------


class PoseModule(pl.LightningModule):
    """Pose network for one or more parts (module docstring: parameterisation, loss, parts).

    Args:
        parts: part names, in the DataModule's order (its ``part`` indices pick the head).
        input: ``mask``, ``frame`` or ``both`` — what the network sees; must match the data's.
            A mask model refuses frames (a frame is no silhouette, whatever its values).
        backbone: a timm model name (built with ``pretrained=False``: nothing is downloaded).
        backbone_kwargs: extra ``timm.create_model`` arguments.
        roi_size, roi_margin: the ROI the network was trained on (checked against the data;
            :meth:`estimate` builds its ROI with them).
        coord_channels: append two normalised coordinate channels (CoordConv), which makes
            precise position regression easier for a translation-equivariant backbone.
        shape_features: feed the head the silhouette's exact bounding box in ROI units (the
            batch's ``roi_bbox``, measured at native resolution) and, with a mask channel, the
            mask's image moments (:func:`shape_moments`): the apparent size and position that
            carry depth and in-plane translation, exactly, where the resampled ROI blurs them.
        pool: ``flatten`` keeps the final feature map's layout (position information) for the
            head; ``avg`` pools it away.
        head_hidden, dropout: the shared hidden layer of the head.
        allocentric: rotation relative to the ROI-centre ray (see the module docstring).
        depth_ref_mm: ``D`` of the depth parameterisation.
        inplane_weight, depth_weight, rotation_weight: loss weights.
        trap_aware_loss: rotation loss = min over the true rotation and its symmetric twin; True
            for every part, or a list of parts (e.g. ``[tib]``: a near-symmetric tibial tray next to
            an asymmetric femoral component).
        optimizer, lr_scheduler: LightningCLI callables; the length of a OneCycleLR or CosineAnnealingLR
            left out of the config is the run's (see :mod:`jtml.models.schedules`).
        scheduler_interval: ``step`` or ``epoch``; default the schedule's own (``step`` for OneCycleLR).
        monitor: what a ReduceLROnPlateau scheduler watches.
        channels_last: channels-last backbone (faster convolutions with bf16 autocast on CPUs
            with AMX/AVX512-BF16, and with AMP on GPUs). The head always runs in float32.
    """

    def __init__(
        self,
        parts: list[str] = ["fem"],  # noqa: B006  (copied below)
        input: Literal["mask", "frame", "both"] = "mask",
        backbone: str = "resnet18",
        backbone_kwargs: dict[str, Any] | None = None,
        roi_size: int = 128,
        roi_margin: float = 0.15,
        coord_channels: bool = True,
        shape_features: bool = True,
        pool: Literal["flatten", "avg"] = "flatten",
        head_hidden: int = 256,
        dropout: float = 0.0,
        allocentric: bool = True,
        depth_ref_mm: float = 100.0,
        inplane_weight: float = 1.0,
        depth_weight: float = 1.0,
        rotation_weight: float = 1.0,
        trap_aware_loss: bool | list[str] = False,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: Literal["epoch", "step"] | None = None,
        monitor: str = "val/loss",
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if input not in ("mask", "frame", "both"):
            raise JTMLError(f"input must be mask, frame or both, got {input!r}")
        if not parts or len(set(parts)) != len(parts):
            raise JTMLError(f"parts must be distinct and non-empty, got {parts}")
        if pool not in ("flatten", "avg"):
            raise JTMLError(f"pool must be flatten or avg, got {pool!r}")
        self.parts = [str(p) for p in parts]
        self.input = input
        self.roi_size, self.roi_margin = int(roi_size), float(roi_margin)
        self.coord_channels, self.pool = bool(coord_channels), pool
        self.shape_features = bool(shape_features)
        self.channels_last = bool(channels_last)
        self.allocentric, self.depth_ref_mm = bool(allocentric), float(depth_ref_mm)
        self.weights = (float(inplane_weight), float(depth_weight), float(rotation_weight))
        if isinstance(trap_aware_loss, bool):
            trap_parts = list(self.parts) if trap_aware_loss else []
        else:
            trap_parts = [str(p) for p in trap_aware_loss]
            unknown = sorted(set(trap_parts) - set(self.parts))
            if unknown:
                raise JTMLError(f"trap_aware_loss names part(s) {unknown} that are not in parts {self.parts}")
        self.trap_aware_loss = bool(trap_parts)
        self.register_buffer(
            "trap_parts",
            torch.tensor([p in trap_parts for p in self.parts], dtype=torch.bool),
            persistent=False,
        )
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
            feat = self.backbone.eval()(torch.zeros(1, in_chans, self.roi_size, self.roi_size))
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
        self.head = nn.Linear(head_hidden, OUTPUTS * len(self.parts))
        nn.init.zeros_(self.head.bias)
        nn.init.normal_(self.head.weight, std=1e-3)
        # Zero output = identity allocentric rotation, not the degenerate 6-D zero vector.
        self.register_buffer("rot6d_bias", matrix_to_rot6d(torch.eye(3)), persistent=False)
        self._optimizer_fn, self._scheduler_fn = optimizer, lr_scheduler
        self.scheduler_interval, self.monitor = scheduler_interval, monitor
        self._vertices: dict[str, np.ndarray] = {}
        self.val_metrics = nn.ModuleDict({p: PoseError() for p in self.parts})
        self.test_metrics = nn.ModuleDict({p: PoseError() for p in self.parts})

    # -- wiring to the data ------------------------------------------------------------------------
    def set_vertices(self, vertices: Mapping[str, np.ndarray]) -> None:
        """Model vertices per part for mTRE (a DataModule with ``part_vertices()`` sets them in setup)."""
        self._vertices = {p: np.asarray(v, dtype=np.float64) for p, v in vertices.items()}
        self.val_metrics = nn.ModuleDict({p: PoseError(self._vertices.get(p)) for p in self.parts})
        self.test_metrics = nn.ModuleDict({p: PoseError(self._vertices.get(p)) for p in self.parts})

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is None:
            return
        data_input = getattr(dm, "input", self.input)
        if data_input != self.input:
            raise JTMLError(
                f"the model takes input: {self.input} but the data gives input: {data_input}; "
                + (
                    "a mask model cannot take frames — give it masks (data input: mask)"
                    if self.input == "mask"
                    else "set the same input on model and data"
                )
            )
        for name, mine in (
            ("parts", self.parts),
            ("roi_size", self.roi_size),
            ("roi_margin", self.roi_margin),
        ):
            theirs = getattr(dm, name, mine)
            if theirs != mine:
                raise JTMLError(f"model {name} {mine} differs from the data's {theirs}; they must match")
        if hasattr(dm, "part_vertices"):
            self.set_vertices(dm.part_vertices())

    # -- network -----------------------------------------------------------------------------------
    def inputs(self, batch: Mapping[str, Any]) -> tuple[Tensor, Tensor, Tensor | None]:
        """``forward``'s arguments from a batch — ``(B, C, R, R)`` ROIs, ``part``, ``roi_bbox`` —
        refusing the wrong kind of input."""
        need = {"mask": ["roi_mask"], "frame": ["roi_image"], "both": ["roi_image", "roi_mask"]}[self.input]
        missing = [k for k in need if k not in batch]
        if missing:
            got = "frames" if "roi_image" in batch else "masks" if "roi_mask" in batch else "neither"
            hint = (
                "a mask model cannot take frames: give it the part's mask (data input: mask)"
                if self.input == "mask"
                else f"set the data's input to {self.input}"
            )
            raise JTMLError(
                f"this PoseModule takes input: {self.input} but the batch holds {got} "
                f"(no {missing[0]}); {hint}"
            )
        x = torch.cat([batch[k] for k in need], dim=1)
        part = torch.as_tensor(batch["part"], device=x.device) if "part" in batch else None
        return x, part, batch.get("roi_bbox")

    def forward(self, x: Tensor, part: Tensor, roi_bbox: Tensor | None = None) -> Tensor:
        """``(B, C, R, R)`` ROIs, part indices ``(B,)`` and (with ``shape_features``) the silhouette
        bboxes in ROI units ``(B, 4)`` → raw outputs ``(B, 9)``."""
        if self.shape_features and roi_bbox is None:
            raise JTMLError("this PoseModule uses shape_features: pass the batch's roi_bbox")
        mask = x[:, -1:] if self.shape_features and self.input != "frame" else None  # mask: last channel
        if self.coord_channels:
            b, _, h, w = x.shape
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
            out = self.head(self.neck(feat)).view(len(x), len(self.parts), OUTPUTS)
        return out[torch.arange(len(x), device=x.device), part.long()]

    def split_outputs(self, out: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Raw ``(B, 9)`` → ``offset`` (B, 2), ``log_depth`` (B,), allocentric rotation (B, 3, 3)."""
        return out[:, :2], out[:, 2], rot6d_to_matrix(out[:, 3:9] + self.rot6d_bias.to(out))

    def decode(self, out: Tensor, batch: Mapping[str, Any]) -> Tensor:
        """Raw outputs → JointTrack pose rows (B, 6) float64; NaN rows where the ROI is invalid."""
        offset, log_depth, R = self.split_outputs(out)
        pose = decode_pose(
            offset, log_depth, R, batch["roi"], batch["camera"], self.depth_ref_mm, self.allocentric
        )
        valid = torch.as_tensor(batch["valid"], device=pose.device).bool()
        return torch.where(valid[:, None], pose, torch.full_like(pose, float("nan")))

    # -- steps -------------------------------------------------------------------------------------
    def _labelled(self, batch: Mapping[str, Any]) -> Tensor:
        valid = torch.as_tensor(batch["valid"]).bool().to(batch["pose"].device)
        return valid & torch.isfinite(batch["pose"]).all(dim=1)

    def _loss(self, batch: Mapping[str, Any]) -> tuple[Tensor, dict[str, Tensor], Tensor, Tensor]:
        out = self(*self.inputs(batch))
        keep = self._labelled(batch)
        if not keep.any():
            raise JTMLError("a training/validation batch has no labelled sample (pose and non-empty mask)")
        tgt = encode_pose(
            batch["pose"][keep],
            batch["roi"][keep],
            batch["camera"][keep],
            self.depth_ref_mm,
            self.allocentric,
        )
        offset, log_depth, R = self.split_outputs(out[keep])
        l_in = F.l1_loss(offset, tgt["offset"].to(offset))
        l_depth = F.l1_loss(log_depth, tgt["log_depth"].to(log_depth))
        geo = geodesic_angle(R, tgt["rotation"].to(R))
        if self.trap_aware_loss:
            trap = self.trap_parts[torch.as_tensor(batch["part"], device=R.device)[keep].long()]
            geo = torch.where(trap, torch.minimum(geo, geodesic_angle(R, tgt["twin_rotation"].to(R))), geo)
        l_rot = geo.mean()
        w_in, w_d, w_r = self.weights
        loss = w_in * l_in + w_d * l_depth + w_r * l_rot
        return loss, {"inplane": l_in, "depth": l_depth, "rotation": l_rot}, out, keep

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss, terms, _, keep = self._loss(batch)
        n = int(keep.sum())
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=n)
        self.log_dict(
            {f"train/loss_{k}": v for k, v in terms.items()}, on_step=False, on_epoch=True, batch_size=n
        )
        return loss

    def _eval_step(self, batch: dict[str, Any], prefix: str, metrics: nn.ModuleDict) -> None:
        loss, terms, out, keep = self._loss(batch)
        n = int(keep.sum())
        self.log(
            f"{prefix}/loss", loss, on_epoch=True, prog_bar=prefix == "val", sync_dist=True, batch_size=n
        )
        self.log_dict({f"{prefix}/loss_{k}": v for k, v in terms.items()}, sync_dist=True, batch_size=n)
        pred = self.decode(out.detach(), batch)
        part = torch.as_tensor(batch["part"], device=pred.device)
        for i, name in enumerate(self.parts):
            sel = keep.to(pred.device) & (part == i)
            if sel.any():
                metrics[name].update(pred[sel], batch["pose"][sel].to(pred))

    def _eval_epoch_end(self, prefix: str, metrics: nn.ModuleDict) -> None:
        per_part = {}
        for name in self.parts:
            m = metrics[name]
            if m.update_called:
                per_part[name] = m.compute()
            m.reset()
        if not per_part:
            return
        values = {f"{prefix}/{p}/{k}": v.float() for p, vals in per_part.items() for k, v in vals.items()}
        for k in next(iter(per_part.values())):
            if all(k in v for v in per_part.values()):
                values[f"{prefix}/{k}"] = torch.stack([v[k] for v in per_part.values()]).float().mean()
        self.log_dict(values)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "val", self.val_metrics)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val", self.val_metrics)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "test", self.test_metrics)

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test", self.test_metrics)

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        """``pose`` (B, 6) float64 (NaN: no silhouette), ``part`` names, ``study``, ``frame``,
        ``frame_pos``, ``n_frames`` — what :class:`jtml.callbacks_pose.PosePredictionWriter` needs."""
        pose = self.decode(self(*self.inputs(batch)), batch).cpu()
        return {
            "pose": pose,
            "part": [self.parts[int(i)] for i in torch.as_tensor(batch["part"]).tolist()],
            "study": list(batch["study"]),
            "frame": list(batch["frame"]),
            "frame_pos": torch.as_tensor(batch["frame_pos"]).tolist(),
            "n_frames": torch.as_tensor(batch["n_frames"]).tolist(),
        }

    # -- one silhouette at a time (the JTML app) -------------------------------------------------
    @torch.no_grad()
    def estimate(
        self,
        mask: np.ndarray,
        calibration: Calibration | Camera,
        part: str | None = None,
        frame: np.ndarray | None = None,
    ) -> np.ndarray:
        """The ``(6,)`` JointTrack pose of ``part`` from its binary mask (H, W) and the calibration
        of that frame size (or a :class:`Camera`); NaN when the mask is empty. ``frame`` is needed
        (and only allowed) for frame/both models."""
        from jtml.data.pose import make_sample

        if part is None:
            if len(self.parts) != 1:
                raise JTMLError(f"this model has parts {self.parts}: say which one")
            part = self.parts[0]
        if part not in self.parts:
            raise JTMLError(f"unknown part {part!r}; this model has {self.parts}")
        mask = np.asarray(mask)
        values = np.unique(mask)
        if mask.ndim != 2 or not (set(values.tolist()) <= {0, 1} or set(values.tolist()) <= {0, 255}):
            kind = f"{len(values)} distinct values" if mask.ndim == 2 else f"shape {mask.shape}"
            raise JTMLError(
                f"this PoseModule takes a binary mask (H, W) of the {part} silhouette (values {{0,1}} or "
                f"{{0,255}}), got an image with {kind}: a frame? A mask model cannot take frames; "
                "segment the frame first"
            )
        if self.input == "mask" and frame is not None:
            raise JTMLError("this PoseModule takes masks only (input: mask); it cannot use a frame")
        if self.input != "mask" and frame is None:
            raise JTMLError(f"this PoseModule takes input: {self.input}; give the frame too")
        h, w = mask.shape
        camera = (
            calibration if isinstance(calibration, Camera) else Camera.from_calibration(calibration, w, h)
        )
        if (camera.width, camera.height) != (w, h):
            raise JTMLError(f"camera is {camera.width}x{camera.height} but the mask is {w}x{h}")
        s = make_sample(
            (mask > 0).astype(np.float32), camera, self.roi_size, self.roi_margin, self.input, frame
        )
        if not s["valid"]:
            return np.full(6, np.nan)
        batch = {k: (v[None] if isinstance(v, Tensor) else [v]) for k, v in s.items()}
        batch = {k: v.to(self.device) if isinstance(v, Tensor) else v for k, v in batch.items()}
        was_training = self.training
        self.eval()
        batch["part"] = torch.tensor([self.parts.index(part)], device=self.device)
        out = self(*self.inputs(batch))
        self.train(was_training)
        return self.decode(out, batch)[0].cpu().numpy()

    # -- optimisation and checkpoints --------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        optimizer = self._optimizer_fn(self.parameters())
        if self._scheduler_fn is None:
            return optimizer
        # the schedule's length follows the trainer unless the config gives it (jtml.models.schedules)
        config = scheduler_config(
            self._scheduler_fn, optimizer, self._trainer, self.scheduler_interval, monitor=self.monitor
        )
        return {"optimizer": optimizer, "lr_scheduler": config}

    def on_train_start(self) -> None:
        check_restored_lengths(self.trainer)  # a resumed checkpoint's schedule must cover this run

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        loadable_hparams(checkpoint, self.CHECKPOINT_HYPER_PARAMS_KEY)  # torch.load(weights_only=True)
        # Vertices ride along so a loaded model reports mTRE without the STL files.
        checkpoint["jtml_vertices"] = {p: torch.from_numpy(v) for p, v in self._vertices.items()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The data's models (set in setup) win; the checkpoint's serve a model loaded on its own.
        vertices = checkpoint.get("jtml_vertices") or {}
        if vertices and not self._vertices:
            self.set_vertices({p: v.numpy() for p, v in vertices.items()})
