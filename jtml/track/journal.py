"""What makes a killed ``jtml track`` resumable: a study's finished frames, kept under ``OUT/.partial``.

Layout (one per study output folder)::

    OUT/.partial/journal.jsonl                           header line, then one line per finished frame
    OUT/.partial/masks/<part>/<frame>_label_<part>.tif   the predicted masks of the finished frames

The header holds the run's *fingerprint* (a digest of everything a frame's result depends on:
frames, calibration, models, checkpoints or given masks, start files, registration settings), so
a journal is only ever continued by the same computation. A frame's masks are written (atomically,
then fsynced) before its line; each line is appended, flushed and fsynced, so a SIGKILL or a
node failure at any moment leaves at worst a torn last line, which :meth:`Journal.open` drops.
Records are checked on reading: forward frames ``0, 1, 2, …``, then (with a backward pass)
``N−2, N−3, …``; the first record out of that order, or whose masks are missing, ends the journal
there (the frames after it are tracked again).

JSON keeps floats exact (``repr``), so a resumed run continues from bit-identical poses.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from jtml.errors import JTMLError
from jtml.io.atomic import atomic_write

__all__ = ["JOURNAL_NAME", "PARTIAL_NAME", "Journal", "expected_frame", "mask_file"]

PARTIAL_NAME = ".partial"
JOURNAL_NAME = "journal.jsonl"
_FORMAT = "jtml-track-journal-1"

State = Literal["absent", "same", "other"]


def mask_file(folder: Path, part: str, stem: str) -> Path:
    """``folder/<part>/<stem>_label_<part>.tif``: the ``jtml labels`` layout."""
    return Path(folder) / part / f"{stem}_label_{part}.tif"


def expected_frame(k: int, n_frames: int) -> tuple[str, int]:
    """The ``k``-th record of a journal: ``(pass, frame)`` — forward ``0…N−1``, then backward
    ``N−2…0``."""
    if k < n_frames:
        return "forward", k
    return "backward", n_frames - 2 - (k - n_frames)


def fsync_file(path: Path) -> None:
    """Flush a file already written (and renamed into place) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Journal:
    """The finished frames of one study's track (module docstring)."""

    def __init__(self, out: str | os.PathLike, fingerprint: str, n_frames: int) -> None:
        self.folder = Path(out) / PARTIAL_NAME
        self.path = self.folder / JOURNAL_NAME
        self.masks = self.folder / "masks"
        self.fingerprint = str(fingerprint)
        self.n_frames = int(n_frames)
        self.records: list[dict[str, Any]] = []

    # -- reading -----------------------------------------------------------------------------------
    def _header(self) -> dict[str, Any] | None:
        try:
            with open(self.path, "rb") as f:
                first = f.readline()
            header = json.loads(first)
        except (OSError, ValueError):
            return None
        return header if isinstance(header, dict) and header.get("format") == _FORMAT else None

    def state(self) -> State:
        """``absent`` (no journal), ``same`` (this run's: it resumes) or ``other`` (another run's
        settings, or unreadable); reads only."""
        if not self.path.exists():
            return "absent"
        header = self._header()
        return "same" if header is not None and header.get("fingerprint") == self.fingerprint else "other"

    def open(
        self, restart: bool = False, check: Callable[[dict[str, Any]], bool] | None = None
    ) -> list[dict]:
        """The finished records, in order, ready for :meth:`append`. A journal of other settings is an
        error unless ``restart`` (then it is discarded). ``check(record)``: False ends the journal at
        that record (e.g. its masks are missing)."""
        state = self.state()
        if state == "other" and not restart:
            raise JTMLError(
                "holds an interrupted `jtml track` with other inputs or settings; run it with those, "
                "or pass --overwrite to start over",
                self.path,
            )
        if state != "same":
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder.mkdir(parents=True, exist_ok=True)
            header = {"format": _FORMAT, "fingerprint": self.fingerprint, "frames": self.n_frames}
            with atomic_write(self.path, fsync=True) as tmp:
                tmp.write_text(json.dumps(header) + "\n")
            self.records = []
            return []
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        good = len(lines[0]) + 1  # bytes of the header line and its newline
        records: list[dict[str, Any]] = []
        # the last element is what follows the last newline: empty, or a torn line
        for line in lines[1:-1]:
            try:
                record = json.loads(line)
            except ValueError:
                break
            if not isinstance(record, dict):
                break
            expected = expected_frame(len(records), self.n_frames)
            if (record.get("pass"), record.get("frame")) != expected or len(records) >= 2 * self.n_frames - 1:
                break
            if check is not None and not check(record):
                break
            records.append(record)
            good += len(line) + 1
        if good < len(data):  # drop the torn or rejected tail before appending after it
            with open(self.path, "rb+") as f:
                f.truncate(good)
                f.flush()
                os.fsync(f.fileno())
        self.records = records
        return list(records)

    # -- writing -----------------------------------------------------------------------------------
    def append(self, record: dict[str, Any]) -> None:
        """Add one finished frame: one line, flushed and fsynced before this returns."""
        expected = expected_frame(len(self.records), self.n_frames)
        if (record.get("pass"), record.get("frame")) != expected:
            raise JTMLError(
                f"journal record {record.get('pass')} {record.get('frame')} out of order", self.path
            )
        line = json.dumps(record, allow_nan=True) + "\n"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self.records.append(record)

    def remove(self) -> None:
        """The study is written: its partial results go."""
        shutil.rmtree(self.folder, ignore_errors=True)
