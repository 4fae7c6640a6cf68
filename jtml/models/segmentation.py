"""Multilabel implant segmentation (one sigmoid channel per part, e.g. fem and tib) with smp networks.

Batches are dicts: ``image`` (B,1,H,W) float, ``mask`` (B,P,H,W) in {0,1} ordered like ``parts``,
``pixel_size`` (B,) mm/px, ``frame`` and ``study`` lists of ids (predict batches may lack ``mask``).

Metric logging pattern: ``DiceIoU``/``BoundaryDistance`` return dicts, which ``self.log`` cannot take as
Metric objects, so each step calls ``metric.update`` and the epoch-end hook logs
``metric.compute()`` via ``log_dict`` and then ``reset()``s. ``compute()`` syncs the sum/count states
across processes, so the logged values are already global under DDP (no ``sync_dist`` needed).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from jtml.errors import JTMLError
from jtml.metrics.segmentation import BoundaryDistance, DiceIoU
from jtml.models.base import JTMLModule
from jtml.models.losses import build_loss
from jtml.models.networks.segmentation import check_encoder_weights, create_network, load_encoder_state_dict

__all__ = ["SegmentationModule"]


class SegmentationModule(JTMLModule):
    """smp segmentation network with a per-part sigmoid head for grayscale (1-channel) frames.

    Args:
        parts: part names, one output channel each, in the order of the batch's ``mask`` channels.
        arch: smp architecture (Unet, UnetPlusPlus, FPN, DeepLabV3Plus, Segformer, ...).
        encoder_name: smp encoder, or a timm one with the ``tu-`` prefix (e.g. ``tu-hrnet_w18_small``).
        encoder_weights: None (random init) or a local state-dict file for ``model.encoder``; hub names
            (``imagenet``, ...) are refused because nothing may be downloaded.
        encoder_depth: number of encoder stages used.
        model_kwargs: extra ``smp.create_model`` arguments (e.g. ``decoder_channels``).
        loss: see :func:`jtml.models.losses.build_loss` (``"bce"``, ``"dice+bce"``, or a list of
            ``{name, weight, ...}``).
        optimizer, lr_scheduler: callables taking params / the optimizer (LightningCLI style). A OneCycleLR
            steps per batch; the length of a OneCycleLR or CosineAnnealingLR left out of the config is the
            run's (see :mod:`jtml.models.schedules`).
        threshold: probability threshold for metrics.
        monitor: metric a ReduceLROnPlateau scheduler watches.
        channels_last: use channels-last memory format (faster convs with AMP on recent GPUs).
        compile: ``torch.compile`` the network for fit/validate/test/predict: ``false`` (default),
            ``true``, or ``torch.compile`` keyword arguments (``{mode: max-autotune}``). Compiled in
            place (``nn.Module.compile``), so checkpoints keep their keys and load uncompiled.
    """

    HIGHER_IS_BETTER = ("dice", "iou")

    def __init__(
        self,
        parts: list[str],
        arch: str = "Unet",
        encoder_name: str = "resnet34",
        encoder_weights: str | None = None,
        encoder_depth: int = 5,
        model_kwargs: dict[str, Any] | None = None,
        loss: str | list[dict[str, Any]] = "dice+bce",
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        threshold: float = 0.5,
        monitor: str = "val/dice_mean",
        channels_last: bool = False,
        compile: bool | dict[str, Any] = False,
    ):
        super().__init__(optimizer, lr_scheduler, monitor, channels_last=channels_last, compile=compile)
        self.save_hyperparameters()
        self.parts = [str(p) for p in parts]
        check_encoder_weights(encoder_weights)
        self.encoder_weights = encoder_weights
        self.model = create_network(arch, encoder_name, encoder_depth, len(self.parts), model_kwargs)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.loss_fn = build_loss(loss)
        self.threshold = threshold
        self.val_dice = DiceIoU(self.parts, threshold=threshold)
        self.test_dice = DiceIoU(self.parts, threshold=threshold)
        self.test_boundary = BoundaryDistance(self.parts, threshold=threshold)
        # True once weights came from a file or a checkpoint, so a later fit never overwrites them.
        self._weights_loaded = False

    # -- weights -----------------------------------------------------------------------------------
    def load_encoder_weights(self, path: str | os.PathLike | None = None) -> None:
        """Load the local encoder state dict (``encoder_weights`` by default) into ``model.encoder`` now."""
        path = path if path is not None else self.encoder_weights
        if path is None:
            return
        load_encoder_state_dict(self.model.encoder, path)
        self._weights_loaded = True

    def on_fit_start(self) -> None:
        # Deferred to here (after Lightning restored any fit(ckpt_path=...) checkpoint, which sets
        # trainer.ckpt_path and calls on_load_checkpoint) so checkpoints never need the original encoder
        # file and their weights are never overwritten by it. Loading copies in place, so the optimizer
        # and DDP wrapper built before this hook keep the same parameters; every rank reads the same file.
        if self.encoder_weights and not self._weights_loaded and self.trainer.ckpt_path is None:
            self.load_encoder_weights()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._weights_loaded = True

    @property
    def network(self) -> nn.Module:
        return self.model

    # -- forward and steps ---------------------------------------------------------------------------
    def forward(self, image: Tensor) -> Tensor:
        """Logits (B,P,H,W) for a (B,1,H,W) image."""
        image = self.in_memory_format(image)
        logits = self.model(image)
        if logits.shape[-2:] != image.shape[-2:]:
            raise JTMLError(
                f"{self.hparams.arch} returned {tuple(logits.shape[-2:])} logits for a "
                f"{tuple(image.shape[-2:])} image; check model_kwargs (e.g. upsampling) and that H and W "
                "are divisible by 2**encoder_depth"
            )
        return logits

    def _loss(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
        image, mask = batch["image"], batch["mask"]
        if mask.ndim != 4 or mask.shape[1] != len(self.parts):
            raise JTMLError(
                f"batch 'mask' has shape {tuple(mask.shape)} but the model has parts {self.parts}; "
                "the data's parts must match the model's, in the same order"
            )
        logits = self(image)
        return self.loss_fn(logits, mask.to(logits.dtype)), logits, mask

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss, _, _ = self._loss(batch)
        self.log(
            "train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(batch["image"])
        )
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        loss, logits, mask = self._loss(batch)
        self.log("val/loss", loss, on_epoch=True, prog_bar=True, sync_dist=True, batch_size=len(logits))
        self.val_dice.update(logits.sigmoid(), mask)

    def on_validation_epoch_end(self) -> None:
        if self.val_dice.update_called:
            values = {f"val/{k}": v for k, v in self.val_dice.compute().items()}
            self.log("val/dice_mean", values.pop("val/dice_mean"), prog_bar=True)
            self.log_dict(values)
        self.val_dice.reset()

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        loss, logits, mask = self._loss(batch)
        self.log("test/loss", loss, on_epoch=True, sync_dist=True, batch_size=len(logits))
        probs = logits.sigmoid()
        self.test_dice.update(probs, mask)
        self.test_boundary.update(probs, mask, batch["pixel_size"])

    def on_test_epoch_end(self) -> None:
        for metric in (self.test_dice, self.test_boundary):
            if metric.update_called:
                self.log_dict({f"test/{k}": v for k, v in metric.compute().items()})
            metric.reset()

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        """``{"probs": (B,P,H,W) probabilities, "frame": ids, "study": ids or None}``."""
        return {
            "probs": self(batch["image"]).sigmoid(),
            "frame": list(batch.get("frame", [])),
            "study": list(batch["study"]) if "study" in batch else None,
        }
