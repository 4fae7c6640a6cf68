"""Checkpoints of a run: which one resumes it, which class wrote it, and writing them atomically."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import Checkpoint, ModelCheckpoint

from jtml.errors import JTMLError
from jtml.io import atomic_write


# -- resuming -------------------------------------------------------------------------------------
def resume_checkpoint(run_dir: Path) -> Path | None:
    """The newest resumable checkpoint of a run: ``checkpoints/last.ckpt`` or a SLURM ``hpc_ckpt_*``."""
    candidates = [run_dir / "checkpoints" / "last.ckpt", *run_dir.glob("hpc_ckpt_*.ckpt")]
    existing = [p for p in candidates if p.is_file()]
    return max(existing, key=lambda p: p.stat().st_mtime) if existing else None


def latest_resumable_run(experiment_dir: Path) -> tuple[Path, Path] | None:
    """``(run_dir, checkpoint)`` of the experiment's most recently written checkpoint, if any."""
    best: tuple[float, Path, Path] | None = None
    if not experiment_dir.is_dir():
        return None
    for run_dir in experiment_dir.iterdir():
        ckpt = resume_checkpoint(run_dir) if run_dir.is_dir() else None
        if ckpt is not None and (best is None or ckpt.stat().st_mtime > best[0]):
            best = (ckpt.stat().st_mtime, run_dir, ckpt)
    return None if best is None else (best[1], best[2])


def checkpoint_class_path(ckpt: Path) -> str | None:
    """The LightningModule class a checkpoint was written by (LightningCLI stores ``_class_path``)."""
    import torch

    try:
        data = torch.load(ckpt, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise JTMLError(f"not a readable checkpoint ({type(e).__name__}: {e})", ckpt) from None
    if not isinstance(data, dict) or "state_dict" not in data:
        raise JTMLError("not a Lightning checkpoint (no state_dict)", ckpt)
    hparams = data.get("hyper_parameters") or {}
    return hparams.get("_class_path") if isinstance(hparams, dict) else None


# -- atomic checkpoints ---------------------------------------------------------------------------
@contextlib.contextmanager
def sigint_deferred() -> Iterator[None]:
    """Hold a Ctrl-C (SIGINT) that arrives inside the block until the block is done, then raise it.

    A KeyboardInterrupt raised inside ``torch.save`` surfaces as a RuntimeError from its zip writer
    ("unexpected pos"), so a run stopped while checkpointing was recorded ``failed``, not
    ``interrupted``. Main thread only (where Python delivers signals); elsewhere a no-op.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received and callable(previous):
            previous(signal.SIGINT, None)  # Python's default handler raises KeyboardInterrupt here


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes the checkpoint through :func:`jtml.io.atomic_write` (a temporary file next to it,
    fsynced, then renamed over it; one left by a process killed mid-write is removed by the next
    save of that file). A Ctrl-C during the write takes effect once the checkpoint is complete.

    Lightning's own save writes through an fsspec transaction into a temp file in the system
    temp dir and ``shutil.move``\\ s it: atomic only when that dir is on the same filesystem as
    the run directory (rarely so on a cluster, where a kill mid-copy leaves a torn last.ckpt).
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        import torch

        if "://" in str(path):  # remote storage: Lightning's fsspec path
            return super().save_checkpoint(checkpoint, path, storage_options)
        target = Path(path)
        for stale in target.parent.glob(f".{target.name}.tmp-*"):  # left by a process killed mid-write
            stale.unlink(missing_ok=True)
        with sigint_deferred(), atomic_write(target, fsync=True) as tmp:
            torch.save(checkpoint, tmp)
        return None


class LastCheckpointEveryEpoch(Checkpoint):
    """Keeps every ``ModelCheckpoint(save_last=True)``'s ``last.ckpt`` current at each epoch end.

    Lightning 2.6's ModelCheckpoint writes ``last.ckpt`` only in a step where it also saved a
    top-k checkpoint, i.e. when the monitored metric improved: after an epoch without progress
    ``last.ckpt`` is stale, and a resumed run would redo (or lose) epochs. A ``Checkpoint`` so that
    Lightning orders it with (after) the ModelCheckpoints: it runs once they had their turn.
    """

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.fast_dev_run:
            return
        for cb in trainer.checkpoint_callbacks:
            stale = getattr(cb, "_last_global_step_saved", None) != trainer.global_step
            if isinstance(cb, ModelCheckpoint) and cb.save_last and stale:
                cb._save_last_checkpoint(trainer, cb._monitor_candidates(trainer))
