"""Write registration results: ``OUT/<part>.jts``, ``OUT/report.csv`` and overlays of doubtful frames.

:class:`RefineWriter` collects :class:`jtml.models.registration.RegistrationModule` results; under
DDP every rank's are gathered and rank zero writes, once every frame of the study is in (a frame
padded in twice by a distributed sampler counts once). Everything is written into a staging
folder and moved into ``out_dir`` only when complete (:func:`jtml.io.staged_dir`): a run that fails
leaves no half-written output.

- ``<part>.jts``: one row per frame in file-name order (:func:`jtml.io.write_poses`). A part with a
  frame that could not be refined is written as ``<part>.jtak`` instead, with ``NOT_OPTIMIZED`` rows
  there (JointTrack loads those too) — never the start pose or a made-up one.
- ``report.csv``: one row per frame and part — ``frame_row`` (1-based, the pose file's row),
  ``frame``, ``part``, then :attr:`PartResult.REPORT_COLUMNS` (``refined``, ``reason``, final
  ``cost``, ``iou``, ``evaluations``, ``iterations``, ``seconds``, ``chose_twin``, ``ambiguity``,
  ``hit_bounds``, ``review``, the ``prior``'s cost and, for the tibia next to a femur,
  ``varus_valgus`` and ``offset``) and the refined pose (``x_tran`` … ``y_rot``).
- ``overlays/<frame>.png``: the refined silhouettes tinted and outlined on the frame
  (:func:`jtml.callbacks.predict.overlay`) for every frame with a part flagged for review or not
  refined (``overlays: all`` for every frame, ``none`` for none).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytorch_lightning as pl
import torch

from jtml.callbacks.predict import PredictionFolderWriter, overlay
from jtml.errors import JTMLError
from jtml.geometry import Camera, SilhouetteRenderer
from jtml.io import (
    POSE_COLUMNS,
    Calibration,
    atomic_write,
    read_image,
    read_stl,
    staged_dir,
    write_image,
    write_poses,
)
from jtml.registration.frame import PartResult

__all__ = ["RefineWriter", "REPORT_NAME"]

REPORT_NAME = "report.csv"


def _cell(value: Any) -> Any:
    if isinstance(value, bool | np.bool_):
        return int(value)
    if isinstance(value, float) and math.isnan(value):
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


class RefineWriter(PredictionFolderWriter):
    """Writes a registration run's poses, report and overlays (module docstring). ``out_dir`` and
    ``overwrite`` as every prediction writer (:class:`PredictionFolderWriter`). ``written``: the
    files of the last run; ``rows``: its results by frame."""

    def __init__(
        self,
        out_dir: str | None = None,
        overwrite: bool = False,
        overlays: Literal["flagged", "all", "none"] = "flagged",
    ) -> None:
        super().__init__(out_dir=out_dir, overwrite=overwrite, write_interval="batch")
        if overlays not in ("flagged", "all", "none"):
            raise JTMLError(f"overlays must be flagged, all or none, got {overlays!r}")
        self.overlays = overlays
        self.written: list[Path] = []
        self.rows: dict[int, dict[str, Any]] = {}
        self._mine: list[dict[str, Any]] = []

    def reset(self) -> None:
        self.written, self.rows, self._mine = [], {}, []

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.predict_loop.return_predictions = False  # the files are the output

    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        for frame in prediction:
            self._mine.append(
                {
                    "index": int(frame["index"]),
                    "frame": str(frame["frame"]),
                    "item": frame["item"],
                    "results": {p: _plain(r) for p, r in frame["results"].items()},
                }
            )

    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        out = self._output_root(trainer, pl_module)
        rows = self._mine
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, rows)
            rows = [r for part in gathered for r in part]
        if not trainer.is_global_zero:
            return
        dataset = _dataset(trainer)
        n_frames = len(dataset) if dataset is not None else (max(r["index"] for r in rows) + 1 if rows else 0)
        by_index: dict[int, dict[str, Any]] = {}
        for r in rows:
            by_index.setdefault(r["index"], r)
        missing = sorted(set(range(n_frames)) - set(by_index))
        if missing:
            raise JTMLError(
                f"registration results missing for frame row(s) {[m + 1 for m in missing[:10]]}", out
            )
        self.rows = dict(sorted(by_index.items()))
        self.written = self._write(out)

    def _write(self, out: Path) -> list[Path]:
        frames = [self.rows[i] for i in sorted(self.rows)]
        parts = list(frames[0]["results"]) if frames else []
        written: list[Path] = []
        with staged_dir(out) as stage:
            for part in parts:
                table = np.stack([f["results"][part]["pose"] for f in frames])
                missing = np.isnan(table).any(axis=1)
                name = f"{part}.{'jtak' if missing.any() else 'jts'}"
                write_poses(stage / name, table)
                written.append(out / name)
                note = f" ({int(missing.sum())} frame(s) not refined: NOT_OPTIMIZED, see {REPORT_NAME})"
                self._say(f"wrote {out / name} ({len(table)} {part} pose(s)){note if missing.any() else ''}")
            with atomic_write(stage / REPORT_NAME) as tmp, tmp.open("w", newline="") as fh:
                writer = csv.writer(fh)
                writer.writerow(["frame_row", "frame", "part", *PartResult.REPORT_COLUMNS, *POSE_COLUMNS])
                for f in frames:
                    for part in parts:
                        r = f["results"][part]
                        writer.writerow(
                            [f["index"] + 1, Path(f["frame"]).name, part]
                            + [_cell(r[k]) for k in PartResult.REPORT_COLUMNS]
                            + [_cell(float(v)) for v in r["pose"]]
                        )
            written.append(out / REPORT_NAME)
            shown = [f for f in frames if self._overlay(f)]
            renderers: dict[tuple[Any, ...], SilhouetteRenderer] = {}
            for f in shown:
                image = read_image(f["frame"])
                masks = []
                for part in parts:
                    pose = f["results"][part]["pose"]
                    if not np.isfinite(pose).all():
                        masks.append(np.zeros(image.shape[:2], dtype=bool))
                        continue
                    renderer = _renderer(renderers, f["item"], part)
                    masks.append(renderer.render(pose))
                name = f"overlays/{Path(f['frame']).stem}.png"
                write_image(
                    stage / name,
                    overlay(image, np.stack(masks) if masks else np.zeros((0, *image.shape[:2]))),
                )
                written.append(out / name)
        flagged = sum(any(r["review"] or not r["refined"] for r in f["results"].values()) for f in frames)
        self._say(
            f"wrote {out / REPORT_NAME}: {len(frames)} frame(s), {flagged} with a part flagged for review or "
            f"not refined; {len(shown)} overlay(s) in {out / 'overlays'}"
        )
        return written

    def _overlay(self, frame: dict[str, Any]) -> bool:
        if self.overlays == "none":
            return False
        return self.overlays == "all" or any(
            r["review"] or not r["refined"] for r in frame["results"].values()
        )


def _plain(result: PartResult) -> dict[str, Any]:
    """A result as plain values (what ``all_gather_object`` pickles)."""
    out = {k: getattr(result, k) for k in PartResult.REPORT_COLUMNS}
    out["pose"] = np.asarray(result.pose, dtype=np.float64)
    return out


def _dataset(trainer: pl.Trainer) -> Any:
    loaders = trainer.predict_dataloaders
    if isinstance(loaders, Sequence):
        loaders = loaders[0] if loaders else None
    return getattr(loaders, "dataset", None)


def _renderer(
    cache: dict[tuple[Any, ...], SilhouetteRenderer], item: dict[str, Any], part: str
) -> SilhouetteRenderer:
    h, w = item["shape"]
    key = (item["models"][part], tuple(item["calibration"]), (h, w))
    if key not in cache:
        camera = Camera.from_calibration(Calibration(*item["calibration"]), w, h)
        cache[key] = SilhouetteRenderer(read_stl(item["models"][part]), camera)
    return cache[key]
