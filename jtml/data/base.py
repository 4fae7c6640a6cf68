"""``FluoroDataModule``: what the segmentation and pose DataModules share.

Where their frames come from: ``index`` (a CSV written by ``jtml index``), ``studies`` (indexed
in memory, split like ``jtml index``: by study, or by frame when there is a single study) or
``synthetic`` (e.g. ``{out: data/synthetic/demo, frames: 48, seed: 1, size: 256}``, the arguments
of :func:`jtml.sim.synth.generate_study`), generated into ``out`` in ``prepare_data`` when ``out``
holds no frames yet; ``out`` is then one of the studies (alone, or appended to ``studies``).

An index the user names must exist: it is their data, so it is never generated or written here
(a typo in its path is an error, not a new synthetic study). Given an index, the experiment's
``synthetic`` study is not used; generating one is announced on stderr.

Also shared: the checks and storage of the batching and split arguments, :data:`STAGE_SPLITS`,
the empty-split error and the loaders (:class:`~jtml.data.loaders.SplitLoaders`).
"""

from __future__ import annotations

import inspect
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import Dataset

from jtml.data.index import SPLITS, IndexRow, build_index, read_index, summarize_split
from jtml.data.loaders import SplitLoaders
from jtml.errors import JTMLError
from jtml.io import list_images

__all__ = ["PREDICT_SPLITS", "STAGE_SPLITS", "FluoroDataModule"]

# The splits each Lightning stage reads (any other stage: fit's).
STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}
PREDICT_SPLITS = (*SPLITS, "all")


