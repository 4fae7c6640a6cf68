"""Pose data: per-part ROIs around each implant's silhouette, with the pose and camera that label them.

Every sample is ONE part in ONE frame. A square region of interest (ROI) is cut around the part's
silhouette (from its mask: the mask is the ROI source for every input kind, so frame input needs
masks too — the ground-truth labels in training, a segmentation network's masks in use), resampled
to ``roi_size`` pixels (area filter, so a binary mask becomes a soft, sub-pixel-accurate one) and
returned with the ROI's place in the frame and the frame's camera. The network's targets are made
from these in :mod:`jtml.models.pose`; nothing here depends on the network.

Sample dict (collated by the default collate): ``roi_mask`` and/or ``roi_image`` float32
``(1, R, R)`` (by ``input``: mask, frame or both), ``roi`` float64 ``(3,)`` = ROI centre ``(u, v)``
and side in frame pixels (continuous coordinates, pixel ``(c, r)`` centred at ``(c+½, r+½)``),
``roi_bbox`` float32 ``(4,)`` = the silhouette's bounding box at native resolution in ROI units
(left, top, right, bottom; exact where the resampled ROI blurs it), ``camera`` float64 ``(6,)`` =
``pd, xo, yo, pp, width, height`` of the frame, ``pose`` float64 ``(6,)``
(NaN when unknown), ``part`` int (index into ``parts``), ``valid`` bool (False: empty mask, no ROI),
``study``, ``frame`` (str), ``frame_pos`` (row of the frame in its study's pose file), ``n_frames``.

Sources. Files: an ``index`` CSV, ``studies`` folders or a ``synthetic`` study (generated on first
use by :func:`jtml.data.synth.generate_study`), split like :class:`FluoroSegDataModule`. Renders
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

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import pytorch_lightning as pl
import torch
import trimesh
from torch.utils.data import Dataset

from jtml.data.index import SPLITS, IndexRow
from jtml.data.loaders import EpochSeeded, SplitLoaders
from jtml.data.sources import IndexedRows
from jtml.data.transforms import build_transforms
from jtml.errors import JTMLError
from jtml.geometry import Camera, euler312_to_matrix, matrix_to_pose, project_mesh, rasterize_triangles
from jtml.io import read_calibration, read_image, read_mask, read_stl

__all__ = [
    "INPUTS",
    "FluoroPoseDataModule",
    "PoseFileDataset",
    "PoseSampler",
    "RenderedPoseDataset",
    "check_pose_consistent",
    "crop_roi",
    "in_plane_rotation_matrix",
    "mask_bbox",
    "make_sample",
    "roi_box",
    "rotate_pose_in_plane",
]

Input = Literal["mask", "frame", "both"]
INPUTS = ("mask", "frame", "both")
REFERENCE_SIZE = 1024  # the frame size calibrations describe (as in jtml.data.synth)
MAX_ATTEMPTS = 200  # pose samples before deciding pose_ranges cannot fit the field of view
STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}


# ------------------------------------------------------------------------------------------------
# Geometry of the ROI and of the in-plane rotation
# ------------------------------------------------------------------------------------------------


def camera_vector(camera: Camera) -> np.ndarray:
    """A camera as the ``(6,)`` float64 ``pd, xo, yo, pp, width, height`` the batches carry."""
    return np.array(
        [camera.pd, camera.xo, camera.yo, camera.pp, camera.width, camera.height], dtype=np.float64
    )


def mask_bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """``(col0, row0, col1, row1)`` (ends exclusive) of the pixels ``> 0.5``; None for an empty mask."""
    fg = np.asarray(mask) > 0.5
    rows, cols = np.flatnonzero(fg.any(axis=1)), np.flatnonzero(fg.any(axis=0))
    if rows.size == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def roi_box(
    bbox: tuple[int, int, int, int],
    margin: float,
    rng: np.random.Generator | None = None,
    jitter: Sequence[float] = (0.0, 0.0),
) -> tuple[int, int, int]:
    """Integer square ROI ``(x0, y0, side)`` around a silhouette bbox.

    ``side = round(max(w, h) · (1 + margin))``, centred on the bbox; ``jitter = (shift, scale)``
    with ``rng`` moves the centre by ``U(−shift, shift)·side`` per axis and scales the side by
    ``exp(U(−scale, scale))``. Integer boxes make the crop an exact pixel copy.
    """
    c0, r0, c1, r1 = bbox
    side = max(c1 - c0, r1 - r0) * (1.0 + margin)
    cu, cv = (c0 + c1) / 2.0, (r0 + r1) / 2.0
    shift, scale = float(jitter[0]), float(jitter[1])
    if rng is not None and (shift > 0 or scale > 0):
        side *= math.exp(rng.uniform(-scale, scale)) if scale > 0 else 1.0
        if shift > 0:
            cu += rng.uniform(-shift, shift) * side
            cv += rng.uniform(-shift, shift) * side
    side_i = max(8, int(round(side)))
    return int(round(cu - side_i / 2.0)), int(round(cv - side_i / 2.0)), side_i


def crop_roi(
    image: np.ndarray,
    box: tuple[int, int, int, int] | tuple[int, int, int],
    size: int,
    replicate: bool = False,
) -> np.ndarray:
    """The ``(x0, y0, side)`` window of ``image`` (zero- or edge-padded outside it) as float32
    ``size × size``: area filter when shrinking (a binary mask becomes a soft one), linear when
    enlarging."""
    x0, y0, side = box[:3]
    M = np.array([[1.0, 0.0, -x0], [0.0, 1.0, -y0]])
    border = cv2.BORDER_REPLICATE if replicate else cv2.BORDER_CONSTANT
    src = image.astype(np.float32) if image.dtype not in (np.float32,) else image
    win = cv2.warpAffine(src, M, (side, side), flags=cv2.INTER_NEAREST, borderMode=border, borderValue=0)
    if side == size:
        return win
    interp = cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
    return cv2.resize(win, (size, size), interpolation=interp)


def in_plane_rotation_matrix(camera: Camera, degrees: float) -> np.ndarray:
    """The 2×3 OpenCV warp that turns a frame by ``degrees`` about the principal point, matching
    :func:`rotate_pose_in_plane` (OpenCV puts pixel centres at integers, hence the −½)."""
    u0, v0 = camera.principal_point
    return cv2.getRotationMatrix2D((u0 - 0.5, v0 - 0.5), float(degrees), 1.0)


def rotate_pose_in_plane(pose: np.ndarray, degrees: float) -> np.ndarray:
    """The pose seen by a camera rolled by ``−degrees`` about its optical axis: ``R' = Rz·R``,
    ``t' = Rz·t`` — whose image is the original image turned by ``degrees`` about the principal
    point (:func:`in_plane_rotation_matrix`)."""
    pose = np.asarray(pose, dtype=np.float64)
    Rz = euler312_to_matrix(np.array([degrees, 0.0, 0.0])).numpy()
    T = np.eye(4)
    T[:3, :3] = Rz @ euler312_to_matrix(pose[3:6]).numpy()
    T[:3, 3] = Rz @ pose[:3]
    return matrix_to_pose(torch.from_numpy(T)).numpy()


def make_sample(
    mask: np.ndarray,
    camera: Camera,
    roi_size: int,
    margin: float,
    input: Input = "mask",
    frame: np.ndarray | None = None,
    invert: bool = False,
    rng: np.random.Generator | None = None,
    jitter: Sequence[float] = (0.0, 0.0),
    bbox: tuple[int, int, int, int] | None = None,
    offset: tuple[int, int] = (0, 0),
    pixel_transform: Any = None,
) -> dict[str, Any]:
    """The network input of one part: ROI tensors, the ROI box and the camera (no pose).

    ``mask`` may be a window of the frame whose top-left pixel is ``offset`` (renders); ``bbox``
    (frame coordinates) saves recomputing it. An empty mask gives ``valid: False`` and zero ROIs.
    """
    box_bbox = bbox
    if box_bbox is None:
        b = mask_bbox(mask)
        box_bbox = (
            None if b is None else (b[0] + offset[0], b[1] + offset[1], b[2] + offset[0], b[3] + offset[1])
        )
    out: dict[str, Any] = {"camera": torch.from_numpy(camera_vector(camera))}
    if box_bbox is None:
        out["valid"] = False
        out["roi"] = torch.tensor(
            [camera.width / 2, camera.height / 2, float(camera.width)], dtype=torch.float64
        )
        if input in ("mask", "both"):
            out["roi_mask"] = torch.zeros(1, roi_size, roi_size)
        if input in ("frame", "both"):
            out["roi_image"] = torch.zeros(1, roi_size, roi_size)
        out["roi_bbox"] = torch.zeros(4)
        return out
    x0, y0, side = roi_box(box_bbox, margin, rng, jitter)
    out["valid"] = True
    out["roi"] = torch.tensor([x0 + side / 2.0, y0 + side / 2.0, float(side)], dtype=torch.float64)
    c0, r0, c1, r1 = box_bbox
    out["roi_bbox"] = torch.tensor([c0 - x0, r0 - y0, c1 - x0, r1 - y0], dtype=torch.float32) / side
    if input in ("mask", "both"):
        m = crop_roi(mask, (x0 - offset[0], y0 - offset[1], side), roi_size)
        out["roi_mask"] = torch.from_numpy(np.clip(m, 0.0, 1.0))[None]
    if input in ("frame", "both"):
        if frame is None:
            raise JTMLError(f"input {input!r} needs the frame, got none")
        img = frame
        maxval = float(np.iinfo(img.dtype).max) if img.dtype.kind in "ui" else 1.0
        if invert:
            img = (maxval - img.astype(np.float64)).astype(img.dtype) if img.dtype.kind in "ui" else 1.0 - img
        roi = crop_roi(img, (x0, y0, side), roi_size, replicate=True)
        if pixel_transform is not None:
            roi = pixel_transform(image=np.clip(roi / np.float32(maxval), 0.0, 1.0).astype(np.float32))[
                "image"
            ]
        lo, hi = float(roi.min()), float(roi.max())
        roi = (roi - lo) / np.float32(hi - lo) if hi > lo else np.zeros_like(roi)
        out["roi_image"] = torch.from_numpy(np.ascontiguousarray(roi, dtype=np.float32))[None]
    return out


def check_pose_consistent(transform: Any, where: str = "train_transforms") -> None:
    """Refuse any transform that is not pixel-level: spatial ones change the silhouette without a pose."""
    import albumentations as A

    def walk(t: Any) -> None:
        if isinstance(t, A.BaseCompose):
            for child in t.transforms:
                walk(child)
        elif not isinstance(t, A.ImageOnlyTransform):
            raise JTMLError(
                f"{where}: {type(t).__name__} is not pose-consistent for pose data: it moves pixels, so the "
                "silhouette would no longer match its pose (a flip mirrors the implant, elastic/shear/affine "
                "warps are no rigid motion, a crop moves the principal point). Use rotation_range (exact "
                "in-plane rotation) and roi_jitter (exact ROI shift/scale) instead; only pixel-level "
                "transforms (noise, blur, gamma, contrast, …) are allowed here"
            )

    if transform is not None:
        walk(transform)


# ------------------------------------------------------------------------------------------------
# Pose sampling for renders
# ------------------------------------------------------------------------------------------------

_INDEPENDENT_DEFAULT = {"z_rot": (-180.0, 180.0), "x_rot": (-15.0, 15.0), "y_rot": (-15.0, 15.0)}


def _pair(value: Any, name: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise JTMLError(f"pose_ranges: {name} must be a [low, high] pair, got {value!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
        raise JTMLError(f"pose_ranges: {name} must be finite with low <= high, got {value!r}")
    return lo, hi


class PoseSampler:
    """Random poses of each part that keep its model inside the field of view.

    ``pose_ranges``:

    - ``{sampler: knee}`` (default): :func:`jtml.data.synth.sample_knee`, the synthetic studies'
      realistic joint — flexion 0–120°, near-lateral view, ±10° out-of-plane tilt, depth 0.8–0.95
      of the principal distance, both implants inside a random circular collimator. Needs the parts
      ``fem``/``tib`` (the other one's model is the procedural one when not given).
    - ``{sampler: independent, depth: [0.8, 0.95], margin: 0.03, <part>: {z_rot: [lo, hi], x_rot:
      […], y_rot: […]}}``: each part on its own, angles uniform in the given ranges (degrees;
      defaults ±180, ±15, ±15), ``|z|`` uniform in ``depth`` × principal distance, placed uniformly
      where its whole model stays ``margin`` × width inside the frame.
    """

    def __init__(
        self, ranges: dict[str, Any] | None, meshes: dict[str, trimesh.Trimesh], camera: Camera
    ) -> None:
        ranges = dict(ranges or {})
        self.kind = str(ranges.pop("sampler", "knee"))
        self.camera = camera
        self.vertices = {
            p: np.unique(np.asarray(m.vertices, dtype=np.float64), axis=0) for p, m in meshes.items()
        }
        if self.kind == "knee":
            if ranges:
                raise JTMLError(f"pose_ranges: the knee sampler takes no other keys, got {sorted(ranges)}")
            from jtml.data.synth import KneeGeometry

            if not {"fem", "tib"} <= set(meshes):
                raise JTMLError("pose_ranges: the knee sampler needs fem and tib models")
            self.geom = KneeGeometry.from_models(meshes["fem"], meshes["tib"])
        elif self.kind == "independent":
            self.depth = _pair(ranges.pop("depth", (0.8, 0.95)), "depth")
            if self.depth[0] <= 0:
                raise JTMLError(
                    f"pose_ranges: depth {list(self.depth)} must be > 0 (|z| as a fraction of the principal "
                    "distance): depth <= 0 puts the model at or behind the X-ray source"
                )
            self.margin = float(ranges.pop("margin", 0.03))
            self.angles: dict[str, dict[str, tuple[float, float]]] = {}
            for part in meshes:
                spec = dict(ranges.pop(part, None) or {})
                unknown = sorted(set(spec) - set(_INDEPENDENT_DEFAULT))
                if unknown:
                    raise JTMLError(f"pose_ranges.{part}: unknown key(s) {unknown}; use z_rot, x_rot, y_rot")
                self.angles[part] = {
                    k: _pair(spec.get(k, d), f"{part}.{k}") for k, d in _INDEPENDENT_DEFAULT.items()
                }
            if ranges:
                raise JTMLError(
                    f"pose_ranges: unknown key(s) {sorted(ranges)}; expected sampler, depth, margin "
                    f"and parts {sorted(meshes)}"
                )
        else:
            raise JTMLError(f"pose_ranges: sampler must be 'knee' or 'independent', got {self.kind!r}")

    def _knee(self, rng: np.random.Generator) -> dict[str, np.ndarray] | None:
        from jtml.data.synth import sample_knee

        W, H = self.camera.width, self.camera.height
        circle = (
            W / 2 + rng.normal(0.0, 0.01) * W,
            H / 2 + rng.normal(0.0, 0.01) * H,
            rng.uniform(0.44, 0.53) * W,
        )
        knee = sample_knee(rng, self.geom, self.vertices, self.camera, circle, max(2.0, 0.03 * W))
        return None if knee is None else {"fem": knee.fem, "tib": knee.tib}

    def _independent(self, rng: np.random.Generator, part: str) -> np.ndarray | None:
        cam = self.camera
        angles = np.array([rng.uniform(*self.angles[part][k]) for k in ("z_rot", "x_rot", "y_rot")])
        R = euler312_to_matrix(angles).numpy()
        V = self.vertices[part]
        centre = (V.min(0) + V.max(0)) / 2
        depth = rng.uniform(*self.depth) * cam.pd
        t = np.array([0.0, 0.0, -depth]) - R @ centre
        P = V @ R.T + t
        f = cam.focal_px
        du, dv = -f * P[:, 0] / P[:, 2], f * P[:, 1] / P[:, 2]  # offsets from the principal point
        u0, v0 = cam.principal_point
        m = self.margin * cam.width
        lo_u, hi_u = m - (u0 + du.min()), cam.width - m - (u0 + du.max())
        lo_v, hi_v = m - (v0 + dv.min()), cam.height - m - (v0 + dv.max())
        if lo_u > hi_u or lo_v > hi_v:
            return None
        su, sv = rng.uniform(lo_u, hi_u), rng.uniform(lo_v, hi_v)
        # An image-plane shift (su, sv) at the model's depth, to first order; then checked exactly.
        k = depth / f
        pose = np.array([t[0] + su * k, t[1] - sv * k, t[2], *angles])
        uv = project_mesh(V, pose, cam)
        inside = (uv[:, 0] >= m).all() and (uv[:, 0] <= cam.width - m).all()
        inside = inside and (uv[:, 1] >= m).all() and (uv[:, 1] <= cam.height - m).all()
        return pose if inside else None

    def __call__(self, rng: np.random.Generator, part: str) -> np.ndarray:
        """One pose row of ``part``; JTMLError when the ranges cannot fit the field of view."""
        for _ in range(MAX_ATTEMPTS):
            if self.kind == "knee":
                poses = self._knee(rng)
                pose = None if poses is None else poses[part]
            else:
                pose = self._independent(rng, part)
            if pose is not None:
                return pose
        raise JTMLError(
            f"pose_ranges cannot place the {part} model inside the {self.camera.width}x{self.camera.height} "
            f"field of view after {MAX_ATTEMPTS} tries: is the model in mm, the calibration right, and the "
            "depth range realistic?"
        )


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
    ) -> None:
        self.sampler, self.parts, self.camera = sampler, list(parts), camera
        self.vertices = {p: np.asarray(meshes[p].vertices, dtype=np.float64) for p in self.parts}
        self.faces = {p: np.asarray(meshes[p].faces, dtype=np.int64) for p in self.parts}
        self.length, self.roi_size, self.margin = int(length), int(roi_size), float(margin)
        self.jitter, self.rotation_range = tuple(jitter), float(rotation_range)
        self.seed, self.cache = seed, cache and seed is not None
        self._cache: dict[int, dict[str, Any]] = {}

    def __len__(self) -> int:
        return self.length

    def render_window(self, part: str, pose: np.ndarray) -> tuple[np.ndarray, int, int]:
        """The silhouette inside the bounding window of the projected model: ``(mask, x0, y0)``.

        Shifting pixel coordinates by the integer window offset leaves every pixel-centre test
        unchanged, so the window equals the full frame's render there, pixel for pixel."""
        cam = self.camera
        uv = project_mesh(self.vertices[part], pose, cam)
        x0 = int(np.clip(np.floor(uv[:, 0].min()) - 1, 0, cam.width))
        x1 = int(np.clip(np.ceil(uv[:, 0].max()) + 1, 0, cam.width))
        y0 = int(np.clip(np.floor(uv[:, 1].min()) - 1, 0, cam.height))
        y1 = int(np.clip(np.ceil(uv[:, 1].max()) + 1, 0, cam.height))
        tri = uv[self.faces[part]] - np.array([x0, y0], dtype=np.float64)
        return rasterize_triangles(tri, max(y1 - y0, 0), max(x1 - x0, 0)), x0, y0

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index in self._cache:
            return self._cache[index]
        rng = np.random.default_rng([self.seed, index]) if self.seed is not None else _torch_rng()
        part_idx = index % len(self.parts)
        part = self.parts[part_idx]
        for _ in range(MAX_ATTEMPTS):
            pose = self.sampler(rng, part)
            if self.rotation_range > 0:
                pose = rotate_pose_in_plane(pose, rng.uniform(-self.rotation_range, self.rotation_range))
            win, x0, y0 = self.render_window(part, pose)
            if win.any():
                break
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
    ) -> None:
        self.items, self.input = list(items), input
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


