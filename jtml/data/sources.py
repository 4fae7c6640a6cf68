"""Where a DataModule's frames come from: an index CSV, study folders, or a synthetic study
generated on first use — resolved to :class:`~jtml.data.index.IndexRow`\\ s, one per frame.

An index the user names must exist: it is their data, so it is never generated or written
here (a typo in its path is an error, not a new synthetic study). Given an index, the
experiment's ``synthetic`` study is not used; generating one is announced on stderr.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path
from typing import Any

from jtml.data.index import IndexRow, build_index, read_index, summarize_split
from jtml.errors import JTMLError
from jtml.io import list_images

__all__ = ["IndexedRows"]


class IndexedRows:
    """Mixin for a LightningDataModule with ``index``, ``studies``, ``synthetic``, ``parts``,
    ``split_by``, ``val_fraction``, ``test_fraction``, ``split_seed`` and ``rows`` (None until
    loaded): generates the synthetic study in ``prepare_data`` and loads the rows once."""

    index: str | None
    studies: list[str]
    synthetic: dict[str, Any] | None
    parts: list[str]
    split_by: str | None
    val_fraction: float
    test_fraction: float
    split_seed: int
    rows: list[IndexRow] | None

    def _init_sources(self, index: str | None, studies: list[str] | None, synthetic: dict | None) -> None:
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

    def _split_by(self, studies: list[str]) -> str:
        return self.split_by or ("study" if len(studies) > 1 else "frame")

    def _build_rows(self, studies: list[str]) -> list[IndexRow]:
        """Split like ``jtml index``, warning on stderr (once) when the split misses the request."""
        split_by = self._split_by(studies)
        rows = build_index(studies, self.val_fraction, self.test_fraction, self.split_seed, split_by)
        warning = summarize_split(rows, self.val_fraction, self.test_fraction, split_by).warning()
        if warning and self.rows is None:
            print(f"jtml: {self.source}: {warning}", file=sys.stderr)
        return rows

    def _synthetic_missing(self) -> bool:
        if not self.synthetic:
            return False
        out = Path(self.synthetic["out"])
        return not out.is_dir() or not list_images(out)

    def prepare_data(self) -> None:
        """Generate the synthetic study on first use; rank 0 only."""
        if self._synthetic_missing():
            from jtml.data.synth import generate_study  # lazy: synth is optional for real data

            kwargs = {k: v for k, v in self.synthetic.items() if k != "out"}
            try:
                inspect.signature(generate_study).bind(Path(self.synthetic["out"]), **kwargs)
            except TypeError as e:
                raise JTMLError(f"synthetic: {e} (arguments of generate_study: {kwargs})") from None
            print(
                f"jtml: generating the synthetic study {self.synthetic['out']} (first use)", file=sys.stderr
            )
            generate_study(Path(self.synthetic["out"]), **kwargs)

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
