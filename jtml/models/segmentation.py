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
import re
from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
import segmentation_models_pytorch as smp
import torch
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor, nn

from jtml.errors import JTMLError
from jtml.metrics.segmentation import BoundaryDistance, DiceIoU
from jtml.models import loadable_hparams
from jtml.models.schedules import check_restored_lengths, scheduler_config

__all__ = ["LOSSES", "SegmentationModule", "build_loss", "load_encoder_state_dict"]

# name -> factory(**kwargs). All take logits and a (B,P,H,W) target with parts as independent labels.
LOSSES: dict[str, Any] = {
    "dice": lambda **kw: smp.losses.DiceLoss(mode="multilabel", from_logits=True, **kw),
    "bce": lambda **kw: smp.losses.SoftBCEWithLogitsLoss(**_bce_kwargs(kw)),
    "focal": lambda **kw: smp.losses.FocalLoss(mode="multilabel", **kw),
    "jaccard": lambda **kw: smp.losses.JaccardLoss(mode="multilabel", from_logits=True, **kw),
    "lovasz": lambda **kw: smp.losses.LovaszLoss(mode="multilabel", from_logits=True, **kw),
    "tversky": lambda **kw: smp.losses.TverskyLoss(mode="multilabel", from_logits=True, **kw),
}
WEIGHT_SUFFIXES = (".pth", ".pt", ".safetensors", ".bin")
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


def _is_local_weights(value: str) -> bool:
    return value.lower().endswith(WEIGHT_SUFFIXES) or "/" in value or os.sep in value or os.path.exists(value)


