"""JointTrack pose files: ``.jts`` (``JT_EULER_312``) and ``.jtak`` (``JTA_EULER_KINEMATICS``).

Line 1 is the header keyword, line 2 the column names, then one row per frame in file-name
order: ``x_tran, y_tran, z_tran`` (mm), ``z_rot, x_rot, y_rot`` (degrees, R = Rz·Rx·Ry).
Separators are commas and/or whitespace (tabs vary; the JTA app writes a trailing comma).
A ``NOT_OPTIMIZED`` row in a ``.jtak`` is a frame with no pose: it becomes a row of NaN so
frame alignment holds, never a dropped row.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import numpy as np

from jtml.errors import JTMLError
from jtml.io.atomic import atomic_write

POSE_COLUMNS = ("x_tran", "y_tran", "z_tran", "z_rot", "x_rot", "y_rot")
JTS_HEADER = "JT_EULER_312"
JTAK_HEADER = "JTA_EULER_KINEMATICS"
NOT_OPTIMIZED = "NOT_OPTIMIZED"
_SPLIT = re.compile(r"[,\s]+")


def read_poses(
    path: str | os.PathLike, n_frames: int | None = None, allow_missing: bool | None = None
) -> np.ndarray:
    """Read a ``.jts``/``.jtak`` file into an ``(N, 6)`` float64 array (NaN rows = not optimized).

    ``n_frames``: the number of frames the poses belong to; fewer rows is an error (more rows
    are an error too: the file would belong to another study). ``allow_missing`` defaults to
    True for ``.jtak`` files and False for ``.jts`` (a ``NOT_OPTIMIZED`` row there is an error).
    """
    path = Path(path)
    if not path.is_file():
        raise JTMLError("pose file not found", path)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise JTMLError(f"cannot read pose file: {e}", path) from e
    lines = [ln.strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln]
    if not lines or lines[0] not in (JTS_HEADER, JTAK_HEADER):
        got = lines[0][:40] if lines else "an empty file"
        raise JTMLError(
            f"not a JointTrack pose file: expected header {JTS_HEADER!r} or {JTAK_HEADER!r}, got {got!r}",
            path,
        )
    if allow_missing is None:
        allow_missing = lines[0] == JTAK_HEADER
    rows: list[list[float]] = []
    for lineno, line in enumerate(lines[2:], start=3):
        tokens = [t for t in _SPLIT.split(line) if t]
        if tokens and tokens[0] == NOT_OPTIMIZED:
            if not allow_missing:
                raise JTMLError(f"line {lineno}: NOT_OPTIMIZED row in a {lines[0]} file", path)
            rows.append([math.nan] * 6)
            continue
        if len(tokens) != 6:
            raise JTMLError(
                f"line {lineno}: expected 6 columns ({', '.join(POSE_COLUMNS)}), got {len(tokens)}", path
            )
        try:
            values = [float(t) for t in tokens]
        except ValueError:
            raise JTMLError(f"line {lineno}: non-numeric value in {line!r}", path) from None
        if not all(math.isfinite(v) for v in values):
            raise JTMLError(f"line {lineno}: NaN or infinite value in {line!r}", path)
        rows.append(values)
    poses = np.asarray(rows, dtype=np.float64).reshape(-1, 6)
    if n_frames is not None and len(poses) != n_frames:
        raise JTMLError(f"has {len(poses)} pose row(s) but the study has {n_frames} frame(s)", path)
    return poses


def _fmt(v: float) -> str:
    return repr(float(v))


def write_poses(path: str | os.PathLike, poses: np.ndarray) -> None:
    """Write ``(N, 6)`` poses; ``.jtak`` writes NaN rows as ``NOT_OPTIMIZED``, ``.jts`` refuses them.

    Values are written with ``repr`` so a round trip is exact.
    """
    path = Path(path)
    poses = np.asarray(poses, dtype=np.float64).reshape(-1, 6)
    jtak = path.suffix.lower() == ".jtak"
    missing = np.isnan(poses).any(axis=1)
    if not jtak and missing.any():
        raise JTMLError(f"{int(missing.sum())} frame(s) have no pose; .jts cannot store missing frames", path)
    if np.isinf(poses).any():
        raise JTMLError("poses contain infinite values", path)
    if jtak:
        out = [JTAK_HEADER, "\t\t".join(c.upper() for c in POSE_COLUMNS)]
        for row, miss in zip(poses, missing, strict=True):
            out.append(",\t".join([NOT_OPTIMIZED, "0", "0", "0", "0", "0"] if miss else map(_fmt, row)) + ",")
    else:
        out = [JTS_HEADER, ", ".join(f"{c:>16}" for c in POSE_COLUMNS)]
        out += [", ".join(f"{_fmt(v):>16}" for v in row) for row in poses]
    with atomic_write(path) as tmp:
        tmp.write_text("\n".join(out) + "\n")
