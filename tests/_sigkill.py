"""A test-only callback: ``kill -9`` of the training process itself at a known step.

Imported by a `jtml fit` subprocess (the tests put this folder on its PYTHONPATH). SIGKILL cannot
be caught or cleaned up after, exactly like a pre-empted or OOM-killed job; sending it from inside
pins the moment (epoch ``epoch``, before batch ``batch``) without timing races.
"""

from __future__ import annotations

import os
import signal

import pytorch_lightning as pl


class SigkillAt(pl.Callback):
    def __init__(self, epoch: int = 1, batch: int = 1) -> None:
        self.epoch, self.batch = epoch, batch

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: object, batch_idx: int
    ) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            os.kill(os.getpid(), signal.SIGKILL)


class RaiseOnRank(pl.Callback):
    """Raise on one DDP rank: at the start of epoch ``epoch``, or (``epoch=None``) when fit ends,
    after training (where 829f297's rank 1 crashed while rank 0 reported success)."""

    def __init__(self, rank: int = 1, epoch: int | None = 1) -> None:
        self.rank, self.epoch = rank, epoch

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_rank == self.rank and trainer.current_epoch == self.epoch:
            raise RuntimeError(f"injected failure on rank {self.rank}")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_rank == self.rank and self.epoch is None:
            raise RuntimeError(f"injected failure on rank {self.rank}")