class FluoroDataModule(SplitLoaders, pl.LightningDataModule):
    """Index rows from an index CSV, study folders or a synthetic study, split into
    train/val/test, and the DataLoaders over a subclass's ``{train,val,test,predict}_dataset``.

    Subclasses keep their own explicit ``__init__`` (LightningCLI reads its signature for the YAML
    keys and ``--help``) and pass the shared arguments here by keyword.
    ``pin_memory=None``: on when CUDA is available. ``split_by=None``: by study, or by frame for a
    single study. ``persistent_workers`` only applies with ``num_workers > 0``.
    """

    def __init__(
        self,
        *,
        parts: Sequence[str],
        index: str | None,
        studies: Sequence[str] | None,
        synthetic: dict[str, Any] | None,
        batch_size: int,
        num_workers: int,
        pin_memory: bool | None,
        persistent_workers: bool,
        val_fraction: float,
        test_fraction: float,
        split_seed: int,
        split_by: str | None,
        predict_split: str,
    ) -> None:
        super().__init__()
        if not parts or len(set(parts)) != len(parts):
            raise JTMLError(f"parts must be distinct and non-empty, got {parts}")
        if batch_size < 1 or num_workers < 0:
            raise JTMLError(f"batch_size must be >= 1 and num_workers >= 0 (got {batch_size}, {num_workers})")
        if predict_split not in PREDICT_SPLITS:
            raise JTMLError(f"predict_split must be one of {PREDICT_SPLITS}, got {predict_split!r}")
        self._init_sources(index, studies, synthetic)
        self.parts = list(parts)
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        self.persistent_workers = bool(persistent_workers) and self.num_workers > 0
        self.val_fraction, self.test_fraction = float(val_fraction), float(test_fraction)
        self.split_seed = int(split_seed)
        self.split_by = split_by
        self.predict_split = predict_split
        self.rows: list[IndexRow] | None = None  # loaded once, on first use
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None
        self.test_dataset: Dataset | None = None
        self.predict_dataset: Dataset | None = None

    # ---------------------------------------------------------------- sources

    def _init_sources(
        self, index: str | None, studies: Sequence[str] | None, synthetic: dict[str, Any] | None
    ) -> None:
        """Set ``index``, ``studies`` and ``synthetic`` (its ``out`` folder becomes one of the studies)."""
        if index is not None and studies:
            raise JTMLError("give either an index CSV or study folders, not both")
        if synthetic is not None and "out" not in synthetic:
            raise JTMLError(f"synthetic needs an 'out' folder, got {synthetic}")
        if index is not None and not Path(index).is_file():
            raise JTMLError("index CSV not found (write one with `jtml index`)", index)
        if index is not None and synthetic:
            print(
                f"jtml: reading the index {index}; the experiment's synthetic study is not used",
                file=sys.stderr,
            )
            synthetic = None
        self.index = None if index is None else str(index)
        self.studies = [str(s) for s in studies or []]
        self.synthetic = dict(synthetic) if synthetic else None
        if self.synthetic:
            out = Path(self.synthetic["out"])
            if not any(Path(s).resolve() == out.resolve() for s in self.studies):
                self.studies.append(str(out))

    @property
    def source(self) -> str:
        """What error messages name: the index CSV, the study folders, or ``renders`` (none)."""
        return self.index if self.index is not None else ", ".join(self.studies) or "renders"

    def _synthetic_missing(self) -> bool:
        if not self.synthetic:
            return False
        out = Path(self.synthetic["out"])
        return not out.is_dir() or not list_images(out)

    def prepare_data(self) -> None:
        """Generate the synthetic study on first use; rank 0 only."""
        if self._synthetic_missing():
            from jtml.sim.synth import generate_study  # lazy: synth is optional for real data

            kwargs = {k: v for k, v in self.synthetic.items() if k != "out"}
            try:
                inspect.signature(generate_study).bind(Path(self.synthetic["out"]), **kwargs)
            except TypeError as e:
                raise JTMLError(f"synthetic: {e} (arguments of generate_study: {kwargs})") from None
            print(
                f"jtml: generating the synthetic study {self.synthetic['out']} (first use)", file=sys.stderr
            )
            generate_study(Path(self.synthetic["out"]), **kwargs)

    # ---------------------------------------------------------------- rows and splits

    def _build_rows(self, studies: list[str]) -> list[IndexRow]:
        """Split like ``jtml index``, warning on stderr (once) when the split misses the request."""
        split_by = self.split_by or ("study" if len(studies) > 1 else "frame")
        rows = build_index(studies, self.val_fraction, self.test_fraction, self.split_seed, split_by)
        warning = summarize_split(rows, self.val_fraction, self.test_fraction, split_by).warning()
        if warning and self.rows is None:
            print(f"jtml: {self.source}: {warning}", file=sys.stderr)
        return rows

    def _load_rows(self) -> list[IndexRow]:
        if self.rows is None:
            if self._synthetic_missing():
                self.prepare_data()  # setup without a Trainer (scripts, notebooks)
            if self.index is not None:
                rows = read_index(self.index, self.parts)
            else:
                rows = self._build_rows(self.studies)
                known = sorted({p for r in rows for p in (*r.masks, *r.poses, *r.models)})
                unknown = [p for p in self.parts if p not in known]
                if unknown and known:  # frames alone (known == []): what they lack is checked per use
                    raise JTMLError(f"unknown part(s) {unknown}: the studies have parts {known}", self.source)
            self.rows = rows
        return self.rows

    def split_rows(self, split: str) -> list[IndexRow]:
        """The rows of ``split`` (``"all"``: every row), in index order."""
        rows = self._load_rows()
        return list(rows) if split == "all" else [r for r in rows if r.split == split]

    def empty_split_error(self, split: str, needed_by: str | None = None) -> JTMLError:
        """The error for a split with nothing in it, with every split's frame count (what to fix)."""
        counts = Counter(r.split for r in self._load_rows())
        shown = ", ".join(f"{s} {counts.get(s, 0)}" for s in SPLITS)
        need = f"; {needed_by} needs it" if needed_by else ""
        return JTMLError(f"the {split} split is empty ({shown}){need}", self.source)
