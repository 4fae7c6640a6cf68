"""The studies of a ``jtml track`` run as Lightning predict data: one item per study.

A study's frames depend on each other (each frame also starts from the previous one's result), so
the unit of work is the whole study: :class:`TrackDataModule` yields one item per study (batches of
one), and under DDP Lightning's predict sampler hands each study to one process. An item is a plain
dict (:class:`StudyPlan` fields): the frames in file-name order, their size, the calibration, the
models, where masks come from (``None``: the segmentation network), start-pose files, the study's
output folder and the fingerprint of everything its result depends on (its resume key, see
:mod:`jtml.track.journal`). Frames are decoded one at a time by the module, so memory stays flat
however long the study.

:meth:`TrackDataModule.setup` checks everything before any frame is tracked and reads only —
one :class:`JTMLError` naming the file for: a folder without frames, an unreadable frame, frames of
different sizes (a calibration describes one detector at one frame size), a calibration whose
principal point falls outside the frames or, for a study made by ``jtml import``, frames of another
size than the DICOM/video the calibration came from (``import.json``), a missing or mismatched mask,
a start-pose file with more or fewer rows than frames, two studies of one name, and an output folder
that holds something other than this run's interrupted track (unless ``overwrite``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
from torch.utils.data import DataLoader, Dataset

from jtml.errors import JTMLError
from jtml.io import list_images, read_calibration, read_image, read_mask, read_poses, read_stl
from jtml.io.hashing import file_sha256
from jtml.io.study import CALIBRATION_NAME
from jtml.track.journal import PARTIAL_NAME, Journal, mask_file

__all__ = ["StudyPlan", "TrackDataModule", "TrackDataset", "study_out"]

IMPORT_NAME = "import.json"


@dataclass
class StudyPlan:
    """One study to track (module docstring); ``init``: part → ``(N, 6)`` rows (NaN: no start)."""

    name: str
    root: str
    frames: list[str]
    shape: tuple[int, int]  # (H, W) of every frame
    calibration: tuple[float, float, float, float]  # pd, xo, yo, pp
    models: dict[str, str]
    masks: str | None
    init: dict[str, list[list[float]]]
    out: str
    fingerprint: str
    resume: bool  # an interrupted track of this run is there to continue
    overwrite: bool
    inputs: dict[str, Any] = field(default_factory=dict)  # what went into the fingerprint (track.json)


def study_out(out: Path, name: str, n_studies: int) -> Path:
    """A study's output folder: ``out`` itself for one study, ``out/<study>`` for several."""
    return out if n_studies == 1 else out / name


