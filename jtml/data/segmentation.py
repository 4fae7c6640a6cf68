"""Segmentation data: :class:`FluoroSegDataset` (one frame and its part masks per index row) and
:class:`FluoroSegDataModule` (index CSV, study folders or a synthetic study → train/val/test/predict
DataLoaders; sources and splits as in :mod:`jtml.data.base`).

A sample goes frame → network size → (invert) → augment → normalise. Geometry comes first so
augmentation runs at the network size (cheap at 256², and the lab recipe, chosen for 1024² frames,
means ``image_size: 1024``). Normalisation comes last so intensity augmentations see the stored
value range (uint8 0–255, 16-bit frames as float 0–1).
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Sequence
from typing import Any, Literal

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from jtml.data.base import STAGE_SPLITS, FluoroDataModule
from jtml.data.index import SPLITS, IndexRow, validate_files
from jtml.data.loaders import EpochSeeded
from jtml.data.transforms import build_transforms
from jtml.errors import JTMLError
from jtml.io import read_calibration, read_image

ResizeMode = Literal["resize", "crop"]
Normalize = Literal["minmax", "meanstd", "none"]
RESIZE_MODES = ("resize", "crop")
NORMALIZE = ("minmax", "meanstd", "none")
# ImageNet's RGB mean/std averaged to one channel: the pretrained encoders' input statistics.
IMAGENET_GRAY_MEAN = 0.449
IMAGENET_GRAY_STD = 0.226


def rows_have_masks(rows: Sequence[IndexRow], parts: Sequence[str]) -> bool:
    """Whether every row lists a mask for every part."""
    return all(r.masks.get(p) is not None for r in rows for p in parts)


@functools.lru_cache(maxsize=1024)
def _pixel_size(path: str) -> float:
    return read_calibration(path).pp


def _pad_to(a: np.ndarray, h: int, w: int) -> np.ndarray:
    """Zero-pad (centred) to at least ``h × w``; the padding is background in frame and mask."""
    dh, dw = max(0, h - a.shape[0]), max(0, w - a.shape[1])
    if not dh and not dw:
        return a
    pad = [(dh // 2, dh - dh // 2), (dw // 2, dw - dw // 2)] + [(0, 0)] * (a.ndim - 2)
    return np.pad(a, pad)


class FluoroSegDataset(EpochSeeded, Dataset):
    """One sample per index row: a normalised frame, its part masks and its pixel size.

    ``__getitem__`` returns ``image`` float32 (1, S, S); ``mask`` float32 (P, S, S) in {0, 1}, one
    channel per part in ``parts`` order (absent when ``masks`` is False); ``pixel_size`` float32
    scalar (mm per network pixel); ``frame``, ``study`` (str) and ``index`` (int).

    - ``resize_mode="resize"``: non-square frames are zero-padded to square (keeps the geometry
      a uniform scale), then resized to ``image_size`` (area when shrinking); ``pixel_size`` =
      calibration pixel size × original size / ``image_size``. ``"crop"``: an ``image_size``
      window at native resolution (centred, or random with ``random_crop``; zero-padded when the
      frame is smaller); ``pixel_size`` is the calibration's.
    - ``invert``: ``max − value``. Frames on disk show implants dark; the JointTrack app feeds
      its network 0–255 with implants WHITE, so ``invert: true`` matches what it sees.
    - ``normalize``: ``"minmax"`` per frame to [0, 1] (independent of bit depth and exposure);
      ``"meanstd"``: value / dtype max, then ``(x − mean) / std`` (default ImageNet gray, for
      pretrained encoders); ``"none"``: stored values as float (0–255 or 0–65535, like the app).
    - ``masks``: None reads masks when every row lists one for every part (a predict set
      without labels gets no ``mask`` key); True requires them.
    """

    def __init__(
        self,
        rows: Sequence[IndexRow],
        parts: Sequence[str],
        image_size: int,
        resize_mode: ResizeMode = "resize",
        normalize: Normalize = "minmax",
        invert: bool = False,
        transform: Any | None = None,
        mean: float = IMAGENET_GRAY_MEAN,
        std: float = IMAGENET_GRAY_STD,
        masks: bool | None = None,
        random_crop: bool = False,
    ) -> None:
        if resize_mode not in RESIZE_MODES:
            raise JTMLError(f"resize_mode must be one of {RESIZE_MODES}, got {resize_mode!r}")
        if normalize not in NORMALIZE:
            raise JTMLError(f"normalize must be one of {NORMALIZE}, got {normalize!r}")
        if int(image_size) < 8:
            raise JTMLError(f"image_size must be at least 8, got {image_size}")
        if std <= 0:
            raise JTMLError(f"std must be positive, got {std}")
        self.rows = list(rows)
        self.parts = list(parts)
        self.image_size = int(image_size)
        self.resize_mode = resize_mode
        self.normalize = normalize
        self.invert = bool(invert)
        self.transform = transform
        self.mean = float(mean)
        self.std = float(std)
        self.random_crop = bool(random_crop)
        have_all = rows_have_masks(self.rows, self.parts)
        self.masks = have_all if masks is None else bool(masks)
        if self.masks and not have_all:
            missing = next((r, p) for r in self.rows for p in self.parts if r.masks.get(p) is None)
            raise JTMLError(f"frame {missing[0].frame} lists no {missing[1]} mask", missing[0].image)

    def __len__(self) -> int:
        return len(self.rows)

    def _geometry(
        self, img: np.ndarray, mask: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray | None, float]:
        s = self.image_size
        if self.resize_mode == "crop":
            img = _pad_to(img, s, s)
            mask = None if mask is None else _pad_to(mask, s, s)
            h, w = img.shape[:2]
            if self.random_crop:
                self._reseed()  # the epoch's stream (EpochSeeded), like the augmentation's
                y, x = (int(v) for v in self.rng.integers(0, (h - s + 1, w - s + 1)))
            else:
                y, x = (h - s) // 2, (w - s) // 2
            img = img[y : y + s, x : x + s]
            mask = None if mask is None else mask[y : y + s, x : x + s]
            return np.ascontiguousarray(img), None if mask is None else np.ascontiguousarray(mask), 1.0
        side = max(img.shape[:2])
        img = _pad_to(img, side, side)
        mask = None if mask is None else _pad_to(mask, side, side)
        if side != s:
            # Area when shrinking (no aliasing), linear when enlarging; masks go through the
            # same filter and are thresholded at half their range afterwards.
            interp = cv2.INTER_AREA if side > s else cv2.INTER_LINEAR
            img = cv2.resize(img, (s, s), interpolation=interp)
            if mask is not None:
                mask = cv2.resize(mask, (s, s), interpolation=interp).reshape(s, s, -1)
        return img, mask, side / s

    def _affine(self, img: np.ndarray, maxval: float) -> tuple[float, float]:
        """``(a, b)`` with ``a · value + b`` the normalised intensity (one pass over the pixels)."""
        unit = 255.0 if img.dtype == np.uint8 else 1.0  # augmented values: uint8, or float in [0, 1]
        if self.normalize == "minmax":
            lo, hi = cv2.minMaxLoc(img)[:2]
            return (1.0 / (hi - lo), -lo / (hi - lo)) if hi > lo else (0.0, 0.0)
        if self.normalize == "meanstd":
            return 1.0 / (unit * self.std), -self.mean / self.std
        return maxval / unit, 0.0

    def prepare(
        self, img: np.ndarray, mask: np.ndarray | None = None, augment: bool = False
    ) -> tuple[torch.Tensor, np.ndarray | None, float]:
        """A frame as the network sees it: ``(image (1, S, S) float32, mask (S, S, P) {0, 1} or None,
        frame pixels per network pixel)``. Geometry, inversion, the ``transform`` (with ``augment``)
        and normalisation, in that order; also what :class:`jtml.api.Segmenter` feeds the network."""
        if img.ndim != 2 or img.dtype.kind not in "ui":
            raise JTMLError(f"a frame must be a 2-D unsigned-integer image, got {img.dtype} {img.shape}")
        img, mask, scale = self._geometry(img, mask)
        if mask is not None:  # {0, 255} (or area-averaged) -> {0, 1}: a 0.5 threshold
            mask = (mask > 127).view(np.uint8)
        maxval = float(np.iinfo(img.dtype).max)
        if self.invert:
            img = np.invert(img)  # max - value for unsigned integers
        if img.dtype != np.uint8:  # albumentations handles uint8 and float32 in [0, 1]
            img = img.astype(np.float32) / np.float32(maxval)
        if augment and self.transform is not None:
            self._reseed()
            out = self.transform(image=img, mask=mask) if mask is not None else self.transform(image=img)
            img, mask = out["image"], out.get("mask")
        a, b = self._affine(img, maxval)
        x = np.multiply(img, np.float32(a), dtype=np.float32)
        x += np.float32(b)
        return torch.from_numpy(x).reshape(1, *x.shape[:2]), mask, scale

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.rows[index]
        img = read_image(row.image)
        mask = None
        if self.masks:
            # Masks were validated (size, binary) once by the DataModule's setup; a plain decode
            # is enough here and keeps the loader fast.
            chans = [read_image(row.masks[p]) for p in self.parts]
            for p, m in zip(self.parts, chans, strict=True):
                if m.shape != img.shape:
                    raise JTMLError(
                        f"{p} mask size {m.shape} differs from its frame's {img.shape}", row.masks[p]
                    )
            mask = np.stack(chans, axis=-1)
        x, mask, scale = self.prepare(img, mask, augment=True)
        sample: dict[str, Any] = {
            "image": x,
            # no calibration (a folder of frames): distances in mm are NaN, those in px are kept
            "pixel_size": torch.tensor(
                _pixel_size(str(row.calibration)) * scale if row.calibration else float("nan"),
                dtype=torch.float32,
            ),
            "frame": row.frame,
            "study": row.study,
            "index": int(index),
        }
        if mask is not None:
            mask = mask.reshape(*mask.shape[:2], -1)
            m = np.empty((mask.shape[2], *mask.shape[:2]), np.float32)
            for c in range(mask.shape[2]):
                np.greater(mask[..., c], 0, out=m[c])
            sample["mask"] = torch.from_numpy(m)
        return sample


class FluoroSegDataModule(FluoroDataModule):
    """Femoral/tibial implant segmentation data for Lightning (sources: :mod:`jtml.data.base`).

    Batches are dicts: ``image`` (B, 1, S, S) float32, ``mask`` (B, P, S, S) float32 {0, 1} with
    channels in ``parts`` order, ``pixel_size`` (B,) mm per network pixel, ``frame`` and
    ``study`` (lists of str), ``index`` (B,) int64 (position in that stage's dataset:
    ``dm.val_dataset.rows[i]`` is the row). Only the train set is augmented
    (``train_transforms``: ``"lab"``, ``"lab_exact"``, ``"none"`` or a list, see
    :mod:`jtml.data.transforms`; the lab recipe is scaled to ``image_size``). The files of the
    splits a stage needs are validated once, all problems reported in one error.
    ``predict_split`` picks the predict rows (``"all"`` for every row); predict needs no masks.
    Its default is ``test``: the held-out frames, whose predictions say how the model does on
    frames it never trained on (the pose DataModule's is ``all``, for complete pose files).
    """

    def __init__(
        self,
        index: str | None = None,
        studies: list[str] | None = None,
        parts: list[str] = ["fem", "tib"],  # noqa: B006  (copied below; a literal default reads well in --help)
        image_size: int = 1024,
        resize_mode: Literal["resize", "crop"] = "resize",
        normalize: Literal["minmax", "meanstd", "none"] = "minmax",
        mean: float = IMAGENET_GRAY_MEAN,
        std: float = IMAGENET_GRAY_STD,
        invert: bool = False,
        train_transforms: str | list[dict[str, Any] | str] | None = "lab",
        batch_size: int = 4,
        num_workers: int = 2,
        pin_memory: bool | None = None,
        persistent_workers: bool = True,
        val_fraction: float = 0.2,
        test_fraction: float = 0.1,
        split_seed: int = 0,
        split_by: Literal["study", "frame"] | None = None,
        predict_split: Literal["train", "val", "test", "all"] = "test",
        synthetic: dict[str, Any] | None = None,
    ) -> None:
        """``pin_memory=None``: on when CUDA is available. ``split_by=None``: by study, or by frame
        for a single study. ``persistent_workers`` only applies with ``num_workers > 0``."""
        if index is None and not studies and not synthetic:
            raise JTMLError("no data: give an index CSV, study folders or a synthetic study")
        if resize_mode not in RESIZE_MODES or normalize not in NORMALIZE:
            raise JTMLError(
                f"resize_mode must be one of {RESIZE_MODES} and normalize one of {NORMALIZE}, "
                f"got {resize_mode!r} and {normalize!r}"
            )
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
        self.image_size = int(image_size)
        self.resize_mode = resize_mode
        self.normalize = normalize
        self.mean, self.std = float(mean), float(std)
        self.invert = bool(invert)
        # Built now so a bad YAML list fails before any training starts.
        self.train_transform = build_transforms(
            train_transforms, image_size=self.image_size, where="train_transforms"
        )
        self._validated: dict[str, bool] = {}  # split -> its masks were checked too

    # ---------------------------------------------------------------- Lightning hooks

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets ``stage`` needs (None: train, val and, if any, test).

        Raises a :class:`JTMLError` when a needed split is empty, or listing every missing or
        mismatched file of the splits not validated before (each file is checked once).
        """
        rows = self._load_rows()
        counts = Counter(r.split for r in rows)
        if stage == "predict":
            splits = list(SPLITS) if self.predict_split == "all" else [self.predict_split]
            required, need_masks = ([] if self.predict_split == "all" else splits), False
        else:
            required = list(STAGE_SPLITS.get(stage, STAGE_SPLITS["fit"]))
            splits = required + (["test"] if stage is None and counts.get("test") else [])
            need_masks = True
        for split in required:
            if not counts.get(split):
                raise self.empty_split_error(split, needed_by=stage or "setup")
        todo = [s for s in splits if s not in self._validated or (need_masks and not self._validated[s])]
        if todo:
            # One pass over every file not yet checked, so all problems come out in one error.
            validate_files([r for r in rows if r.split in todo], self.parts, need_masks, self.source)
            self._validated.update({s: need_masks or self._validated.get(s, False) for s in todo})
        common: dict[str, Any] = dict(
            parts=self.parts,
            image_size=self.image_size,
            resize_mode=self.resize_mode,
            normalize=self.normalize,
            invert=self.invert,
            mean=self.mean,
            std=self.std,
        )
        if stage == "predict":
            self.predict_dataset = FluoroSegDataset(self.split_rows(self.predict_split), masks=None, **common)
            return
        if "train" in splits:
            self.train_dataset = FluoroSegDataset(
                self.split_rows("train"),
                transform=self.train_transform,
                masks=True,
                random_crop=True,
                **common,
            )
        if "val" in splits:
            self.val_dataset = FluoroSegDataset(self.split_rows("val"), masks=True, **common)
        if "test" in splits:
            self.test_dataset = FluoroSegDataset(self.split_rows("test"), masks=True, **common)
