"""JointTrack ``JT_INTCALIB`` camera calibration files.

Line 1 ``JT_INTCALIB``, then one number per line: principal distance ``pd`` (mm), principal
point offsets ``xo`` and ``yo`` (mm) and pixel size ``pp`` (mm/pixel).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from jtml.errors import JTMLError
from jtml.io.atomic import atomic_write

HEADER = "JT_INTCALIB"
FIELDS = ("pd", "xo", "yo", "pp")


@dataclass(frozen=True)
class Calibration:
    """Intrinsic calibration of a single-plane fluoroscope (all in mm)."""

    pd: float
    xo: float = 0.0
    yo: float = 0.0
    pp: float = 1.0

    def __post_init__(self) -> None:
        for name in FIELDS:
            if not math.isfinite(getattr(self, name)):
                raise JTMLError(f"calibration {name} must be finite, got {getattr(self, name)}")
        if self.pd <= 0:
            raise JTMLError(f"principal distance must be positive, got {self.pd}")
        if self.pp <= 0:
            raise JTMLError(f"pixel size must be positive, got {self.pp}")


def read_calibration(path: str | os.PathLike) -> Calibration:
    """Read a ``JT_INTCALIB`` file; every problem is a :class:`JTMLError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise JTMLError("calibration file not found", path)
    try:
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8", errors="replace").splitlines()]
    except OSError as e:
        raise JTMLError(f"cannot read calibration: {e}", path) from e
    lines = [ln for ln in lines if ln]
    if not lines or lines[0] != HEADER:
        got = lines[0][:40] if lines else "an empty file"
        raise JTMLError(f"not a JointTrack calibration: expected header {HEADER!r}, got {got!r}", path)
    if len(lines) < 1 + len(FIELDS):
        raise JTMLError(
            f"calibration has {len(lines) - 1} value line(s); expected {len(FIELDS)} ({', '.join(FIELDS)})",
            path,
        )
    values = []
    for i, (name, text) in enumerate(zip(FIELDS, lines[1:], strict=False), start=2):
        try:
            values.append(float(text.split()[0]))
        except ValueError:
            raise JTMLError(f"line {i} ({name}) is not a number: {text!r}", path) from None
    try:
        return Calibration(*values)
    except JTMLError as e:
        raise JTMLError(e.message, path) from None


def write_calibration(path: str | os.PathLike, calib: Calibration) -> None:
    """Write a ``JT_INTCALIB`` file (``repr`` floats, so reading it back is exact)."""
    with atomic_write(path) as tmp:
        tmp.write_text(HEADER + "\n" + "".join(f"{getattr(calib, f)!r}\n" for f in FIELDS))
