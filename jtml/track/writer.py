"""``jtml track``'s outputs: each study's results written at once, when its last frame is tracked.

:class:`TrackWriter` is a Lightning ``BasePredictionWriter`` (one write per study, on the process
that tracked it). A study's folder gets, all staged and moved in together
(:func:`jtml.io.staged_dir`), after which its journal (``.partial/``) is removed:

- ``<part>.jts``: the tracked poses, one row per frame (file-name order); ``<part>.jtak`` instead
  when a frame has no pose (``NOT_OPTIMIZED`` rows, e.g. an empty mask). With ``smooth`` these are
  the smoothed poses (:mod:`jtml.track.smoothing`) and ``<part>_registered.jts`` the registered ones.
- ``<part>_network.jts`` (or ``.jtak``): the pose network's own poses, the registration's first start.
- ``report.csv``: one row per frame and part (columns: :data:`REPORT_COLUMNS`): the registered
  pose's ``cost`` and ``iou`` against the mask, ``review`` (1: look at it), which ``start`` won
  (``network``, ``init``, ``previous``; ``next`` after a backward pass), whether the symmetric
  ``twin`` of that start's pose was kept and by which ``twin_rule`` (``cost``, ``varus-valgus``,
  ``continuity``, ``undecided``), the twin cost ratio (``ambiguity``), the network pose's own
  ``network_cost``/``network_iou``, every start's final cost (``start_costs``), the ``reason`` for a
  flag or a missing pose, and the ``seconds`` its searches took.
- ``masks/<part>/<frame>_label_<part>.tif``: the segmentation network's masks (the ``jtml labels``
  layout; not written when masks were given).
- ``kinematics.csv`` and its plots (:mod:`jtml.kinematics`: ``rotations.png``,
  ``translations.png``, ``grood_suntay.png``, ``condyles.png``) when ``fem`` and ``tib`` are tracked.
- ``track.json``: what was tracked with what (inputs, checkpoints and their digests, settings,
  side), the counts of flagged frames, and this run's timing (``this_run``).

With a logger on the trainer (``jtml track --wandb``), the same curves go to W&B once every study is
written (:func:`jtml.kinematics.log_kinematics`: step = frame; with several studies each under its
own name), with each part's IoU per frame, and the counts of flagged frames in the run's summary.
Every process's studies are gathered and logged from rank zero.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
from pytorch_lightning.callbacks import BasePredictionWriter

import jtml
from jtml.callbacks.predict import gather_objects
from jtml.io import read_stl, staged_dir, write_poses
from jtml.io.atomic import atomic_write
from jtml.kinematics import CSV_NAME, PLOT_NAMES, knee_kinematics, log_kinematics, write_csv, write_plots
from jtml.track.journal import Journal, mask_file
from jtml.track.module import FEMUR, TIBIA
from jtml.track.smoothing import smooth_poses

__all__ = ["REPORT_COLUMNS", "REPORT_NAME", "SUMMARY_NAME", "TrackWriter"]

REPORT_NAME = "report.csv"
SUMMARY_NAME = "track.json"
REPORT_COLUMNS = (
    "frame", "part", "cost", "iou", "review", "start", "twin", "twin_rule", "ambiguity",
    "network_cost", "network_iou", "start_costs", "reason", "seconds",
)  # fmt: skip


def _num(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return repr(float(v))


def _float(v: Any) -> float:
    """A result's number, NaN when it has none."""
    return math.nan if v is None else float(v)


def _csv(v: str) -> str:
    v = str(v)
    return '"' + v.replace('"', '""') + '"' if any(c in v for c in ',"\n') else v


def _poses(rows: Sequence[Any]) -> np.ndarray:
    return np.array([[math.nan] * 6 if r is None else r for r in rows], dtype=np.float64).reshape(-1, 6)


