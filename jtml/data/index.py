"""The study index: one CSV row per frame, the single input every DataModule reads.

Columns: ``study, frame, split, image, calibration``, then per part ``mask_<part>``,
``pose_<part>`` (six space-separated numbers, JointTrack order; empty when untracked) and
``model_<part>`` (the part's STL). Paths below the CSV's folder are written relative to it (so
an index kept beside its data travels with it), others absolute; relative paths are resolved
against the CSV's folder when read.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from jtml.errors import JTMLError
from jtml.io.atomic import atomic_write
from jtml.io.study import load_study

SPLITS = ("train", "val", "test")
BASE_COLUMNS = ("study", "frame", "split", "image", "calibration")
SPLIT_BY = ("study", "frame")


@dataclass
class IndexRow:
    """One frame: its files and, per part, mask, pose and model (absolute paths)."""

    study: str
    frame: str
    split: str
    image: Path
    calibration: Path | None  # None: the frame's study has no calibration.txt
    masks: dict[str, Path | None] = field(default_factory=dict)
    poses: dict[str, np.ndarray | None] = field(default_factory=dict)
    models: dict[str, Path | None] = field(default_factory=dict)


def assign_splits(groups: Sequence[str], val: float, test: float, seed: int) -> dict[str, str]:
    """Split distinct group keys into train/val/test by a seeded shuffle.

    Each non-zero fraction gets at least one group when there are enough groups, so a small
    dataset never silently loses its validation split.
    """
    if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
        raise JTMLError(f"split fractions must satisfy 0 <= val, test and val + test < 1 (got {val}, {test})")
    keys = sorted(set(groups))
    order = np.random.default_rng(seed).permutation(len(keys))
    n = len(keys)
    n_test = math.floor(test * n + 0.5) if test > 0 else 0
    n_val = math.floor(val * n + 0.5) if val > 0 else 0
    if test > 0 and n_test == 0 and n >= 3:
        n_test = 1
    if val > 0 and n_val == 0 and n - n_test >= 2:
        n_val = 1
    out: dict[str, str] = {}
    for rank, i in enumerate(order):
        out[keys[i]] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    return out


def build_index(
    studies: Sequence[str | os.PathLike],
    val: float = 0.2,
    test: float = 0.1,
    seed: int = 0,
    split_by: str = "study",
) -> list[IndexRow]:
    """Index every frame of every study; split by study (subject) unless told otherwise."""
    if split_by not in SPLIT_BY:
        raise JTMLError(f"--split-by must be one of {SPLIT_BY}, got {split_by!r}")
    if not studies:
        raise JTMLError("no studies given")
    loaded = [load_study(s) for s in studies]
    names = [s.name for s in loaded]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise JTMLError(f"study folder names must be unique (they are the study ids): {sorted(dup)}")
    rows: list[IndexRow] = []
    for study in loaded:
        poses = {part: study.read_poses(part) for part in study.poses}
        for i, frame in enumerate(study.frames):
            rows.append(
                IndexRow(
                    study=study.name,
                    frame=frame.stem,
                    split="",
                    image=frame,
                    calibration=study.calibration,
                    masks={p: paths[i] for p, paths in study.labels.items()},
                    poses={p: v[i] for p, v in poses.items()},
                    models=dict(study.models),
                )
            )
    keys = [r.study if split_by == "study" else f"{r.study}/{r.frame}" for r in rows]
    split = assign_splits(keys, val, test, seed)
    for row, key in zip(rows, keys, strict=True):
        row.split = split[key]
    return rows


# A realised split fraction may miss the requested one by this much (of the frames) before
# `jtml index` warns; with n split units (studies, or frames) half a unit's share, 0.5 / n, is
# what rounding to whole units costs, so the tolerance is the larger of the two.
SPLIT_TOLERANCE = 0.05


@dataclass
class SplitSummary:
    """The split a :func:`build_index` call made, against the one it was asked for.

    Fractions are of frames (what a DataModule trains and validates on), so studies of unequal
    length count by their frames, not as one each.
    """

    split_by: str
    requested: dict[str, float]  # split -> requested fraction (train: 1 - val - test)
    frames: dict[str, dict[str, int]]  # split -> {study: frames in that split}, in index order
    units: int  # studies (split_by="study") or frames (split_by="frame") that were shuffled

    @property
    def total(self) -> int:
        return sum(sum(f.values()) for f in self.frames.values())

    def realised(self, split: str) -> float:
        return sum(self.frames[split].values()) / self.total if self.total else 0.0

    @property
    def tolerance(self) -> float:
        return max(SPLIT_TOLERANCE, 0.5 / self.units) if self.units else SPLIT_TOLERANCE

    def misses(self) -> list[str]:
        """The splits whose frame fraction is off the request by more than :attr:`tolerance`,
        or that were asked for (fraction > 0) and got no frame at all."""
        return [
            s
            for s in SPLITS
            if abs(self.realised(s) - self.requested[s]) > self.tolerance + 1e-9  # not on the boundary
            or (self.requested[s] > 0 and not self.frames[s])
        ]

    def lines(self, max_names: int = 20) -> list[str]:
        """Human-readable report: one line per split with its frames and (up to ``max_names``) studies."""
        studies = len({st for f in self.frames.values() for st in f})
        out = [f"split by {self.split_by}: {_count(self.total, 'frame')} from {_count(studies, 'study')}"]
        for s in SPLITS:
            counts = self.frames[s]
            names = [f"{st} ({n})" for st, n in counts.items()]
            if len(names) > max_names:
                names = [*names[:max_names], f"... {len(names) - max_names} more"]
            frames = _count(sum(counts.values()), "frame")
            share = f"{_pct(self.realised(s))}, asked {_pct(self.requested[s])}"
            studies_of = _count(len(counts), "study") + (": " + ", ".join(names) if names else "")
            out.append(f"  {s:<5} {frames:>11} ({share}) from {studies_of}")
        return out

    def warning(self) -> str | None:
        """One line when the split misses the request (see :meth:`misses`), else None."""
        missed = self.misses()
        if not missed:
            return None
        what = ", ".join(f"{s} {_pct(self.realised(s))} (asked {_pct(self.requested[s])})" for s in missed)
        return (
            f"warning: the split differs from the one asked for: {what} of the frames, tolerance "
            f"{_pct(self.tolerance)} ({_count(self.units, self.split_by)}, each in one split)"
        )


def _count(n: int, noun: str) -> str:
    plural = noun[:-1] + "ies" if noun.endswith("y") else noun + "s"
    return f"{n} {noun if n == 1 else plural}"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}".rstrip("0").rstrip(".") + "%"


def summarize_split(rows: Sequence[IndexRow], val: float, test: float, split_by: str) -> SplitSummary:
    """What :func:`build_index` made of a ``val``/``test`` request (see :class:`SplitSummary`)."""
    frames: dict[str, dict[str, int]] = {s: {} for s in SPLITS}
    for r in rows:
        frames[r.split][r.study] = frames[r.split].get(r.study, 0) + 1
    units = len({r.study for r in rows}) if split_by == "study" else len(rows)
    requested = {"train": 1.0 - val - test, "val": val, "test": test}
    return SplitSummary(split_by=split_by, requested=requested, frames=frames, units=units)


def _parts(rows: Sequence[IndexRow]) -> list[str]:
    return sorted({p for r in rows for p in (*r.masks, *r.poses, *r.models)})


def write_index(path: str | os.PathLike, rows: Sequence[IndexRow]) -> None:
    """Write the CSV atomically with paths relative to its folder."""
    path = Path(path)
    base = path.parent.resolve()
    parts = _parts(rows)

    def rel(p: Path | None) -> str:
        if p is None:
            return ""
        p = Path(p).resolve()
        return str(p.relative_to(base)) if p.is_relative_to(base) else str(p)

    columns = [*BASE_COLUMNS] + [f"{k}_{p}" for p in parts for k in ("mask", "pose", "model")]
    with atomic_write(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        for r in rows:
            rec = {"study": r.study, "frame": r.frame, "split": r.split, "image": rel(r.image)}
            rec["calibration"] = rel(r.calibration)
            for p in parts:
                pose = r.poses.get(p)
                rec[f"mask_{p}"] = rel(r.masks.get(p))
                rec[f"pose_{p}"] = "" if pose is None else " ".join(repr(float(v)) for v in pose)
                rec[f"model_{p}"] = rel(r.models.get(p))
            writer.writerow(rec)


def read_index(path: str | os.PathLike, parts: Sequence[str] | None = None) -> list[IndexRow]:
    """Read an index CSV; ``parts`` must each have a ``mask_<part>`` or ``pose_<part>`` column.

    Only the CSV itself is checked here; the files it names are checked by the DataModule's
    ``setup`` (all at once, see :func:`validate_files`).
    """
    path = Path(path)
    if not path.is_file():
        raise JTMLError("index CSV not found", path)
    base = path.parent
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        columns = reader.fieldnames or []
        missing = [c for c in BASE_COLUMNS if c not in columns]
        if missing:
            raise JTMLError(f"index is missing column(s) {missing}", path)
        known = sorted({c.split("_", 1)[1] for c in columns if c.startswith(("mask_", "pose_", "model_"))})
        if parts is not None:
            unknown = [p for p in parts if p not in known]
            if unknown:
                raise JTMLError(f"unknown part(s) {unknown}: the index has parts {known}", path)
        rows: list[IndexRow] = []
        for lineno, rec in enumerate(reader, start=2):
            if rec["split"] not in SPLITS:
                raise JTMLError(f"line {lineno}: split must be one of {SPLITS}, got {rec['split']!r}", path)

            def res(value: str | None) -> Path | None:
                return None if not value else (base / value)

            row = IndexRow(
                study=rec["study"],
                frame=rec["frame"],
                split=rec["split"],
                image=base / rec["image"],
                calibration=res(rec["calibration"]),
            )
            for p in known:
                row.masks[p] = res(rec.get(f"mask_{p}"))
                row.models[p] = res(rec.get(f"model_{p}"))
                text = rec.get(f"pose_{p}") or ""
                if text:
                    try:
                        pose = np.array([float(v) for v in text.split()], dtype=np.float64)
                    except ValueError:
                        raise JTMLError(f"line {lineno}: pose_{p} is not numeric: {text!r}", path) from None
                    if pose.shape != (6,) or not np.isfinite(pose).all():
                        raise JTMLError(f"line {lineno}: pose_{p} needs 6 finite numbers: {text!r}", path)
                    row.poses[p] = pose
                else:
                    row.poses[p] = None
            rows.append(row)
    if not rows:
        raise JTMLError("index has no rows", path)
    return rows


def validate_files(
    rows: Sequence[IndexRow], parts: Sequence[str], need_masks: bool, source: Path | str
) -> None:
    """Check every file an index names, reporting ALL problems in one error.

    Checks existence and, for masks, that each mask's size equals its frame's (header-only
    reads would be faster, but decoding once here catches corrupt files early too).
    """
    from jtml.io.images import read_image, read_mask

    problems: list[str] = []
    for r in rows:
        try:
            img = read_image(r.image)
        except JTMLError as e:
            problems.append(str(e))
            img = None
        if r.calibration is not None and not r.calibration.is_file():
            problems.append(f"{r.calibration}: calibration file not found")
        if need_masks:
            for p in parts:
                m = r.masks.get(p)
                if m is None:
                    problems.append(f"{r.image}: no {p} mask listed for this frame")
                    continue
                try:
                    read_mask(m, None if img is None else img.shape)
                except JTMLError as e:
                    problems.append(str(e))
    raise_problems(problems, source)


def raise_problems(problems: Sequence[str], source: Path | str) -> None:
    """Raise one :class:`JTMLError` listing every problem with the files ``source`` lists (the
    first 50, then how many more), so one run reports all there is to fix; none: return."""
    if problems:
        shown = "\n  ".join(problems[:50])
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        raise JTMLError(f"{len(problems)} problem(s) with the files it lists:\n  {shown}{more}", source)
