"""``FluoroSegDataModule``: index CSV or study folders → train/val/test/predict DataLoaders.

Data come from ``index`` (a CSV written by ``jtml index``) or ``studies`` (indexed in memory,
split like ``jtml index``: by study, or by frame when there is a single study). ``synthetic``
(e.g. ``{out: data/synthetic/demo, frames: 48, seed: 1, size: 256}``, the arguments of
:func:`jtml.data.synth.generate_study`) generates a study into ``out`` in ``prepare_data`` when
``out`` holds no frames yet; ``out`` is then one of the studies (alone, or appended to
``studies``). Given an ``index`` (which must exist), ``synthetic`` is not used.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Literal

import pytorch_lightning as pl
import torch

from jtml.data.datasets import (
    IMAGENET_GRAY_MEAN,
    IMAGENET_GRAY_STD,
    NORMALIZE,
    RESIZE_MODES,
    FluoroSegDataset,
)
from jtml.data.index import SPLITS, IndexRow, validate_files
from jtml.data.loaders import SplitLoaders, UnpaddedDistributedSampler  # noqa: F401  (re-export)
from jtml.data.sources import IndexedRows
from jtml.data.transforms import build_transforms
from jtml.errors import JTMLError

STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}


class FluoroSegDataModule(IndexedRows, SplitLoaders, pl.LightningDataModule):
    """Femoral/tibial implant segmentation data for Lightning (see the module docstring for sources).

    Batches are dicts: ``image`` (B, 1, S, S) float32, ``mask`` (B, P, S, S) float32 {0, 1} with
    channels in ``parts`` order, ``pixel_size`` (B,) mm per network pixel, ``frame`` and
    ``study`` (lists of str), ``index`` (B,) int64 (position in that stage's dataset:
    ``dm.val_dataset.rows[i]`` is the row). Only the train set is augmented
    (``train_transforms``: ``"lab"``, ``"lab_exact"``, ``"none"`` or a list, see
    :mod:`jtml.data.transforms`; the lab recipe is scaled to ``image_size``). The files of the
    splits a stage needs are validated once, all problems reported in one error.
    ``predict_split`` picks the predict rows (``"all"`` for every row); predict needs no masks.
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
        super().__init__()
        self.save_hyperparameters()
        if index is None and not studies and not synthetic:
            raise JTMLError("no data: give an index CSV, study folders or a synthetic study")
        if not parts or len(set(parts)) != len(parts):
            raise JTMLError(f"parts must be distinct and non-empty, got {parts}")
        if batch_size < 1 or num_workers < 0:
            raise JTMLError(f"batch_size must be >= 1 and num_workers >= 0 (got {batch_size}, {num_workers})")
        if resize_mode not in RESIZE_MODES or normalize not in NORMALIZE:
            raise JTMLError(
                f"resize_mode must be one of {RESIZE_MODES} and normalize one of {NORMALIZE}, "
                f"got {resize_mode!r} and {normalize!r}"
            )
        if predict_split not in (*SPLITS, "all"):
            raise JTMLError(f"predict_split must be one of {(*SPLITS, 'all')}, got {predict_split!r}")
        self._init_sources(index, studies, synthetic)
        self.parts = list(parts)
        self.image_size = int(image_size)
        self.resize_mode = resize_mode
        self.normalize = normalize
        self.mean, self.std = float(mean), float(std)
        self.invert = bool(invert)
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        self.persistent_workers = bool(persistent_workers) and self.num_workers > 0
        self.val_fraction, self.test_fraction = float(val_fraction), float(test_fraction)
        self.split_seed = int(split_seed)
        self.split_by = split_by
        self.predict_split = predict_split
        # Built now so a bad YAML list fails before any training starts.
        self.train_transform = build_transforms(
            train_transforms, image_size=self.image_size, where="train_transforms"
        )
        self.rows: list[IndexRow] | None = None
        self._validated: dict[str, bool] = {}  # split -> its masks were checked too
        self.train_dataset: FluoroSegDataset | None = None
        self.val_dataset: FluoroSegDataset | None = None
        self.test_dataset: FluoroSegDataset | None = None
        self.predict_dataset: FluoroSegDataset | None = None

    # ---------------------------------------------------------------- data preparation

    @property
    def source(self) -> str:
        """What error messages name: the index CSV or the study folders."""
        return self.index if self.index is not None else ", ".join(self.studies)

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
                shown = ", ".join(f"{s} {counts.get(s, 0)}" for s in SPLITS)
                raise JTMLError(
                    f"the {split} split is empty ({shown}); {stage or 'setup'} needs it", self.source
                )
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