def load_encoder_state_dict(encoder: nn.Module, path: str | os.PathLike) -> None:
    """Strictly load a state dict file (.pth/.pt/.safetensors) into ``encoder``; JTMLError names the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise JTMLError("encoder weights file not found", path)
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path, device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise JTMLError(f"cannot read encoder weights ({type(e).__name__}: {e})", path) from None
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise JTMLError("encoder weights file must hold a plain state dict of tensors", path)
    try:
        encoder.load_state_dict(state, strict=True)
    except RuntimeError as e:
        detail = " ".join(str(e).split())
        if len(detail) > 600:
            detail = detail[:600] + " ..."
        raise JTMLError(
            "encoder weights do not match this encoder (save them from an smp model built with the same "
            f"encoder_name, encoder_depth and in_channels=1): {detail}",
            path,
        ) from None


def freeze_unused_parameters(net: nn.Module, in_channels: int, size: int) -> list[str]:
    """Turn off ``requires_grad`` of the parameters no output depends on, and name them.

    smp encoders at ``encoder_depth < 5`` keep their deeper stages (e.g. a ResNet's ``layer4``)
    although the forward pass never reaches them. Such parameters never get a gradient, which
    plain DDP (``strategy: ddp``) refuses as an error; frozen, DDP ignores them and checkpoints keep
    their keys. Found by one backward pass of a zero image in eval mode (no BatchNorm statistics move).
    """
    was_training = net.training
    net.eval()
    try:
        out = net(torch.zeros(1, in_channels, size, size))
        (out.float().sum() if torch.is_tensor(out) else sum(o.float().sum() for o in out)).backward()
    finally:
        net.train(was_training)
    unused = [name for name, p in net.named_parameters() if p.requires_grad and p.grad is None]
    for name, p in net.named_parameters():
        p.grad = None
        if name in unused:
            p.requires_grad_(False)
    return unused


class SegmentationModule(pl.LightningModule):
    """smp segmentation network with a per-part sigmoid head for grayscale (1-channel) frames.

    Args:
        parts: part names, one output channel each, in the order of the batch's ``mask`` channels.
        arch: smp architecture (Unet, UnetPlusPlus, FPN, DeepLabV3Plus, Segformer, ...).
        encoder_name: smp encoder, or a timm one with the ``tu-`` prefix (e.g. ``tu-hrnet_w18_small``).
        encoder_weights: None (random init) or a local state-dict file for ``model.encoder``; hub names
            (``imagenet``, ...) are refused because nothing may be downloaded.
        encoder_depth: number of encoder stages used.
        model_kwargs: extra ``smp.create_model`` arguments (e.g. ``decoder_channels``).
        loss: see :func:`build_loss` (``"bce"``, ``"dice+bce"``, or a list of ``{name, weight, ...}``).
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
        super().__init__()
        self.save_hyperparameters()
        self.parts = [str(p) for p in parts]
        if encoder_weights is not None and not _is_local_weights(encoder_weights):
            raise JTMLError(
                f"encoder_weights={encoder_weights!r}: pretrained weights cannot be downloaded (offline). "
                "Supply a local file instead, e.g. `encoder_weights: /path/to/encoder.pth`, made on a "
                "machine with internet by building the same smp model with in_channels=1 and "
                f"encoder_weights={encoder_weights!r} and running "
                "`torch.save(smp_model.encoder.state_dict(), 'encoder.pth')`; or use encoder_weights: null."
            )
        self.encoder_weights = encoder_weights
        model_kwargs = dict(model_kwargs or {})
        if arch.lower() == "fpn" and encoder_depth < 5:
            # smp's FPN decodes the last 4 feature maps and upsamples ×4, which is only right for depth 5.
            model_kwargs.setdefault("upsampling", 2 ** (encoder_depth - 3))
        try:
            self.model = smp.create_model(
                arch,
                encoder_name=encoder_name,
                encoder_weights=None,  # never download; local weights are applied in on_fit_start
                in_channels=1,
                classes=len(self.parts),
                encoder_depth=encoder_depth,
                **model_kwargs,
            )
        except (KeyError, ValueError, TypeError, RuntimeError) as e:
            raise JTMLError(f"cannot build {arch} with encoder {encoder_name!r}: {e}") from None
        freeze_unused_parameters(self.model, in_channels=1, size=2 ** max(encoder_depth, 5) * 2)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.channels_last = channels_last
        if not isinstance(compile, (bool, dict)):
            raise JTMLError(f"compile must be true, false or torch.compile arguments, got {compile!r}")
        self.compile_options = ({} if compile is True else dict(compile)) if compile else None
        self.loss_fn = build_loss(loss)
        self._optimizer_fn = optimizer
        self._scheduler_fn = lr_scheduler
        self.threshold = threshold
        self.monitor = monitor
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

    def configure_model(self) -> None:
        # Lightning calls this on every rank before DDP wraps the module; compiling in place keeps
        # parameter names (and so checkpoints) those of the eager network.
        if self.compile_options is not None and not getattr(self, "_compiled", False):
            self.model.compile(**self.compile_options)
            self._compiled = True

    def on_train_start(self) -> None:
        check_restored_lengths(self.trainer)  # a resumed checkpoint's schedule must cover this run

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        loadable_hparams(checkpoint, self.CHECKPOINT_HYPER_PARAMS_KEY)  # torch.load(weights_only=True)

    # -- forward and steps ---------------------------------------------------------------------------
    def forward(self, image: Tensor) -> Tensor:
        """Logits (B,P,H,W) for a (B,1,H,W) image."""
        if self.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
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

    def configure_optimizers(self) -> Any:
        optimizer = self._optimizer_fn(self.parameters())
        if self._scheduler_fn is None:
            return optimizer
        # the schedule's length follows the trainer unless the config gives it (jtml.models.schedules)
        config = scheduler_config(self._scheduler_fn, optimizer, self._trainer, monitor=self.monitor)
        scheduler = config["scheduler"]
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            higher_better = any(k in self.monitor for k in ("dice", "iou"))
            if higher_better and scheduler.mode == "min":
                rank_zero_warn(
                    f"ReduceLROnPlateau(mode='min') watches {self.monitor!r}, where higher is better; "
                    "set mode: max"
                )
        return {"optimizer": optimizer, "lr_scheduler": config}
