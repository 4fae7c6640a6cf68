"""A study folder in JointTrack's on-disk layout, real or synthetic alike.

::

    STUDY/
      <frame>.tif ...                         frames, in file-name order
      calibration.txt                         JT_INTCALIB
      <part>.jts                              poses, one row per frame (optional)
      *<part>.stl                             the part's CAD model (optional)
      Labels/<part>/<frame>_label_<part>.tif  masks (optional)
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from jtml.errors import JTMLError
from jtml.io.images import list_images
from jtml.io.poses import read_poses

CALIBRATION_NAME = "calibration.txt"


def label_path(study: Path, part: str, frame: Path) -> Path:
    """Where the lab keeps a frame's mask for one part."""
    return study / "Labels" / part / f"{frame.stem}_label_{part}.tif"


@dataclass
class Study:
    """The files of one study; nothing is decoded until asked for."""

    root: Path
    frames: list[Path]
    calibration: Path | None  # None: a plain folder of frames (enough for segmentation)
    poses: dict[str, Path] = field(default_factory=dict)
    models: dict[str, Path] = field(default_factory=dict)
    labels: dict[str, list[Path]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def parts(self) -> list[str]:
        return sorted(set(self.poses) | set(self.labels))

    def read_poses(self, part: str) -> np.ndarray:
        """``(N, 6)`` poses of ``part``, checked against the number of frames."""
        if part not in self.poses:
            raise JTMLError(f"study has no {part}.jts", self.root)
        return read_poses(self.poses[part], n_frames=len(self.frames))


def find_model(root: Path, part: str) -> Path | None:
    """``<part>.stl`` or a single ``*_<part>.stl`` (e.g. ``KR_right_7_fem.stl``)."""
    exact = root / f"{part}.stl"
    if exact.is_file():
        return exact
    hits = sorted(p for p in root.glob(f"*{part}.stl") if p.is_file())
    return hits[0] if len(hits) == 1 else None


def load_study(root: str | os.PathLike) -> Study:
    """Discover a study's files; raises :class:`JTMLError` naming what is missing.

    Files without an image suffix are not frames (``calibration.txt``, ``.jts``, STLs, notes) and
    are ignored; a folder of frames alone (no ``calibration.txt``) is a study with
    ``calibration=None``: segmentation needs no calibration, pose data refuses it."""
    root = Path(root)
    if not root.is_dir():
        raise JTMLError("study folder not found", root)
    frames = list_images(root)
    if not frames:
        raise JTMLError("study folder holds no frames (.tif/.png/.jpg)", root)
    calibration: Path | None = root / CALIBRATION_NAME
    if not calibration.is_file():  # a folder of frames: segmentation needs none; pose data refuses it
        calibration = None
    poses = {p.stem: p for p in sorted(root.glob("*.jts")) + sorted(root.glob("*.jtak")) if p.is_file()}
    labels: dict[str, list[Path]] = {}
    label_root = root / "Labels"
    if label_root.is_dir():
        for part_dir in sorted(d for d in label_root.iterdir() if d.is_dir()):
            labels[part_dir.name] = [label_path(root, part_dir.name, f) for f in frames]
    study = Study(root=root, frames=frames, calibration=calibration, poses=poses, labels=labels)
    for part in study.parts:
        model = find_model(root, part)
        if model is not None:
            study.models[part] = model
    return study


def clear_study(out: Path, extra: tuple[str, ...] = ()) -> None:
    """Remove a previous study's files from ``out`` — frames, ``Labels/``, ``*.jts``/``*.jtak`` poses,
    ``calibration.txt`` and the ``extra`` file names — before another is written there: labels and
    poses pair with frames by name, so stale ones would pair wrongly. Other files are left alone."""
    for p in list_images(out):
        p.unlink()
    for pattern in ("*.jts", "*.jtak", CALIBRATION_NAME, *extra):
        for p in out.glob(pattern):
            if p.is_file():
                p.unlink()
    if (out / "Labels").is_dir():
        shutil.rmtree(out / "Labels")
