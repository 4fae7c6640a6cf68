"""The data a run read, fingerprinted: per-file sha256 digests and one digest over them all
(``jtml reproduce`` says whether the data changed since)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from jtml.io import atomic_write
from jtml.io.hashing import file_sha256
from jtml.runs.records import RUN_RECORD

# -- data fingerprint -----------------------------------------------------------------------------


DATA_FILES = "data_files.sha256"  # per-file digests of a run's data, in `sha256sum` format


def data_file_digests(datamodule: Any) -> list[tuple[str, str]] | None:
    """``(sha256, path)`` of the index CSV (if any) and of every frame, calibration and mask the
    datamodule lists (``datamodule.rows``), in row order (``"-"`` for a listed file that is gone).
    Cached on the datamodule."""
    cached = getattr(datamodule, "_jtml_digests", None)
    if cached is not None:
        return cached
    rows = getattr(datamodule, "rows", None)
    if rows is None and hasattr(datamodule, "_load_rows"):
        try:
            rows = datamodule._load_rows()
        except Exception:  # noqa: BLE001 - no fingerprint rather than a failed run
            rows = None
    if not rows:
        return None
    out: list[tuple[str, str]] = []
    index = getattr(datamodule, "index", None)
    if index and Path(index).is_file():
        out.append((file_sha256(Path(index)), str(index)))
    for row in rows:
        for path in [row.image, row.calibration, *(row.masks[k] for k in sorted(row.masks))]:
            if path is not None:
                out.append((file_sha256(Path(path)) if Path(path).is_file() else "-", str(path)))
    try:
        datamodule._jtml_digests = out
    except AttributeError:
        pass
    return out


def data_fingerprint(datamodule: Any) -> dict[str, Any] | None:
    """sha256 over the digests of :func:`data_file_digests`, in order. Paths are not hashed, so the
    same data in another folder has the same fingerprint."""
    digests = data_file_digests(datamodule)
    if not digests:
        return None
    index = getattr(datamodule, "index", None)
    index_sha = digests[0][0] if index and Path(index).is_file() else None
    files = digests[1:] if index_sha else digests
    total = hashlib.sha256((index_sha or "").encode())
    rows = datamodule.rows
    listed = iter(files)
    for row in rows:  # "-" for a file the row does not list, as before: old fingerprints stay comparable
        for path in [row.image, row.calibration, *(row.masks[k] for k in sorted(row.masks))]:
            total.update((next(listed)[0] if path is not None else "-").encode())
    return {"sha256": total.hexdigest(), "index_sha256": index_sha, "frames": len(rows), "files": len(files)}


def write_data_digests(digests: list[tuple[str, str]], path: Path) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text("".join(f"{d}  {p}\n" for d, p in digests))


def read_data_digests(path: Path) -> list[str] | None:
    """The digests of a ``data_files.sha256`` file, in order (None when it does not exist)."""
    if not path.is_file():
        return None
    return [ln.split("  ", 1)[0] for ln in path.read_text().splitlines() if ln.strip()]


def compare_data(original: Path, new: Path) -> str:
    """``same`` or ``DIFFERENT (n files changed)`` between two run directories' data."""
    a, b = read_data_digests(original / DATA_FILES), read_data_digests(new / DATA_FILES)
    if a is None or b is None:
        ra, rb = (_record_fingerprint(d) for d in (original, new))
        if ra is None or rb is None:
            return "unknown (not recorded)"
        return "same" if ra == rb else "DIFFERENT (per-file digests not recorded)"
    changed = sum(x != y for x, y in zip(a, b, strict=False)) + abs(len(a) - len(b))
    return "same" if changed == 0 else f"DIFFERENT ({changed} file{'s' * (changed != 1)} changed)"


def _record_fingerprint(run_dir: Path) -> str | None:
    try:
        return (json.loads((run_dir / RUN_RECORD).read_text()).get("data_fingerprint") or {}).get("sha256")
    except (OSError, ValueError):
        return None
