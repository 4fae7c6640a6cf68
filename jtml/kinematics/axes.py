"""Anatomical axes files: a 4×4 rigid transform from an implant's STL frame to its anatomical frame.

Format (plain text, what ``numpy.savetxt(path, A)`` writes): lines starting with ``#`` are
comments, blank lines are skipped, then exactly four rows of four numbers separated by whitespace
and/or commas — the homogeneous matrix ``A`` with ``p_anatomical = A · p_stl`` (mm)::

    # femur: STL -> anatomical frame (x anterior-posterior, y proximal, z medial)
    0.9986  0.0523  0  -1.5
   -0.0523  0.9986  0   2.0
    0       0       1   0
    0       0       0   1

``A`` must be rigid: its 3×3 block a rotation (orthonormal within 1e-6, determinant +1, no
mirror) and its last row ``0 0 0 1``. The anatomical frame follows the lab's implant axes
(``process-knee-data``, ``process.py`` line 19): x anterior–posterior (posterior + for a right
knee; a left knee is the x → −x mirror, anterior +), y proximal +, z medial +. Without a file an
implant's anatomical frame is its STL frame (``A = I``).
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import numpy as np

from jtml.errors import JTMLError
from jtml.io.atomic import atomic_write

__all__ = ["check_rigid", "read_axes", "write_axes"]

_SPLIT = re.compile(r"[,\s]+")
RIGID_TOL = 1e-6


def check_rigid(A: np.ndarray, what: str = "transform", path: str | os.PathLike | None = None) -> np.ndarray:
    """``A`` as a float64 4×4 after checking it is a proper rigid transform; else :class:`JTMLError`."""
    A = np.asarray(A, dtype=np.float64)
    if A.shape != (4, 4):
        raise JTMLError(f"{what} must be a 4x4 matrix, got shape {A.shape}", path)
    if not np.isfinite(A).all():
        raise JTMLError(f"{what} has NaN or infinite entries", path)
    if np.abs(A[3] - [0.0, 0.0, 0.0, 1.0]).max() > 1e-9:
        raise JTMLError(f"{what}: last row must be 0 0 0 1, got {' '.join(f'{v:g}' for v in A[3])}", path)
    R = A[:3, :3]
    err = float(np.abs(R.T @ R - np.eye(3)).max())
    if err > RIGID_TOL:
        raise JTMLError(
            f"{what}: the 3x3 block is not a rotation (|RᵀR − I| = {err:.2g} > {RIGID_TOL:g})", path
        )
    if np.linalg.det(R) < 0:
        raise JTMLError(f"{what}: the 3x3 block is a mirror (determinant −1); give a proper rotation", path)
    return A


def read_axes(path: str | os.PathLike) -> np.ndarray:
    """Read an anatomical axes file (format above) into a checked float64 4×4."""
    path = Path(path)
    if not path.is_file():
        raise JTMLError("axes file not found", path)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise JTMLError(f"cannot read axes file: {e}", path) from e
    rows: list[list[float]] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        tokens = [t for t in _SPLIT.split(line) if t]
        if len(tokens) != 4:
            raise JTMLError(f"line {lineno}: expected 4 numbers (a row of the 4x4), got {len(tokens)}", path)
        try:
            values = [float(t) for t in tokens]
        except ValueError:
            raise JTMLError(f"line {lineno}: non-numeric value in {line!r}", path) from None
        if not all(math.isfinite(v) for v in values):
            raise JTMLError(f"line {lineno}: NaN or infinite value in {line!r}", path)
        rows.append(values)
    if len(rows) != 4:
        raise JTMLError(f"expected 4 rows of 4 numbers (STL -> anatomical 4x4), got {len(rows)} row(s)", path)
    return check_rigid(np.array(rows), "axes", path)


def write_axes(path: str | os.PathLike, A: np.ndarray, comment: str | None = None) -> None:
    """Write a checked 4×4 as an axes file (``repr`` floats, so it reads back exactly)."""
    A = check_rigid(A, "axes", path)
    lines = [f"# {line}" for line in (comment or "").splitlines()]
    lines += ["# STL -> anatomical frame: p_anatomical = A @ p_stl (mm)"]
    lines += ["  ".join(repr(float(v)) for v in row) for row in A]
    with atomic_write(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
