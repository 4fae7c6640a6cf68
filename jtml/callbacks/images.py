"""Lightning callbacks."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import WandbLogger

__all__ = ["WandbSegmentationImages", "label_map"]


def label_map(masks: np.ndarray) -> np.ndarray:
    """(P,H,W) binary masks → (H,W) uint8 labels: part i → i+1, pixels in ≥2 parts → P+1 ("overlap").

    One label map per layer keeps W&B's mask overlay usable while still showing where fem and tib
    overlap (they do in lateral views)."""
    masks = masks.astype(bool)
    n = masks.sum(axis=0)
    labels = np.zeros(masks.shape[1:], dtype=np.uint8)
    for i in range(masks.shape[0]):
        labels[masks[i]] = i + 1
    labels[n > 1] = masks.shape[0] + 1
    return labels


def _to_uint8(image: np.ndarray) -> np.ndarray:
    """Min-max rescale a normalised image to 0–255 for display (a constant image becomes 0)."""
    lo, hi = float(image.min()), float(image.max())
    scaled = (image - lo) / (hi - lo) if hi > lo else np.zeros_like(image)
    return np.round(scaled * 255).astype(np.uint8)


class WandbSegmentationImages(pl.Callback):
    """Log prediction / ground-truth overlays for a fixed set of validation frames to W&B.

    The first ``num_images`` samples seen in validation (first dataloader; on rank zero that is its
    own shard under DDP) are kept on the CPU once, so every epoch shows the same frames and progress is
    comparable. At each validation epoch end they are re-predicted with the current weights and
    logged under ``key`` as ``wandb.Image`` with ``masks={"prediction", "ground_truth"}`` label maps
    (see :func:`label_map`). Does nothing unless a :class:`WandbLogger` is attached; rank zero only.
    """

    def __init__(self, num_images: int = 8, key: str = "val/overlays", every_n_epochs: int = 1):
        super().__init__()
        if num_images < 1 or every_n_epochs < 1:
            raise ValueError("num_images and every_n_epochs must be >= 1")
        self.num_images = num_images
        self.key = key
        self.every_n_epochs = every_n_epochs
        self._images: list[torch.Tensor] = []
        self._masks: list[torch.Tensor] = []
        self._captions: list[str] = []
        self._frozen = False  # set after the first validation epoch: the set never changes again

    @staticmethod
    def _wandb_logger(trainer: pl.Trainer) -> WandbLogger | None:
        return next((lg for lg in trainer.loggers if isinstance(lg, WandbLogger)), None)

    def _active(self, trainer: pl.Trainer) -> bool:
        return trainer.is_global_zero and self._wandb_logger(trainer) is not None

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if dataloader_idx != 0 or self._frozen or len(self._images) >= self.num_images:
            return
        if not self._active(trainer):
            return
        if not isinstance(batch, dict) or "image" not in batch or "mask" not in batch:
            return
        frames = list(batch.get("frame", []))
        studies = list(batch.get("study", []))
        for i in range(min(len(batch["image"]), self.num_images - len(self._images))):
            self._images.append(batch["image"][i].detach().float().cpu())
            self._masks.append(batch["mask"][i].detach().cpu() > 0.5)
            parts = [studies[i] if i < len(studies) else "", frames[i] if i < len(frames) else f"#{i}"]
            self._captions.append("/".join(p for p in parts if p))

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._frozen = bool(self._images)
        if trainer.sanity_checking or not self._images or not self._active(trainer):
            return
        if trainer.current_epoch % self.every_n_epochs != 0:
            return
        import wandb

        n_parts = self._masks[0].shape[0]
        names = list(getattr(pl_module, "parts", [f"part{i}" for i in range(n_parts)]))
        class_labels = {0: "background", **{i + 1: p for i, p in enumerate(names)}, n_parts + 1: "overlap"}
        threshold = float(getattr(pl_module, "threshold", 0.5))
        param = next(pl_module.parameters())
        images = []
        with torch.no_grad():
            for image, mask, caption in zip(self._images, self._masks, self._captions, strict=True):
                x = image.unsqueeze(0).to(device=param.device, dtype=param.dtype)
                pred = (pl_module(x)[0].float().sigmoid() > threshold).cpu().numpy()
                images.append(
                    wandb.Image(
                        _to_uint8(image[0].numpy()),
                        caption=caption,
                        masks={
                            "prediction": {"mask_data": label_map(pred), "class_labels": class_labels},
                            "ground_truth": {
                                "mask_data": label_map(mask.numpy()),
                                "class_labels": class_labels,
                            },
                        },
                    )
                )
        self._wandb_logger(trainer).log_metrics({self.key: images}, step=trainer.global_step)
