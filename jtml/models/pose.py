"""6-DoF implant pose from a silhouette ROI (and optionally the frame): a timm backbone with pose heads.

The network (:class:`~jtml.models.networks.pose.PoseNet`) predicts, per sample, where the model
origin projects relative to the ROI, a ROI-relative log depth and an allocentric 6-D rotation; the
parameterisation and its decoding into JointTrack poses are in :mod:`jtml.models.parameterisation`.

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
import torch
import torch.nn.functional as F
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from jtml.errors import JTMLError
from jtml.geometry import Camera, geodesic_angle
from jtml.io import Calibration
from jtml.metrics.pose import PoseError
from jtml.models.base import JTMLModule
from jtml.models.networks.pose import PoseNet
from jtml.models.parameterisation import decode_pose, encode_pose

__all__ = ["PoseModule"]

# The network's submodules, which checkpoints written before PoseNet held at the module's top level.
_NET_PREFIXES = ("backbone.", "neck.", "head.")


class PoseModule(JTMLModule):
    """Pose network for one or more parts (module docstring: loss, parts; the network is ``self.net``).

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
            mask's image moments (:func:`~jtml.models.networks.pose.shape_moments`): the apparent
            size and position that carry depth and in-plane translation, exactly, where the
            resampled ROI blurs them.
        pool: ``flatten`` keeps the final feature map's layout (position information) for the
            head; ``avg`` pools it away.
        head_hidden, dropout: the shared hidden layer of the head.
        allocentric: rotation relative to the ROI-centre ray (:mod:`jtml.models.parameterisation`).
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
        compile: ``torch.compile`` the network for fit/validate/test/predict: ``false`` (default),
            ``true``, or ``torch.compile`` keyword arguments. Compiled in place, so checkpoints keep
            their keys and load uncompiled.
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
        compile: bool | dict[str, Any] = False,
    ) -> None:
        super().__init__(optimizer, lr_scheduler, monitor, scheduler_interval, channels_last, compile)
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
        self.net = PoseNet(
            len(self.parts),
            input,
            backbone,
            backbone_kwargs,
            self.roi_size,
            coord_channels,
            shape_features,
            pool,
            head_hidden,
            dropout,
            self.channels_last,
        )
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

    @property
    def network(self) -> PoseNet:
        return self.net

    def forward(self, x: Tensor, part: Tensor, roi_bbox: Tensor | None = None) -> Tensor:
        """``(B, C, R, R)`` ROIs, part indices ``(B,)`` and (with ``shape_features``) the silhouette
        bboxes in ROI units ``(B, 4)`` → raw outputs ``(B, 9)``."""
        return self.net(x, part, roi_bbox)

    def split_outputs(self, out: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Raw ``(B, 9)`` → ``offset`` (B, 2), ``log_depth`` (B,), allocentric rotation (B, 3, 3)."""
        return self.net.split_outputs(out)

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
        ``frame_pos``, ``n_frames`` — what :class:`jtml.callbacks.pose.PosePredictionWriter` needs."""
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
        from jtml.geometry.roi import make_sample

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

    # -- checkpoints -------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        # Vertices ride along so a loaded model reports mTRE without the STL files.
        checkpoint["jtml_vertices"] = {p: torch.from_numpy(v) for p, v in self._vertices.items()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Lightning calls this before load_state_dict, both in load_from_checkpoint and when a fit
        # resumes: checkpoints written before the network was a PoseNet name its weights without
        # the ``net.`` prefix. The parameter order is unchanged, so their optimizer state fits too.
        state = checkpoint.get("state_dict")
        if isinstance(state, dict):
            for key in [k for k in state if k.startswith(_NET_PREFIXES)]:
                state[f"net.{key}"] = state.pop(key)  # in place: callers hold this dict
        # The data's models (set in setup) win; the checkpoint's serve a model loaded on its own.
        vertices = checkpoint.get("jtml_vertices") or {}
        if vertices and not self._vertices:
            self.set_vertices({p: v.numpy() for p, v in vertices.items()})