class FluoroPoseDataModule(IndexedRows, SplitLoaders, pl.LightningDataModule):
    """Per-part pose samples for Lightning (module docstring: sample layout, sources, augmentation).

    Args:
        parts: part names; sample ``part`` indices follow this order (the model's must match).
        input: ``mask`` (silhouette only: the JTML-app contract), ``frame`` or ``both`` (channels
            frame, mask). Every kind takes its ROI from the mask.
        index, studies, synthetic: file sources as for ``FluoroSegDataModule`` (``synthetic``: the
            arguments of :func:`~jtml.data.synth.generate_study`, generated on first use).
        render: train/validate on renders of ``models`` (mask input only); files are then the
            test/predict sets (all their frames).
        models: STL per part for renders and for the mTRE metric (None: the procedural implants
            for renders; the index's model column for files).
        calibration: ``JT_INTCALIB`` of the ``image_size``² frames the renders imitate (as a study's
            ``calibration.txt`` describes its frames); None = the lab's fluoroscope (pd 1198 mm,
            0.373 mm pixels at 1024², the same field of view at other sizes).
        image_size: the rendered frames' size; ROIs are cut at this native resolution.
        pose_ranges: see :class:`PoseSampler`.
        train_samples, val_samples, test_samples: renders per training epoch / in the fixed
            validation and (without files) test sets; ``render_seed`` seeds the fixed sets.
        roi_size, roi_margin: network input size and the ROI's margin around the silhouette
            (``side = max(w, h)·(1 + margin)``).
        roi_jitter: ``[shift, scale]`` training jitter of the ROI (exact; see the module docstring).
        rotation_range: training in-plane rotation in degrees, ± (exact).
        train_transforms: pixel-level albumentations list for frames (spatial ones are refused).
        invert: frames ``max − value`` (implants bright) before the ROI is normalised (min–max).
        predict_split: rows that predict covers (files mode); ``all`` writes complete pose files.
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
        super().__init__()
        self.save_hyperparameters()
        if input not in INPUTS:
            raise JTMLError(f"input must be one of {INPUTS}, got {input!r}")
        if not parts or len(set(parts)) != len(parts):
            raise JTMLError(f"parts must be distinct and non-empty, got {parts}")
        if not render and index is None and not studies and not synthetic:
            raise JTMLError("no data: give an index CSV, study folders, a synthetic study or render: true")
        if render and input != "mask":
            raise JTMLError(
                f"render: true renders silhouettes, so it needs input: mask (got {input!r}); frame input "
                "trains on studies (e.g. a synthetic one)"
            )
        if batch_size < 1 or num_workers < 0:
            raise JTMLError(f"batch_size must be >= 1 and num_workers >= 0 (got {batch_size}, {num_workers})")
        if int(roi_size) < 16 or roi_margin < 0:
            raise JTMLError(f"roi_size must be >= 16 and roi_margin >= 0 (got {roi_size}, {roi_margin})")
        if len(roi_jitter) != 2 or min(roi_jitter) < 0:
            raise JTMLError(f"roi_jitter must be [shift, scale] >= 0, got {roi_jitter}")
        if rotation_range < 0 or min(train_samples, val_samples, test_samples) < 1:
            raise JTMLError("rotation_range must be >= 0 and the sample counts >= 1")
        self.parts, self.input = list(parts), input
        self._init_sources(index, studies, synthetic)
        self.render = bool(render)
        self.models = {str(k): str(v) for k, v in (models or {}).items()}
        self.image_size = int(image_size)
        self.roi_size, self.roi_margin = int(roi_size), float(roi_margin)
        self.roi_jitter = (float(roi_jitter[0]), float(roi_jitter[1]))
        self.rotation_range = float(rotation_range)
        self.invert = bool(invert)
        self.batch_size, self.num_workers = int(batch_size), int(num_workers)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        self.persistent_workers = bool(persistent_workers) and self.num_workers > 0
        self.val_fraction, self.test_fraction = float(val_fraction), float(test_fraction)
        self.split_seed, self.split_by, self.predict_split = int(split_seed), split_by, predict_split
        self.train_transform = build_transforms(train_transforms, where="train_transforms")
        check_pose_consistent(self.train_transform)
        if self.train_transform is not None and input == "mask":
            raise JTMLError("train_transforms act on frames; input: mask takes none (use roi_jitter)")
        # Read everything renders need now, so a missing file fails before any training starts.
        self._meshes: dict[str, trimesh.Trimesh] | None = None
        self.camera: Camera | None = None
        self.sampler: PoseSampler | None = None
        if self.render:
            from jtml.data.synth import default_calibration

            calib = (
                default_calibration(self.image_size) if calibration is None else read_calibration(calibration)
            )
            self.camera = Camera.from_calibration(calib, self.image_size, self.image_size)
            self.sampler = PoseSampler(pose_ranges, self.meshes(), self.camera)
            if self.sampler.kind == "knee" and not set(self.parts) <= {"fem", "tib"}:
                raise JTMLError(
                    f"pose_ranges: the knee sampler poses fem and tib only, not {self.parts}; use "
                    "{sampler: independent} for other parts"
                )
        elif pose_ranges is not None:
            raise JTMLError("pose_ranges only applies to render: true")
        self.rows: list[IndexRow] | None = None
        self._items: dict[str, list[PoseItem]] = {}
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None
        self.test_dataset: Dataset | None = None
        self.predict_dataset: Dataset | None = None

    # ---------------------------------------------------------------- models and vertices

    def meshes(self) -> dict[str, trimesh.Trimesh]:
        """The render models by part: ``models`` where given, else the procedural implants."""
        if self._meshes is None:
            from jtml.data.implants import procedural_models

            meshes = dict(procedural_models())
            for part, path in self.models.items():
                meshes[part] = read_stl(path)
            missing = [p for p in self.parts if p not in meshes]
            if missing and self.render:
                raise JTMLError(f"no model for part(s) {missing}: give models: {{{missing[0]}: PATH.stl}}")
            self._meshes = meshes
        return self._meshes

    def part_vertices(self) -> dict[str, np.ndarray]:
        """Model vertices per part for the mTRE metric: the render models, ``models``, or the one
        model file the index lists for the part (a part listed with several models gets none)."""
        if self.render:
            return {p: np.asarray(self.meshes()[p].vertices, dtype=np.float64) for p in self.parts}
        out = {
            p: np.asarray(read_stl(self.models[p]).vertices, dtype=np.float64)
            for p in self.parts
            if p in self.models
        }
        if self.index is not None or self.studies:
            rows = self._load_rows()
            for p in self.parts:
                paths = {r.models.get(p) for r in rows} - {None}
                if p not in out and len(paths) == 1:
                    out[p] = np.asarray(read_stl(next(iter(paths))).vertices, dtype=np.float64)
        return out

    # ---------------------------------------------------------------- files

    @property
    def has_files(self) -> bool:
        return self.index is not None or bool(self.studies)

    @property
    def source(self) -> str:
        return self.index if self.index is not None else ", ".join(self.studies) or "renders"

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
        if problems:
            shown = "\n  ".join(problems[:50])
            more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
            raise JTMLError(
                f"{len(problems)} problem(s) with the files it lists:\n  {shown}{more}", self.source
            )
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
        )

    def _files(self, split: str, train: bool = False, need_pose: bool = True) -> PoseFileDataset:
        items = self.items(split, need_pose)
        if not items:
            counts = Counter(r.split for r in self._load_rows())
            shown = ", ".join(f"{s} {counts.get(s, 0)}" for s in SPLITS)
            raise JTMLError(f"the {split} split is empty ({shown})", self.source)
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
