"""What every jtml LightningModule shares: optimisation wiring, checkpoint hygiene, memory format, compile."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor, nn

from jtml.errors import JTMLError
from jtml.models.schedules import check_restored_lengths, scheduler_config

__all__ = ["JTMLModule", "loadable_hparams"]


def loadable_hparams(checkpoint: dict[str, Any], key: str) -> None:
    """Drop Python classes/partials (e.g. the default ``torch.optim.Adam``) from the checkpoint's
    ``optimizer``/``lr_scheduler`` hyper-parameters, in place: they make it unloadable with
    ``torch.load(weights_only=True)`` and only matter for training. LightningCLI stores them as plain
    ``{class_path, init_args}`` dicts, which are kept."""
    hp = checkpoint.get(key)
    if isinstance(hp, Mapping):
        checkpoint[key] = {
            k: v
            for k, v in hp.items()
            if k not in ("optimizer", "lr_scheduler") or v is None or isinstance(v, (dict, str))
        }


class JTMLModule(pl.LightningModule):
    """Base of the segmentation and pose modules; a subclass builds its network and names it in
    :attr:`network` (the ``nn.Module`` that ``compile`` compiles).

    Args:
        optimizer, lr_scheduler: LightningCLI callables; the length of a OneCycleLR or
            CosineAnnealingLR left out of the config is the run's (:mod:`jtml.models.schedules`).
        monitor: what a ReduceLROnPlateau scheduler watches.
        scheduler_interval: ``step`` or ``epoch``; None: the schedule's own.
        channels_last: whether the network runs in channels-last memory format.
        compile: ``torch.compile`` the network for fit/validate/test/predict: ``False``, ``True``, or
            ``torch.compile`` keyword arguments.
    """

    # Substrings of monitored metrics where higher is better: a ReduceLROnPlateau(mode="min") watching
    # one is almost surely a configuration mistake, worth a warning.
    HIGHER_IS_BETTER: tuple[str, ...] = ()

    def __init__(
        self,
        optimizer: OptimizerCallable,
        lr_scheduler: LRSchedulerCallable | None,
        monitor: str,
        scheduler_interval: Literal["epoch", "step"] | None = None,
        channels_last: bool = False,
        compile: bool | dict[str, Any] = False,
    ) -> None:
        super().__init__()
        if not isinstance(compile, (bool, dict)):
            raise JTMLError(f"compile must be true, false or torch.compile arguments, got {compile!r}")
        self._optimizer_fn, self._scheduler_fn = optimizer, lr_scheduler
        self.monitor, self.scheduler_interval = monitor, scheduler_interval
        self.channels_last = bool(channels_last)
        self.compile_options = ({} if compile is True else dict(compile)) if compile else None

    @property
    def network(self) -> nn.Module:
        """The network proper (no losses or metrics): what ``compile`` compiles."""
        raise NotImplementedError

    def in_memory_format(self, x: Tensor) -> Tensor:
        """``x`` (an input batch) in the memory format the network runs in."""
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def configure_model(self) -> None:
        # Lightning calls this on every rank before DDP wraps the module; compiling in place keeps
        # parameter names (and so checkpoints) those of the eager network.
        if self.compile_options is not None and not getattr(self, "_compiled", False):
            self.network.compile(**self.compile_options)
            self._compiled = True

    def configure_optimizers(self) -> Any:
        optimizer = self._optimizer_fn(self.parameters())
        if self._scheduler_fn is None:
            return optimizer
        # the schedule's length follows the trainer unless the config gives it (jtml.models.schedules)
        config = scheduler_config(
            self._scheduler_fn, optimizer, self._trainer, self.scheduler_interval, monitor=self.monitor
        )
        scheduler = config["scheduler"]
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau) and scheduler.mode == "min":
            if any(k in self.monitor for k in self.HIGHER_IS_BETTER):
                rank_zero_warn(
                    f"ReduceLROnPlateau(mode='min') watches {self.monitor!r}, where higher is better; "
                    "set mode: max"
                )
        return {"optimizer": optimizer, "lr_scheduler": config}

    def on_train_start(self) -> None:
        check_restored_lengths(self.trainer)  # a resumed checkpoint's schedule must cover this run

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        loadable_hparams(checkpoint, self.CHECKPOINT_HYPER_PARAMS_KEY)  # torch.load(weights_only=True)
