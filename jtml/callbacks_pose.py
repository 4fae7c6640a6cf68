"""Write predicted poses as JointTrack pose files: ``<output_dir>/<study>/<part>.jts``.

One row per frame of the study, in file-name order (the order JointTrack pairs rows with frames),
written with :func:`jtml.io.write_poses`. A frame without a pose (an empty mask: no silhouette to
start from) cannot be stored in a ``.jts``; such a part is written as ``<part>.jtak`` instead, with
``NOT_OPTIMIZED`` rows, which JointTrack also loads — and a note says so.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BasePredictionWriter
from pytorch_lightning.utilities import rank_zero_info

from jtml.io import write_poses

__all__ = ["CPUThreads", "PosePredictionWriter"]


class CPUThreads(pl.Callback):
    """Set torch's intra-op CPU threads for a CPU run: ``num_threads``, or by default the cores
    left after the DataLoader workers (at least 1).

    Why: PyTorch's OpenMP threads spin at every barrier. When they share the cores with the data
    workers (or other jobs), a thread that loses its core stalls all others — on a 2-core machine
    with one worker, 2 threads trained 3–8× slower than 1 in our measurements.
    """

    def __init__(self, num_threads: int | None = None) -> None:
        super().__init__()
        if num_threads is not None and num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {num_threads}")
        self.num_threads = num_threads

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if pl_module.device.type != "cpu":
            return
        n = self.num_threads
        if n is None:
            workers = int(getattr(trainer.datamodule, "num_workers", 0) or 0) if trainer.datamodule else 0
            n = max(1, (os.cpu_count() or 1) - workers)
        torch.set_num_threads(n)
        rank_zero_info(f"torch CPU threads: {n}")


class PosePredictionWriter(BasePredictionWriter):
    """Collects :meth:`PoseModule.predict_step` outputs and writes one pose file per study and part.

    ``output_dir``: default ``<run dir>/predictions`` (the trainer's ``default_root_dir``, which
    ``jtml predict`` sets to the run's directory). Under DDP every rank's rows are gathered and
    rank zero writes. ``written`` lists the files of the last predict run.
    """

    def __init__(self, output_dir: str | None = None) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = output_dir
        self.written: list[Path] = []
        self._rows: list[tuple[str, str, int, int, np.ndarray]] = []

    def on_predict_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._rows = []

    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        poses = torch.as_tensor(prediction["pose"]).detach().cpu().double().numpy()
        for i, pose in enumerate(poses):
            self._rows.append(
                (
                    str(prediction["study"][i]),
                    str(prediction["part"][i]),
                    int(prediction["frame_pos"][i]),
                    int(prediction["n_frames"][i]),
                    pose,
                )
            )

    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        rows = self._rows
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, rows)
            rows = [r for part in gathered for r in part]
        if not trainer.is_global_zero:
            return
        out = Path(self.output_dir or Path(trainer.default_root_dir) / "predictions")
        tables: dict[tuple[str, str], np.ndarray] = {}
        for study, part, pos, n, pose in rows:
            table = tables.setdefault((study, part), np.full((n, 6), np.nan))
            table[pos] = pose
        self.written = []
        for (study, part), table in sorted(tables.items()):
            missing = np.isnan(table).any(axis=1)
            path = out / study / f"{part}.{'jtak' if missing.any() else 'jts'}"
            write_poses(path, table)
            self.written.append(path)
            note = f" ({int(missing.sum())} frame(s) without a pose: NOT_OPTIMIZED)" if missing.any() else ""
            rank_zero_info(f"wrote {len(table)} {part} pose(s) of {study} to {path}{note}")
            print(f"wrote {path}{note}", flush=True)