def _write_poses(stage: Path, stem: str, poses: np.ndarray) -> str:
    """``stem.jts``, or ``stem.jtak`` (``NOT_OPTIMIZED`` rows) when a frame has no pose."""
    name = f"{stem}.jts" if np.isfinite(poses).all() else f"{stem}.jtak"
    write_poses(stage / name, poses)
    return name


def _link(src: Path, dst: Path) -> None:
    """``dst`` as a hard link to ``src`` (a copy across file systems): the journal keeps its own."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


class TrackWriter(BasePredictionWriter):
    """Writes each tracked study (module docstring). ``side``: the knee's side for the kinematics
    (None: no kinematics); ``smooth``: the SE(3) smoothing window (0: off); ``record``: extra
    ``track.json`` entries (checkpoints, settings)."""

    def __init__(
        self, side: str | None = None, smooth: int = 0, record: Mapping[str, Any] | None = None
    ) -> None:
        super().__init__(write_interval="batch")
        self.side, self.smooth = side, int(smooth)
        self.record = dict(record or {})
        self.summaries: list[dict[str, Any]] = []
        self._curves: list[dict[str, Any]] = []  # per study written here: what the logger gets

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.predict_loop.return_predictions = False  # the files are the output
        self._curves = []

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Every study's curves to the trainer's logger (rank zero; a collective under DDP)."""
        if trainer.logger is None:
            return
        curves = gather_objects(trainer, self._curves)
        if not trainer.is_global_zero:
            return
        many = len(curves) > 1
        for c in curves:
            prefix = f"{c['name']}/" if many else ""
            table = {f"{p}_iou": c["iou"][p] for p in c["iou"]}
            log_kinematics(trainer.logger, table, f"{prefix}registration")
            if c["kinematics"] is not None:
                plots = [Path(c["out"]) / name for name in c["plots"]]
                log_kinematics(trainer.logger, c["kinematics"], f"{prefix}kinematics", plots)
            trainer.logger.log_metrics(
                {f"{prefix}frames_flagged": c["frames_flagged"], f"{prefix}frames": c["frames"]}
            )

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
        for study in prediction:
            self.summaries.append(self.write_study(study))

    # -- one study ---------------------------------------------------------------------------------------
    def write_study(self, study: Mapping[str, Any]) -> dict[str, Any]:
        """Write one study's outputs (module docstring); returns its ``track.json`` record."""
        out = Path(study["out"])
        parts, frames, results = list(study["parts"]), list(study["frames"]), list(study["results"])
        raw = {p: _poses([r[p].get("pose") for r in results]) for p in parts}
        network = {p: _poses([r[p].get("network") for r in results]) for p in parts}
        tracked = {p: smooth_poses(raw[p], self.smooth) for p in parts} if self.smooth > 1 else raw
        written: list[str] = []
        table: dict[str, np.ndarray] | None = None
        plots: list[str] = []
        with staged_dir(out) as stage:
            for p in parts:
                written.append(_write_poses(stage, p, tracked[p]))
                written.append(_write_poses(stage, f"{p}_network", network[p]))
                if self.smooth > 1:
                    written.append(_write_poses(stage, f"{p}_registered", raw[p]))
            self._report(stage / REPORT_NAME, frames, parts, results)
            written.append(REPORT_NAME)
            if study.get("partial_masks"):
                folder = Path(study["partial_masks"])
                for p in parts:
                    for stem in frames:
                        src = mask_file(folder, p, stem)
                        _link(src, mask_file(stage / "masks", p, stem))
                        written.append(str(Path("masks") / p / src.name))
            if self.side is not None and FEMUR in parts and TIBIA in parts:
                table = knee_kinematics(
                    tracked[FEMUR],
                    tracked[TIBIA],
                    self.side,
                    fem_model=read_stl(study["models"][FEMUR]),
                    tib_model=read_stl(study["models"][TIBIA]),
                )
                write_csv(stage / CSV_NAME, table)
                plots = [q.name for q in write_plots(stage, table)]
                written += [CSV_NAME, *plots]
            summary = self._summary(study, results, written)
            with atomic_write(stage / SUMMARY_NAME) as tmp:
                tmp.write_text(json.dumps(summary, indent=2) + "\n")
            written.append(SUMMARY_NAME)
        self._remove_stale(out, parts, set(written))
        Journal(out, study["fingerprint"], len(frames)).remove()
        iou = {p: np.array([_float(r[p].get("iou")) for r in results]) for p in parts}
        self._curves.append(
            {"name": study["name"], "out": str(out), "kinematics": table, "plots": plots, "iou": iou,
             "frames": len(frames), "frames_flagged": summary["frames_flagged"]}
        )  # fmt: skip
        self._say(
            f"tracked {study['name']}: {len(frames)} frame(s), {summary['frames_flagged']} flagged "
            f"({study['resumed']} resumed, {study['computed']} tracked now); wrote {out}"
        )
        return summary

    def _report(self, path: Path, frames: list[str], parts: list[str], results: list[dict]) -> None:
        lines = [",".join(REPORT_COLUMNS)]
        for stem, result in zip(frames, results, strict=True):
            for p in parts:
                r = result[p]
                costs = " ".join(f"{k}={_num(v)}" for k, v in (r.get("costs") or {}).items())
                values = [
                    stem, p, _num(r.get("cost")), _num(r.get("iou")), "1" if r.get("review") else "0",
                    r.get("start", ""), "" if "twin" not in r else str(int(r["twin"])),
                    r.get("twin_rule", ""), _num(r.get("ambiguity")), _num(r.get("network_cost")),
                    _num(r.get("network_iou")), costs, r.get("reason", ""), _num(r.get("seconds")),
                ]  # fmt: skip
                lines.append(",".join(_csv(v) for v in values))
        with atomic_write(path) as tmp:
            tmp.write_text("\n".join(lines) + "\n")

    def _summary(self, study: Mapping[str, Any], results: list[dict], written: list[str]) -> dict[str, Any]:
        parts = list(study["parts"])
        flagged = {p: sum(bool(r[p].get("review")) for r in results) for p in parts}
        missing = {p: sum(r[p].get("pose") is None for r in results) for p in parts}
        computed = int(study["computed"])
        return {
            "jtml_version": jtml.__version__,
            "study": study["name"],
            "out": str(study["out"]),
            "frames": len(results),
            "parts": parts,
            "side": self.side,
            "smooth": self.smooth,
            "flagged": flagged,
            "frames_flagged": sum(any(r[p].get("review") for p in parts) for r in results),
            "no_pose": missing,
            "files": sorted(f for f in written if not f.startswith("masks")),
            **self.record,
            "inputs": study.get("inputs", {}),
            "fingerprint": study["fingerprint"],
            "this_run": {
                "resumed_frames": int(study["resumed"]),
                "tracked_frames": computed,
                "seconds": round(float(study["seconds"]), 3),
                "seconds_per_frame": round(float(study["seconds"]) / computed, 3) if computed else None,
            },
        }

    @staticmethod
    def _remove_stale(out: Path, parts: list[str], written: set[str]) -> None:
        """Outputs of an earlier track in this folder (``--overwrite``) that this one did not write."""
        names = [CSV_NAME, *PLOT_NAMES]
        for p in parts:
            names += [f"{p}{s}{ext}" for s in ("", "_network", "_registered") for ext in (".jts", ".jtak")]
        for name in names:
            if name not in written:
                (out / name).unlink(missing_ok=True)
        masks = out / "masks"
        if masks.is_dir():
            for f in masks.rglob("*"):
                if f.is_file() and str(f.relative_to(out)) not in written:
                    f.unlink()

    @staticmethod
    def _say(msg: str) -> None:
        """On stderr, from the process that tracked the study (stdout is the command's summary)."""
        print(msg, file=sys.stderr, flush=True)
