"""Registration data: for every frame of a study, each part's mask and start pose.

:class:`RegistrationDataModule` reads one study the way ``jtml refine`` names it — the frames
(the study's images, in file-name order), ``masks`` (``<part>/<frame>_label_<part>.tif``, the
``jtml labels`` layout; default ``STUDY/Labels``), a start-pose file per part (``init``; one row per
frame, ``NOT_OPTIMIZED`` rows of a ``.jtak`` are frames without a start), each part's STL (``models``;
default the study's ``*<part>.stl``) and the calibration (default ``STUDY/calibration.txt``, for
frames of the study's size, as ``jtml labels`` reads it) — and checks all of it in ``setup``, before
anything is registered: a missing file, a pose file with more or fewer rows than there are frames, a model
that is not closed (watertight) is one :class:`JTMLError` naming the file. What can differ from
frame to frame — a missing, unreadable or empty mask, an unreadable frame, a start pose that is no
use — is not an error here: the frame's item says so and the registration reports the part as not
refined, with the reason.

``starts`` instead of ``init``: start poses drawn around the study's own tracked poses
(``<part>.jts``) — ``{inplane: 5, depth: 40, degrees: 10, seed: 0}``, uniformly up to those mm
parallel to the image plane, along the line of sight and degrees about a random axis — what the
registration benchmark and the experiment YAML's smoke run start from.

``synthetic`` when no ``study`` is given: a synthetic study (:func:`jtml.sim.synth.generate_study`'s
arguments, e.g. ``{out: data/synthetic/refine, frames: 4, seed: 0, size: 512}``), generated on first
use, with its own models, calibration and masks — what ``experiments/refine.yaml`` runs by default.

An item (one frame; batches are lists of items, ``batch_size`` frames each) is a dict: ``index``
(the frame's row), ``frame`` (its path), ``image`` (the frame, for masks refined by its edges),
``shape`` ``(H, W)``, ``masks`` (part → uint8 ``(H, W)``
or None), ``problems`` (part → why its mask is missing), ``starts`` (part → ``(6,)``, NaN: none),
``models`` (part → STL path) and ``calibration`` (``pd, xo, yo, pp``).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from jtml.errors import JTMLError
from jtml.geometry import euler312_to_matrix, matrix_to_euler312
from jtml.geometry.render import closed_mesh
from jtml.io import list_images, read_calibration, read_image, read_mask, read_poses, read_stl
from jtml.io.study import CALIBRATION_NAME, find_model

__all__ = ["RegistrationDataModule", "RegistrationDataset", "check_model", "perturbed_starts"]


def check_model(path: Path) -> None:
    """Refuse an STL that is not a closed surface: its silhouette is not a solid's, and registration
    (which renders only the faces turned to the source, exact for closed models) would be wrong."""
    mesh = read_stl(path)
    _, faces, closed = closed_mesh(mesh.vertices, mesh.faces)
    if not closed:
        raise JTMLError(
            f"the model is not watertight (a closed, consistently wound surface; {len(faces)} triangles): "
            "registration needs the implant's closed CAD surface — repair it (e.g. trimesh's "
            "fill_holes/fix_normals, MeshLab) or export it again",
            path,
        )


def perturbed_starts(
    truth: np.ndarray, inplane: float, depth: float, degrees: float, seed: int
) -> np.ndarray:
    """Start poses around ``truth`` ``(N, 6)``: the model's origin moved uniformly up to ``inplane`` mm
    in each image-plane axis and ``depth`` mm along z, and turned by up to ``degrees`` about a
    uniformly random axis (NaN rows stay NaN)."""
    truth = np.asarray(truth, dtype=np.float64).reshape(-1, 6)
    rng = np.random.default_rng(seed)
    n = len(truth)
    shift = np.column_stack([rng.uniform(-inplane, inplane, (n, 2)), rng.uniform(-depth, depth, n)])
    axis = rng.standard_normal((n, 3))
    axis /= np.linalg.norm(axis, axis=1, keepdims=True)
    angle = np.radians(rng.uniform(-degrees, degrees, n))
    K = np.zeros((n, 3, 3))
    K[:, 0, 1], K[:, 0, 2], K[:, 1, 2] = -axis[:, 2], axis[:, 1], -axis[:, 0]
    K = K - K.transpose(0, 2, 1)
    dR = np.eye(3) + np.sin(angle)[:, None, None] * K + (1 - np.cos(angle))[:, None, None] * (K @ K)
    out = np.full_like(truth, np.nan)
    ok = np.isfinite(truth).all(axis=1)
    if ok.any():
        R = dR[ok] @ euler312_to_matrix(truth[ok, 3:]).numpy()
        out[ok, :3] = truth[ok, :3] + shift[ok]
        out[ok, 3:] = matrix_to_euler312(torch.from_numpy(R)).numpy()
    return out


def _label(folder: Path, part: str, frame: Path) -> Path:
    return folder / part / f"{frame.stem}_label_{part}.tif"


class RegistrationDataset(Dataset):
    """One item per frame (module docstring)."""

    def __init__(
        self,
        frames: list[Path],
        masks: Path,
        starts: Mapping[str, np.ndarray],
        models: Mapping[str, Path],
        calibration: tuple[float, float, float, float],
    ) -> None:
        self.frames, self.masks = list(frames), Path(masks)
        self.starts = {p: np.asarray(s, dtype=np.float64) for p, s in starts.items()}
        self.models = {p: str(m) for p, m in models.items()}
        self.calibration = tuple(float(c) for c in calibration)
        self.parts = list(self.starts)

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, index: int) -> dict[str, Any]:
        frame = self.frames[index]
        masks: dict[str, np.ndarray | None] = {p: None for p in self.parts}
        problems: dict[str, str] = {}
        image: np.ndarray | None = None
        try:
            image = read_image(frame)
            shape: tuple[int, ...] = tuple(image.shape[:2])
        except JTMLError as e:  # one bad frame is that frame's problem, not the run's
            shape = (0, 0)
            problems = {p: f"cannot read the frame: {e}" for p in self.parts}
        for part in self.parts:
            path = _label(self.masks, part, frame)
            if part in problems:
                continue
            if not path.is_file():
                problems[part] = f"no mask file {path}"
                continue
            try:
                masks[part] = read_mask(path, shape)  # type: ignore[arg-type]
            except JTMLError as e:
                problems[part] = str(e)
        return {
            "index": int(index),
            "frame": str(frame),
            "image": image,
            "shape": shape,
            "masks": masks,
            "problems": problems,
            "starts": {p: s[index].copy() for p, s in self.starts.items()},
            "models": dict(self.models),
            "calibration": self.calibration,
        }


def _items(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return list(batch)


class RegistrationDataModule(pl.LightningDataModule):
    """The frames of one study to register (module docstring); predict only.

    ``study`` or ``synthetic`` (module docstring); ``init``: part → start-pose file; ``starts``:
    perturbed tracked poses instead (module docstring); ``models``: part → STL (default: the
    study's); ``calibration`` (default: the study's); ``masks`` (default ``STUDY/Labels``);
    ``batch_size`` frames per predict step."""

    def __init__(
        self,
        study: str | None = None,
        synthetic: dict[str, Any] | None = None,
        init: dict[str, str] | None = None,
        starts: dict[str, Any] | None = None,
        models: dict[str, str] | None = None,
        calibration: str | None = None,
        masks: str | None = None,
        batch_size: int = 1,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if batch_size < 1 or num_workers < 0:
            raise JTMLError(f"batch_size must be >= 1 and num_workers >= 0 (got {batch_size}, {num_workers})")
        if bool(init) == bool(starts):
            raise JTMLError("give the start poses either as init: {part: file} or as starts: {inplane, ...}")
        if study is None and not (isinstance(synthetic, dict) and "out" in synthetic):
            raise JTMLError(
                f"give a study folder (study) or a synthetic study (synthetic: {{out: ...}}), got {synthetic}"
            )
        self.synthetic = dict(synthetic) if study is None and synthetic else None  # a given study wins
        self.study = Path(study if study is not None else synthetic["out"])  # type: ignore[index]
        self.init, self.perturb = dict(init or {}), dict(starts or {})
        self.models_arg, self.calibration_arg = dict(models or {}), calibration
        self.masks_arg = masks
        self.batch_size, self.num_workers = int(batch_size), int(num_workers)
        self.predict_dataset: RegistrationDataset | None = None

    def _starts(self, n_frames: int) -> dict[str, np.ndarray]:
        if self.init:
            return {
                part: read_poses(path, n_frames=n_frames, allow_missing=True)
                for part, path in self.init.items()
            }
        known = {"inplane", "depth", "degrees", "seed", "parts"}
        if set(self.perturb) - known:
            raise JTMLError(
                f"starts: unknown key(s) {sorted(set(self.perturb) - known)}; known {sorted(known)}"
            )
        parts = self.perturb.get("parts") or sorted(p.stem for p in self.study.glob("*.jts"))
        if not parts:
            raise JTMLError(
                "starts: drawn around the study's tracked poses, but it has no <part>.jts", self.study
            )
        args = [
            float(self.perturb.get(k, d)) for k, d in (("inplane", 5.0), ("depth", 40.0), ("degrees", 10.0))
        ]
        seed = int(self.perturb.get("seed", 0))
        return {
            part: perturbed_starts(read_poses(self.study / f"{part}.jts", n_frames=n_frames), *args, seed + i)
            for i, part in enumerate(parts)
        }

    def prepare_data(self) -> None:
        """Generate the synthetic study on first use (``out`` without frames)."""
        if self.synthetic and not (self.study.is_dir() and list_images(self.study)):
            from jtml.sim.synth import generate_study

            print(f"generating a synthetic study in {self.study}", file=sys.stderr)
            generate_study(**{**self.synthetic, "out": self.study, "progress": False})

    def setup(self, stage: str | None = None) -> None:
        if self.predict_dataset is not None:
            return
        if self.synthetic and not (self.study.is_dir() and list_images(self.study)):
            self.prepare_data()
        frames = list_images(self.study)
        if not frames:
            raise JTMLError("study folder holds no frames (.tif/.png/.jpg)", self.study)
        starts = self._starts(len(frames))
        models: dict[str, Path] = {}
        for part in starts:
            path = self.models_arg.get(part) or find_model(self.study, part)
            if path is None:
                raise JTMLError(f"no model for part {part!r}: give models: {{{part}: FILE.stl}}", self.study)
            check_model(Path(path))
            models[part] = Path(path)
        extra = sorted(set(self.models_arg) - set(starts))
        if extra:
            raise JTMLError(f"models given for part(s) {extra} without start poses (parts: {sorted(starts)})")
        calib = read_calibration(self.calibration_arg or self.study / CALIBRATION_NAME)
        masks = Path(self.masks_arg) if self.masks_arg else self.study / "Labels"
        if not masks.is_dir():
            raise JTMLError("mask folder not found (it holds <part>/<frame>_label_<part>.tif)", masks)
        for part in starts:
            if not (masks / part).is_dir():
                raise JTMLError(f"mask folder has no {part}/ sub-folder", masks)
        self.predict_dataset = RegistrationDataset(
            frames, masks, starts, models, (calib.pd, calib.xo, calib.yo, calib.pp)
        )

    def predict_dataloader(self) -> DataLoader:
        if self.predict_dataset is None:
            self.setup("predict")
        return DataLoader(
            self.predict_dataset,
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=_items,
        )