def _collate(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return list(batch)


class TrackDataset(Dataset):
    """The study plans, as dicts."""

    def __init__(self, plans: Sequence[StudyPlan]) -> None:
        self.plans = list(plans)

    def __len__(self) -> int:
        return len(self.plans)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return asdict(self.plans[index])


def _frame_sizes(frames: list[Path]) -> tuple[tuple[int, int], list[str]]:
    """The one ``(H, W)`` of the frames and their digests; a frame of another size is an error."""
    shape: tuple[int, int] | None = None
    digests = []
    for frame in frames:
        h, w = read_image(frame).shape[:2]
        if shape is None:
            shape = (h, w)
        elif (h, w) != shape:
            raise JTMLError(
                f"frame is {w}x{h} but {frames[0].name} is {shape[1]}x{shape[0]}: a calibration describes "
                "one detector at one frame size, so a study's frames must all have that size (resized "
                "frames need their own calibration)",
                frame,
            )
        digests.append(file_sha256(frame))
    assert shape is not None
    return shape, digests


def _check_calibration(root: Path, calibration: Path, calib: Any, shape: tuple[int, int]) -> None:
    """Refuse a calibration that cannot belong to frames of ``shape``."""
    h, w = shape
    u0, v0 = w / 2 + calib.xo / calib.pp, h / 2 - calib.yo / calib.pp
    if not (0.0 <= u0 <= w and 0.0 <= v0 <= h):
        raise JTMLError(
            f"its principal point ({u0:.1f}, {v0:.1f}) px lies outside the {w}x{h} frames of {root}: "
            "is it the calibration of frames of another size?",
            calibration,
        )
    record = root / IMPORT_NAME
    if calibration.resolve() != (root / CALIBRATION_NAME).resolve() or not record.is_file():
        return
    try:
        info = json.loads(record.read_text(encoding="utf-8"))
        rows, cols = int(info["rows"]), int(info["columns"])
        made_here = (info.get("calibration") or {}).get("file") == CALIBRATION_NAME
    except (ValueError, KeyError, TypeError, AttributeError):
        return  # not jtml import's record: nothing to compare with
    if made_here and (rows, cols) != (h, w):
        raise JTMLError(
            f"was made for {cols}x{rows} frames ({record.name}) but the study's frames are {w}x{h}: "
            "frames of another size need their own calibration",
            calibration,
        )


class TrackDataModule(pl.LightningDataModule):
    """The studies to track, checked (module docstring); predict only.

    Args:
        studies: study folders (frames in file-name order).
        models: part → STL, for every study.
        out: the output folder (one study: the study's results; several: ``out/<study>/``).
        calibration: a ``JT_INTCALIB`` file for every study (default: each study's own).
        masks: masks instead of segmentation (``<part>/<frame>_label_<part>.tif``); one study only.
        init: part → a pose file (``.jts``/``.jtak``, one row per frame): one more start per frame.
        digests: what else the results depend on (checkpoint digests, settings), for the fingerprint.
        overwrite: write into an output folder that holds other results.
    """

    def __init__(
        self,
        studies: Sequence[str | os.PathLike],
        models: Mapping[str, str | os.PathLike],
        out: str | os.PathLike,
        calibration: str | os.PathLike | None = None,
        masks: str | os.PathLike | None = None,
        init: Mapping[str, str | os.PathLike] | None = None,
        digests: Mapping[str, Any] | None = None,
        overwrite: bool = False,
    ) -> None:
        super().__init__()
        if not studies:
            raise JTMLError("no study to track: give --study DIR")
        if not models:
            raise JTMLError("no part to track: give --model PART=STL")
        if masks is not None and len(studies) != 1:
            raise JTMLError("--masks holds one study's masks: give exactly one --study with it")
        self.studies = [Path(s) for s in studies]
        self.models = {str(p): Path(m) for p, m in models.items()}
        self.out = Path(out)
        self.calibration = None if calibration is None else Path(calibration)
        self.masks = None if masks is None else Path(masks)
        self.init = {str(p): Path(f) for p, f in (init or {}).items()}
        unknown = sorted(set(self.init) - set(self.models))
        if unknown:
            raise JTMLError(
                f"--init names part(s) {unknown} that are not tracked (--model parts {sorted(self.models)})"
            )
        self.digests = dict(digests or {})
        self.overwrite = bool(overwrite)
        self.plans: list[StudyPlan] | None = None

    @property
    def parts(self) -> list[str]:
        return list(self.models)

    def _plan(self, root: Path, model_digests: dict[str, str]) -> StudyPlan:
        if not root.is_dir():
            raise JTMLError("study folder not found", root)
        frames = list_images(root)
        if not frames:
            raise JTMLError("study folder holds no frames (.tif/.png/.jpg)", root)
        calibration = self.calibration or root / CALIBRATION_NAME
        if not calibration.is_file():
            raise JTMLError("calibration file not found (give --calibration FILE)", calibration)
        calib = read_calibration(calibration)
        shape, frame_digests = _frame_sizes(frames)
        _check_calibration(root, calibration, calib, shape)
        mask_digests: dict[str, list[str]] | None = None
        if self.masks is not None:
            if not self.masks.is_dir():
                raise JTMLError(
                    "mask folder not found (it holds <part>/<frame>_label_<part>.tif)", self.masks
                )
            mask_digests = {}
            for part in self.parts:
                paths = [mask_file(self.masks, part, f.stem) for f in frames]
                for path in paths:
                    if not path.is_file():
                        raise JTMLError(f"no {part} mask for frame {path.name.split('_label_')[0]}", path)
                    read_mask(path, shape)  # binary, the frame's size
                mask_digests[part] = [file_sha256(p) for p in paths]
        init = {
            part: read_poses(path, n_frames=len(frames), allow_missing=True)
            for part, path in self.init.items()
        }
        inputs = {
            "frames": [[f.name, d] for f, d in zip(frames, frame_digests, strict=True)],
            "calibration": [calib.pd, calib.xo, calib.yo, calib.pp],
            "models": model_digests,
            "masks": mask_digests,
            "init": {part: file_sha256(path) for part, path in self.init.items()},
            **self.digests,
        }
        fingerprint = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()
        out = study_out(self.out, root.name, len(self.studies))
        if out.exists() and not out.is_dir():
            raise JTMLError("output path exists and is not a folder", out)
        if out.resolve() == root.resolve():
            raise JTMLError("--out is the study folder itself: its own poses would be overwritten", out)
        state = Journal(out, fingerprint, len(frames)).state()
        if state == "other" and not self.overwrite:
            raise JTMLError(
                f"holds an interrupted `jtml track` with other inputs or settings ({PARTIAL_NAME}/); run "
                "it again with those to resume, or pass --overwrite to start over",
                out,
            )
        # (a .partial/ without a journal: a run killed before its first line, nothing to keep;
        # wandb/: the W&B run of `jtml track --wandb`, started before the first frame)
        others = [p for p in out.iterdir() if p.name not in (PARTIAL_NAME, "wandb")] if out.is_dir() else []
        if state == "absent" and others and not self.overwrite:
            raise JTMLError(
                "output folder exists and is not empty; choose another --out or pass --overwrite", out
            )
        return StudyPlan(
            name=root.name,
            root=str(root),
            frames=[str(f) for f in frames],
            shape=shape,
            calibration=(calib.pd, calib.xo, calib.yo, calib.pp),
            models={p: str(m) for p, m in self.models.items()},
            masks=None if self.masks is None else str(self.masks),
            init={p: np.asarray(rows).tolist() for p, rows in init.items()},
            out=str(out),
            fingerprint=fingerprint,
            resume=state == "same",
            overwrite=self.overwrite,
            inputs={
                "study": str(root),
                "calibration_file": str(calibration),
                "masks": None if self.masks is None else str(self.masks),
                "init": {p: str(f) for p, f in self.init.items()},
                "models": {p: str(m) for p, m in self.models.items()},
            },
        )

    def setup(self, stage: str | None = None) -> None:
        """Check every study and plan it (read only; module docstring). Idempotent."""
        if self.plans is not None:
            return
        names = [s.name for s in self.studies]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if len(self.studies) > 1 and dupes:
            raise JTMLError(
                f"several studies are named {dupes[0]!r}: their outputs (--out/<study>/) would collide"
            )
        for part, path in self.models.items():
            if not path.is_file():
                raise JTMLError(f"{part} model not found", path)
        for path in self.models.values():
            read_stl(path)
        model_digests = {part: file_sha256(path) for part, path in self.models.items()}
        self.plans = [self._plan(root, model_digests) for root in self.studies]

    def predict_dataloader(self) -> DataLoader:
        self.setup("predict")
        assert self.plans is not None
        return DataLoader(TrackDataset(self.plans), batch_size=1, shuffle=False, collate_fn=_collate)
