"""Pose data: per-part ROIs around each implant's silhouette, with the pose and camera that label them.

Every sample is ONE part in ONE frame. A square region of interest (ROI) is cut around the part's
silhouette (from its mask: the mask is the ROI source for every input kind, so frame input needs
masks too — the ground-truth labels in training, a segmentation network's masks in use), resampled
to ``roi_size`` pixels (area filter, so a binary mask becomes a soft, sub-pixel-accurate one) and
returned with the ROI's place in the frame and the frame's camera. The network's targets are made
from these in :mod:`jtml.models.parameterisation`; nothing here depends on the network.

Sample dict (collated by the default collate): ``roi_mask`` and/or ``roi_image`` float32
``(1, R, R)`` (by ``input``: mask, frame or both), ``roi`` float64 ``(3,)`` = ROI centre ``(u, v)``
and side in frame pixels (continuous coordinates, pixel ``(c, r)`` centred at ``(c+½, r+½)``),
``roi_bbox`` float32 ``(4,)`` = the silhouette's bounding box at native resolution in ROI units
(left, top, right, bottom; exact where the resampled ROI blurs it), ``camera`` float64 ``(6,)`` =
``pd, xo, yo, pp, width, height`` of the frame, ``pose`` float64 ``(6,)``
(NaN when unknown), ``part`` int (index into ``parts``), ``valid`` bool (False: empty mask, no ROI),
``study``, ``frame`` (str), ``frame_pos`` (row of the frame in its study's pose file), ``n_frames``.

Sources. Files: an ``index`` CSV, ``studies`` folders or a ``synthetic`` study (generated on first
use by :func:`jtml.sim.synth.generate_study`), split as :mod:`jtml.data.base` describes. Renders
(``render: true``, mask input only): every training sample is a fresh random pose of the part's
model (``models``; None = the built-in procedural implants) seen through ``calibration`` on
``image_size``² frames, sampled by ``pose_ranges`` and rendered with the exact
:class:`~jtml.geometry.SilhouetteRenderer` rule — only the window around the silhouette is
rasterised, so a sample costs a few ms. With renders, the validation set is a fixed set of renders
and any files given (index/studies/synthetic) are the test and predict sets, all their frames.

Augmentation must keep the label right, so only pose-consistent operations exist:

- ``rotation_range``: in-plane rotation by θ about the principal point is a rotation of the
  camera about its optical axis, exact for any scene: ``R' = Rz(θ)·R``, ``t' = Rz(θ)·t``
  (the image turns counter-clockwise on screen for θ > 0).
- ``roi_jitter`` ``[shift, scale]``: the ROI moves by up to ``shift`` × side and its side scales
  by up to ``exp(±scale)``. The ROI is a crop whose place in the frame travels with the sample
  (``roi``), and the targets are expressed relative to it, so this is exact — it is the
  translation augmentation. Translating the *image* instead is not pose-consistent (under
  perspective, a moved implant does not project to a moved silhouette), so it is not offered.
- ``train_transforms`` (frame input): albumentations pixel-level transforms only (noise, blur,
  gamma, contrast, …). Any spatial transform — flips, affine, elastic, shear, crops, grid
  distortions — changes the silhouette without a pose that explains it and is refused with a
  :class:`JTMLError`; so are the ``"lab"`` recipes, which contain them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import torch
import trimesh
from torch.utils.data import Dataset

from jtml.data.base import STAGE_SPLITS, FluoroDataModule
from jtml.data.degrade import MaskDegradation
from jtml.data.index import IndexRow, raise_problems
from jtml.data.loaders import EpochSeeded
from jtml.data.transforms import build_transforms, check_pose_consistent
from jtml.errors import JTMLError
from jtml.geometry import Camera, SilhouetteRenderer, project_mesh
from jtml.geometry.roi import (
    INPUTS,
    Input,
    in_plane_rotation_matrix,
    make_sample,
    mask_bbox,
    rotate_pose_in_plane,
)
from jtml.geometry.sampling import MAX_ATTEMPTS, SIDES, PoseSampler
from jtml.io import read_calibration, read_image, read_mask, read_stl
from jtml.sim.synth import REFERENCE_SIZE

__all__ = ["FluoroPoseDataModule", "PoseFileDataset", "PoseItem", "RenderedPoseDataset"]


# ------------------------------------------------------------------------------------------------
# Datasets
# ------------------------------------------------------------------------------------------------


def _torch_rng() -> np.random.Generator:
    """A numpy generator drawn from torch's RNG: seeded by ``seed_everything``, different in every
    DataLoader worker and every epoch (numpy's global state would repeat across forked workers)."""
    return np.random.default_rng(int(torch.randint(0, 2**62, ()).item()))


class RenderedPoseDataset(Dataset):
    """Mask samples rendered on the fly at random poses (sample ``i`` shows ``parts[i % P]``).

    ``seed=None``: a fresh pose every time (training); an int: sample ``i`` is always the same
    (validation/test), and ``cache`` keeps it after the first render.
    """

    def __init__(
        self,
        sampler: PoseSampler,
        meshes: dict[str, trimesh.Trimesh],
        parts: Sequence[str],
        camera: Camera,
        length: int,
        roi_size: int,
        margin: float,
        jitter: Sequence[float] = (0.0, 0.0),
        rotation_range: float = 0.0,
        seed: int | None = None,
        cache: bool = False,
        degradation: MaskDegradation | None = None,
    ) -> None:
        self.sampler, self.parts, self.camera = sampler, list(parts), camera
        # the knee sampler poses both implants: the other one is rendered too for degradation's overlaps
        both = set(self.parts) | ({"fem", "tib"} if sampler.kind == "knee" and degradation else set())
        self.renderers = {p: SilhouetteRenderer(_shared_vertices(meshes[p]), camera) for p in sorted(both)}
        self.length, self.roi_size, self.margin = int(length), int(roi_size), float(margin)
        self.jitter, self.rotation_range = tuple(jitter), float(rotation_range)
        self.seed, self.cache = seed, cache and seed is not None
        self.degradation = degradation
        self._cache: dict[int, dict[str, Any]] = {}

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index in self._cache:
            return self._cache[index]
        rng = np.random.default_rng([self.seed, index]) if self.seed is not None else _torch_rng()
        part_idx = index % len(self.parts)
        part = self.parts[part_idx]
        for _ in range(MAX_ATTEMPTS):
            poses = self.sampler.knee(rng) if self.sampler.kind == "knee" else {part: self.sampler(rng, part)}
            if self.rotation_range > 0:
                theta = rng.uniform(-self.rotation_range, self.rotation_range)
                poses = {p: rotate_pose_in_plane(q, theta) for p, q in poses.items()}
            pose = poses[part]
            win, x0, y0 = self.renderers[part].render_window(pose)
            if win.any():
                break
        if self.degradation is not None:
            win, x0, y0 = self._degraded(rng, part, poses, win, x0, y0)
        sample = make_sample(
            win, self.camera, self.roi_size, self.margin, "mask", rng=rng, jitter=self.jitter, offset=(x0, y0)
        )
        sample.update(
            pose=torch.from_numpy(np.asarray(pose, dtype=np.float64)),
            part=part_idx,
            study="render",
            frame=f"render_{index:06d}",
            frame_pos=index,
            n_frames=self.length,
        )
        if self.cache:
            self._cache[index] = sample
        return sample

    def _degraded(
        self,
        rng: np.random.Generator,
        part: str,
        poses: dict[str, np.ndarray],
        win: np.ndarray,
        x0: int,
        y0: int,
    ) -> tuple[np.ndarray, int, int]:
        """The render window, padded so a dilated boundary fits, degraded like a segmentation
        network's mask (the other implant rendered into the same window for the overlaps)."""
        assert self.degradation is not None
        W, H, pad = self.camera.width, self.camera.height, self.degradation.reach
        X0, Y0 = max(0, x0 - pad), max(0, y0 - pad)
        X1, Y1 = min(W, x0 + win.shape[1] + pad), min(H, y0 + win.shape[0] + pad)
        big = np.zeros((Y1 - Y0, X1 - X0), dtype=bool)
        _paste(big, win, x0 - X0, y0 - Y0)

        def other() -> np.ndarray | None:
            for name, pose in poses.items():
                if name != part and name in self.renderers:
                    try:
                        ow, ox, oy = self.renderers[name].render_window(pose)
                    except JTMLError:
                        return None
                    out = np.zeros_like(big)
                    _paste(out, ow, ox - X0, oy - Y0)
                    return out
            return None

        return self.degradation(big, rng, other), X0, Y0


def _shared_vertices(mesh: trimesh.Trimesh) -> trimesh.Trimesh:
    """The same triangles with each distinct vertex stored once (an STL repeats a vertex in every
    triangle that has it): identical coordinates, so identical renders, for a sixth of the
    projections."""
    v, inverse = np.unique(np.asarray(mesh.vertices, dtype=np.float64), axis=0, return_inverse=True)
    return trimesh.Trimesh(v, inverse.reshape(-1)[np.asarray(mesh.faces)], process=False)


def _paste(dst: np.ndarray, src: np.ndarray, x: int, y: int) -> None:
    """``dst[y:y+h, x:x+w] |= src`` for the part of ``src`` that falls inside ``dst``."""
    h, w = src.shape
    ys, xs = max(0, -y), max(0, -x)
    ye, xe = min(h, dst.shape[0] - y), min(w, dst.shape[1] - x)
    if ye > ys and xe > xs:
        dst[y + ys : y + ye, x + xs : x + xe] |= src[ys:ye, xs:xe]


@dataclass
class PoseItem:
    """One part in one indexed frame, checked by the DataModule's setup."""

    row: IndexRow
    part: str
    part_idx: int
    pose: np.ndarray | None
    bbox: tuple[int, int, int, int] | None
    shape: tuple[int, int]  # (H, W) of the frame
    frame_pos: int
    n_frames: int


class PoseFileDataset(EpochSeeded, Dataset):
    """Samples of indexed frames (one per frame and part): ROI from the part's mask.

    ``augment``: random ``rotation_range`` (exact in-plane rotation of frame, mask and pose about
    the principal point), ``jitter`` of the ROI and the pixel-level ``transform`` (frame input).
    """

    def __init__(
        self,
        items: Sequence[PoseItem],
        input: Input,
        roi_size: int,
        margin: float,
        invert: bool = False,
        augment: bool = False,
        jitter: Sequence[float] = (0.0, 0.0),
        rotation_range: float = 0.0,
        transform: Any = None,
        degradation: MaskDegradation | None = None,
    ) -> None:
        self.items, self.input = list(items), input
        self.degradation = degradation
        self.roi_size, self.margin, self.invert = int(roi_size), float(margin), bool(invert)
        self.augment, self.jitter, self.rotation_range = bool(augment), tuple(jitter), float(rotation_range)
        self.transform = transform
        self._calibrations: dict[Path, Any] = {}

    def __len__(self) -> int:
        return len(self.items)

    def _camera(self, item: PoseItem) -> Camera:
        path = item.row.calibration
        if path not in self._calibrations:
            self._calibrations[path] = read_calibration(path)
        return Camera.from_calibration(self._calibrations[path], item.shape[1], item.shape[0])

    def __getitem__(self, index: int) -> dict[str, Any]:
        it = self.items[index]
        cam = self._camera(it)
        mask = (read_image(it.row.masks[it.part]) > 0).astype(np.float32)
        frame = read_image(it.row.image) if self.input in ("frame", "both") else None
        pose = None if it.pose is None else np.asarray(it.pose, dtype=np.float64)
        bbox = it.bbox
        rng = _torch_rng() if self.augment else None
        if rng is not None and self.rotation_range > 0 and it.bbox is not None:
            theta = rng.uniform(-self.rotation_range, self.rotation_range)
            M = in_plane_rotation_matrix(cam, theta)
            size = (cam.width, cam.height)
            mask = cv2.warpAffine(mask, M, size, flags=cv2.INTER_LINEAR, borderValue=0)
            if frame is not None:
                frame = cv2.warpAffine(
                    frame, M, size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
                )
            pose = None if pose is None else rotate_pose_in_plane(pose, theta)
            bbox = None  # recomputed from the turned mask
        if rng is not None and self.degradation is not None and it.bbox is not None:
            others = [p for p in it.row.masks if p != it.part]
            other = read_image(it.row.masks[others[0]]) > 0 if others else None
            if other is not None and self.rotation_range > 0:
                size = (cam.width, cam.height)
                other = cv2.warpAffine(other.astype(np.float32), M, size, flags=cv2.INTER_LINEAR) > 0.5
            mask = self.degradation(mask > 0.5, rng, other).astype(np.float32)
            bbox = None
        if self.transform is not None:
            self._reseed()
        sample = make_sample(
            mask,
            cam,
            self.roi_size,
            self.margin,
            self.input,
            frame=frame,
            invert=self.invert,
            rng=rng,
            jitter=self.jitter if self.augment else (0.0, 0.0),
            bbox=bbox,
            pixel_transform=self.transform if self.augment else None,
        )
        sample.update(
            pose=torch.from_numpy(pose if pose is not None else np.full(6, np.nan)),
            part=it.part_idx,
            study=it.row.study,
            frame=it.row.frame,
            frame_pos=it.frame_pos,
            n_frames=it.n_frames,
        )
        return sample


# ------------------------------------------------------------------------------------------------
# DataModule
# ------------------------------------------------------------------------------------------------


class FluoroPoseDataModule(FluoroDataModule):
    """Per-part pose samples for Lightning (module docstring: sample layout, sources, augmentation).

    Args:
        parts: part names; sample ``part`` indices follow this order (the model's must match).
        input: ``mask`` (silhouette only: the JTML-app contract), ``frame`` or ``both`` (channels
            frame, mask). Every kind takes its ROI from the mask.
        index, studies, synthetic: file sources, as :mod:`jtml.data.base` describes (``synthetic``: the
            arguments of :func:`~jtml.sim.synth.generate_study`, generated on first use).
        render: train/validate on renders of ``models`` (mask input only); files are then the
            test/predict sets (all their frames).
        models: STL per part for renders and for the mTRE metric (None: the procedural implants
            for renders; the index's model column for files).
        calibration: ``JT_INTCALIB`` of the ``image_size``² frames the renders imitate (as a study's
            ``calibration.txt`` describes its frames); None = the lab's fluoroscope (pd 1198 mm,
            0.373 mm pixels at 1024², the same field of view at other sizes).
        image_size: the rendered frames' size; ROIs are cut at this native resolution.
        pose_ranges: see :class:`PoseSampler` (ranges, or derived from tracked frames' pose files).
        side: the knee side the renders show — ``right``, ``left`` (the models are left implants;
            mirror images of the right-knee configurations, exact) or ``both`` (:class:`PoseSampler`).
            Kept with the checkpoint, so prediction can warn when the poses do not look like that side.
        mask_degradation: training renders (and training masks from files) made segmentation-like —
            boundary moved in/out, ragged edges, holes, the other implant's overlap removed or merged
            (:class:`jtml.data.degrade.MaskDegradation`; ``true``: its defaults, a mapping overrides
            some). Pose-consistent: only the input changes. Validation renders stay exact.
        train_samples, val_samples, test_samples: renders per training epoch / in the fixed
            validation and (without files) test sets; ``render_seed`` seeds the fixed sets.
        roi_size, roi_margin: network input size and the ROI's margin around the silhouette
            (``side = max(w, h)·(1 + margin)``).
        roi_jitter: ``[shift, scale]`` training jitter of the ROI (exact; see the module docstring).
        rotation_range: training in-plane rotation in degrees, ± (exact).
        train_transforms: pixel-level albumentations list for frames (spatial ones are refused).
        invert: frames ``max − value`` (implants bright) before the ROI is normalised (min–max).
        predict_split: rows that predict covers (files mode). Its default is ``all``: a ``.jts``
            pose file needs every frame of the study (the segmentation DataModule's is ``test``,
            the held-out frames).
    """

    def __init__(
        self,
        parts: list[str] = ["fem"],  # noqa: B006  (copied below; a literal default reads well in --help)
        input: Input = "mask",
        index: str | None = None,
        studies: list[str] | None = None,
        synthetic: dict[str, Any] | None = None,
        render: bool = False,
        models: dict[str, str] | None = None,
        calibration: str | None = None,
        image_size: int = REFERENCE_SIZE,
        pose_ranges: dict[str, Any] | None = None,
        side: Literal["right", "left", "both"] = "right",
        mask_degradation: bool | dict[str, Any] | None = None,
        train_samples: int = 4096,
        val_samples: int = 256,
        test_samples: int = 256,
        render_seed: int = 0,
        roi_size: int = 128,
        roi_margin: float = 0.15,
        roi_jitter: list[float] = [0.0, 0.0],  # noqa: B006
        rotation_range: float = 0.0,
        train_transforms: str | list[dict[str, Any]] | None = None,
        invert: bool = False,
        batch_size: int = 32,
        num_workers: int = 2,
        pin_memory: bool | None = None,
        persistent_workers: bool = True,
        val_fraction: float = 0.2,
        test_fraction: float = 0.1,
        split_seed: int = 0,
        split_by: Literal["study", "frame"] | None = None,
        predict_split: Literal["train", "val", "test", "all"] = "all",
    ) -> None:
        if input not in INPUTS:
            raise JTMLError(f"input must be one of {INPUTS}, got {input!r}")
        if side not in SIDES:
            raise JTMLError(f"side must be one of {list(SIDES)}, got {side!r}")
        if not render and index is None and not studies and not synthetic:
            raise JTMLError("no data: give an index CSV, study folders, a synthetic study or render: true")
        if render and input != "mask":
            raise JTMLError(
                f"render: true renders silhouettes, so it needs input: mask (got {input!r}); frame input "
                "trains on studies (e.g. a synthetic one)"
            )
        if int(roi_size) < 16 or roi_margin < 0:
            raise JTMLError(f"roi_size must be >= 16 and roi_margin >= 0 (got {roi_size}, {roi_margin})")
        if len(roi_jitter) != 2 or min(roi_jitter) < 0:
            raise JTMLError(f"roi_jitter must be [shift, scale] >= 0, got {roi_jitter}")
        if rotation_range < 0 or min(train_samples, val_samples, test_samples) < 1:
            raise JTMLError("rotation_range must be >= 0 and the sample counts >= 1")
        super().__init__(
            parts=parts,
            index=index,
            studies=studies,
            synthetic=synthetic,
            batch_size=batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            persistent_workers=persistent_workers,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            split_seed=split_seed,
            split_by=split_by,
            predict_split=predict_split,
        )
        self.save_hyperparameters()
        self.input = input
        self.render = bool(render)
        self.models = {str(k): str(v) for k, v in (models or {}).items()}
        self.image_size = int(image_size)
        self.roi_size, self.roi_margin = int(roi_size), float(roi_margin)
        self.roi_jitter = (float(roi_jitter[0]), float(roi_jitter[1]))
        self.rotation_range = float(rotation_range)
        self.invert = bool(invert)
        self.side = side
        self.degradation = MaskDegradation.from_config(mask_degradation)
        if self.degradation is not None and input != "mask":
            raise JTMLError("mask_degradation degrades mask inputs; it needs input: mask")
        self.train_transform = build_transforms(train_transforms, where="train_transforms")
        check_pose_consistent(self.train_transform)
        if self.train_transform is not None and input == "mask":
            raise JTMLError("train_transforms act on frames; input: mask takes none (use roi_jitter)")
        # Read everything renders need now, so a missing file fails before any training starts.
        self._meshes: dict[str, trimesh.Trimesh] | None = None
        self.camera: Camera | None = None
        self.sampler: PoseSampler | None = None
        if self.render:
            from jtml.sim.synth import default_calibration

            calib = (
                default_calibration(self.image_size) if calibration is None else read_calibration(calibration)
            )
            self.camera = Camera.from_calibration(calib, self.image_size, self.image_size)
            self.sampler = PoseSampler(pose_ranges, self.meshes(), self.camera, side=side)
            if self.sampler.kind == "knee" and not set(self.parts) <= {"fem", "tib"}:
                raise JTMLError(
                    f"pose_ranges: the knee sampler poses fem and tib only, not {self.parts}; use "
                    "{sampler: independent} for other parts"
                )
        elif pose_ranges is not None:
            raise JTMLError("pose_ranges only applies to render: true")
        self._items: dict[str, list[PoseItem]] = {}

    # ---------------------------------------------------------------- models and vertices

    def meshes(self) -> dict[str, trimesh.Trimesh]:
        """The render models by part: ``models`` where given, else the procedural implants."""
        if self._meshes is None:
            from jtml.sim.implants import procedural_models

            meshes = dict(procedural_models())
            for part, path in self.models.items():
                meshes[part] = read_stl(path)
            missing = [p for p in self.parts if p not in meshes]
            if missing and self.render:
                raise JTMLError(f"no model for part(s) {missing}: give models: {{{missing[0]}: PATH.stl}}")
            self._meshes = meshes
        return self._meshes

    def part_meshes(self) -> dict[str, trimesh.Trimesh]:
        """The model of each part, for the mTRE metric and the prediction writer's silhouette check:
        the render models, ``models``, or the one model file the index lists for the part (a part
        listed with several models gets none)."""
        if self.render:
            return {p: self.meshes()[p] for p in self.parts}
        out = {p: read_stl(self.models[p]) for p in self.parts if p in self.models}
        if self.has_files:
            rows = self._load_rows()
            for p in self.parts:
                paths = {r.models.get(p) for r in rows} - {None}
                if p not in out and len(paths) == 1:
                    out[p] = read_stl(next(iter(paths)))
        return out

    def part_vertices(self) -> dict[str, np.ndarray]:
        """Model vertices per part for the mTRE metric (:meth:`part_meshes`)."""
        return {p: np.asarray(m.vertices, dtype=np.float64) for p, m in self.part_meshes().items()}

    # ---------------------------------------------------------------- files

    @property
    def has_files(self) -> bool:
        """Whether frames were given (index, studies or a synthetic study), not renders alone."""
        return self.index is not None or bool(self.studies)

    def items(self, split: str, need_pose: bool) -> list[PoseItem]:
        """Checked samples of ``split`` (``all``: every row): every problem of every file in one error.

        Each frame needs a readable calibration and, per part, a binary mask of the frame's size;
        with ``need_pose`` a pose in front of the source whose model projects into the frame, and
        a non-empty mask (the ROI comes from it).
        """
        key = f"{split}:{need_pose}"
        if key in self._items:
            return self._items[key]
        rows = self._load_rows()
        order: dict[str, list[IndexRow]] = {}
        for r in sorted(rows, key=lambda r: (r.study, Path(r.image).name)):
            order.setdefault(r.study, []).append(r)
        position = {id(r): (i, len(v)) for v in order.values() for i, r in enumerate(v)}
        vertices = self.part_vertices()
        problems: list[str] = []
        items: list[PoseItem] = []
        for r in self.split_rows(split):
            if r.calibration is None:
                problems.append(f"{r.image}: no calibration (its study has no calibration.txt)")
                continue
            try:
                calib = read_calibration(r.calibration)
            except JTMLError as e:
                problems.append(str(e))
                continue
            shape = None
            if self.input in ("frame", "both"):
                try:
                    shape = read_image(r.image).shape
                except JTMLError as e:
                    problems.append(str(e))
                    continue
            for k, part in enumerate(self.parts):
                mpath = r.masks.get(part)
                if mpath is None:
                    problems.append(
                        f"{r.image}: no {part} mask listed for this frame (the ROI comes from it)"
                    )
                    continue
                try:
                    mask = read_mask(mpath, shape)
                except JTMLError as e:
                    problems.append(str(e))
                    continue
                pose = r.poses.get(part)
                bbox = mask_bbox(mask)
                if need_pose and pose is None:
                    problems.append(f"{r.image}: no {part} pose for this frame")
                    continue
                if pose is not None:
                    problem = _pose_problem(
                        pose, vertices.get(part), Camera.from_calibration(calib, mask.shape[1], mask.shape[0])
                    )
                    if problem:
                        problems.append(f"{r.image}: {part} pose {np.round(pose, 3).tolist()} {problem}")
                        continue
                if need_pose and bbox is None:
                    problems.append(f"{mpath}: the {part} mask is empty (no ROI for a labelled frame)")
                    continue
                pos, n = position[id(r)]
                items.append(PoseItem(r, part, k, pose, bbox, tuple(mask.shape), pos, n))
        raise_problems(problems, self.source)
        self._items[key] = items
        return items

    # ---------------------------------------------------------------- Lightning hooks

    def _rendered(self, length: int, seed: int | None, train: bool = False) -> RenderedPoseDataset:
        assert self.sampler is not None and self.camera is not None
        return RenderedPoseDataset(
            self.sampler,
            self.meshes(),
            self.parts,
            self.camera,
            length,
            self.roi_size,
            self.roi_margin,
            jitter=self.roi_jitter if train else (0.0, 0.0),
            rotation_range=self.rotation_range if train else 0.0,
            seed=seed,
            cache=seed is not None,
            degradation=self.degradation if train else None,
        )

    def _files(self, split: str, train: bool = False, need_pose: bool = True) -> PoseFileDataset:
        items = self.items(split, need_pose)
        if not items:
            raise self.empty_split_error(split)
        return PoseFileDataset(
            items,
            self.input,
            self.roi_size,
            self.roi_margin,
            invert=self.invert,
            augment=train,
            jitter=self.roi_jitter,
            rotation_range=self.rotation_range,
            transform=self.train_transform if train else None,
            degradation=self.degradation if train else None,
        )

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets ``stage`` needs (None: train and val)."""
        stage = stage or "fit"
        if stage == "predict":
            if not self.has_files:
                raise JTMLError("predict needs frames: give studies, an index or a synthetic study")
            self.predict_dataset = self._files("all" if self.render else self.predict_split, need_pose=False)
            return
        if self.render:
            if stage == "fit":
                self.train_dataset = self._rendered(self.hparams.train_samples, None, train=True)
            if stage in ("fit", "validate"):
                self.val_dataset = self._rendered(self.hparams.val_samples, self.hparams.render_seed + 1)
            if stage == "test":
                self.test_dataset = (
                    self._files("all")
                    if self.has_files
                    else self._rendered(self.hparams.test_samples, self.hparams.render_seed + 2)
                )
            return
        for split in STAGE_SPLITS.get(stage, STAGE_SPLITS["fit"]):
            setattr(self, f"{split}_dataset", self._files(split, train=split == "train"))


def _pose_problem(pose: np.ndarray, vertices: np.ndarray | None, camera: Camera) -> str | None:
    """Why a labelled pose cannot belong to this frame (behind the source, outside the view), or None."""
    pts = vertices if vertices is not None else np.zeros((1, 3))
    try:
        uv = project_mesh(pts, np.asarray(pose, dtype=np.float64), camera)
    except JTMLError:
        return "puts the model at or behind the X-ray source (needs z < 0)"
    W, H = camera.width, camera.height
    if vertices is None:  # the model origin only: allow it well outside the silhouette
        inside = (-0.5 * W <= uv[:, 0]).all() and (uv[:, 0] <= 1.5 * W).all()
        inside = inside and (-0.5 * H <= uv[:, 1]).all() and (uv[:, 1] <= 1.5 * H).all()
    else:
        inside = ((uv[:, 0] >= 0) & (uv[:, 0] <= W) & (uv[:, 1] >= 0) & (uv[:, 1] <= H)).any()
    return None if inside else f"puts the model outside the {W}x{H} field of view"
