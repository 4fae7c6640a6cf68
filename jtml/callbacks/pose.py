"""Write predicted poses as JointTrack pose files: ``<out_dir>/<study>/<part>.jts``.

One row per frame of the study, in file-name order (the order JointTrack pairs rows with frames),
written with :func:`jtml.io.write_poses`. A frame without a pose (an empty mask: no silhouette to
start from) cannot be stored in a ``.jts``; such a part is written as ``<part>.jtak`` instead, with
``NOT_OPTIMIZED`` rows, which JointTrack also loads — and a note says so.

Symmetric trap: a network trained with a trap-aware loss for a (nearly) mirror-symmetric part may
return either the pose or its twin (:func:`jtml.geometry.symmetric_twin`). With ``trap_rule:
varus_valgus`` (default) the writer does what JointTrack does: where a frame has both a femur and a
tibia pose, it keeps the tibia pose or its twin, whichever has the smaller varus–valgus angle
relative to the femur (:func:`resolve_tibia_twin`). The network's own poses are then written too,
as ``<part>_network.jts``, so the rule can be audited.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytorch_lightning as pl
import torch

from jtml.callbacks.predict import PredictionFolderWriter
from jtml.geometry.knee import resolve_tibia_twin
from jtml.io import write_poses

__all__ = ["PosePredictionWriter"]


class PosePredictionWriter(PredictionFolderWriter):
    """Collects :meth:`PoseModule.predict_step` outputs and writes one pose file per study and part.

    ``out_dir``, ``overwrite``: as every prediction writer
    (:class:`jtml.callbacks.predict.PredictionFolderWriter`): default ``<run dir>/predictions``
    (the trainer's ``default_root_dir``, which ``jtml predict`` sets to the run's directory); a
    non-empty folder is refused unless ``overwrite``. ``trap_rule``: ``varus_valgus`` resolves the
    tibia's symmetric twin as JointTrack does (module docstring; ``femur``/``tibia`` name the parts),
    ``none`` writes the network's poses as they are. Under DDP every rank's rows are gathered and
    rank zero writes. ``written`` lists the files of the last predict run.
    """

    def __init__(
        self,
        out_dir: str | None = None,
        overwrite: bool = False,
        trap_rule: Literal["varus_valgus", "none"] = "varus_valgus",
        femur: str = "fem",
        tibia: str = "tib",
    ) -> None:
        super().__init__(out_dir=out_dir, overwrite=overwrite, write_interval="batch")
        if trap_rule not in ("varus_valgus", "none"):
            raise ValueError(f"trap_rule must be varus_valgus or none, got {trap_rule!r}")
        self.trap_rule, self.femur, self.tibia = trap_rule, femur, tibia
        self.written: list[Path] = []
        self._rows: list[tuple[str, str, int, int, np.ndarray]] = []

    def reset(self) -> None:
        self.written, self._rows = [], []

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
        out = self._output_root(trainer, pl_module)
        rows = self._rows
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, rows)
            rows = [r for part in gathered for r in part]
        if not trainer.is_global_zero:
            return
        tables: dict[tuple[str, str], np.ndarray] = {}
        for study, part, pos, n, pose in rows:
            table = tables.setdefault((study, part), np.full((n, 6), np.nan))
            table[pos] = pose
        self.written = []
        if self.trap_rule == "varus_valgus":
            for study in sorted({s for s, _ in tables}):
                fem, tib = tables.get((study, self.femur)), tables.get((study, self.tibia))
                if fem is None or tib is None or len(fem) != len(tib):
                    continue
                path = out / study / f"{self.tibia}_network.{'jtak' if np.isnan(tib).any() else 'jts'}"
                write_poses(path, tib)
                self.written.append(path)
                tables[(study, self.tibia)], flipped = resolve_tibia_twin(fem, tib)
                self._say(
                    f"{study}: replaced {int(flipped.sum())} of {len(tib)} {self.tibia} pose(s) by their "
                    f"symmetric twin (smaller varus-valgus angle to the {self.femur}); network poses: {path}"
                )
        for (study, part), table in sorted(tables.items()):
            missing = np.isnan(table).any(axis=1)
            path = out / study / f"{part}.{'jtak' if missing.any() else 'jts'}"
            write_poses(path, table)
            self.written.append(path)
            note = f" ({int(missing.sum())} frame(s) without a pose: NOT_OPTIMIZED)" if missing.any() else ""
            self._say(f"wrote {path} ({len(table)} {part} pose(s) of {study}){note}")
