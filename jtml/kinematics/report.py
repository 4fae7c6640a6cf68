"""Kinematics to files: ``kinematics.csv`` (one row per frame), PNG plots of every curve, and a
short text summary. :func:`write_report` writes them all into a folder at once (staged: a failure
leaves the folder as it was).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from jtml.errors import JTMLError
from jtml.io.atomic import atomic_write, staged_dir
from jtml.kinematics.joint import CONDYLE_COLUMNS, FLEXION, GAP_COLUMNS, GS_COLUMNS, LAB_COLUMNS

if TYPE_CHECKING:
    from pytorch_lightning.loggers import Logger

__all__ = ["CSV_NAME", "PLOT_NAMES", "log_kinematics", "summary", "write_csv", "write_plots", "write_report"]

CSV_NAME = "kinematics.csv"
# plot file -> (title, columns); a plot whose columns are all absent is not drawn.
_PLOTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "rotations.png": ("Tibia relative to femur: 312 angles (process-knee-data)", LAB_COLUMNS[:3]),
    "translations.png": ("Femoral origin in the tibial frame (process-knee-data)", LAB_COLUMNS[3:]),
    "grood_suntay.png": ("Grood & Suntay joint coordinate system", GS_COLUMNS),
    "condyles.png": ("Lowest condylar points in the tibial frame", CONDYLE_COLUMNS + GAP_COLUMNS),
}
PLOT_NAMES = tuple(_PLOTS)


def _columns(table: Mapping[str, np.ndarray]) -> tuple[int, dict[str, np.ndarray]]:
    cols = {k: np.asarray(v, dtype=np.float64).reshape(-1) for k, v in table.items()}
    lengths = {len(v) for v in cols.values()}
    if len(lengths) != 1:
        raise JTMLError(f"kinematics columns differ in length: {sorted(lengths)}")
    for name in cols:
        if "," in name or "\n" in name:
            raise JTMLError(f"column name {name!r} cannot go in a CSV header")
    return lengths.pop(), cols


def _fmt(v: float) -> str:
    return "" if math.isnan(v) else f"{v:.6f}"


def write_csv(path: str | os.PathLike, table: Mapping[str, np.ndarray]) -> None:
    """One row per frame: ``frame`` (0-based, the pose files' row order), then the columns in
    order; a gap (NaN) is an empty field. Six decimals (degrees, mm)."""
    n, cols = _columns(table)
    lines = [",".join(["frame", *cols])]
    lines += [",".join([str(i), *(_fmt(float(v[i])) for v in cols.values())]) for i in range(n)]
    with atomic_write(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")


def write_plots(folder: str | os.PathLike, table: Mapping[str, np.ndarray]) -> list[Path]:
    """PNGs of every curve against frame (and the condyles' AP also against flexion) into
    ``folder``; returns the files. Matplotlib's Agg canvas through :class:`Figure` (no pyplot, so a
    notebook's backend is left alone). Gaps are breaks in the lines, never bridged."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    n, cols = _columns(table)
    frames = np.arange(n)
    written = []
    for name, (title, wanted) in _PLOTS.items():
        present = [c for c in wanted if c in cols]
        if not present:
            continue
        if name == "condyles.png":
            panels = [
                (f"{axis} vs frame", [c for c in present if f"_{axis}_mm" in c], None)
                for axis in ("ap", "si", "ml", "gap")
            ]
            if FLEXION in cols:
                panels.append(("ap vs flexion", [c for c in present if "_ap_" in c], FLEXION))
            panels = [p for p in panels if p[1]]
        else:
            panels = [(c, [c], None) for c in present]
        ncols = 3 if len(panels) > 4 else len(panels)
        nrows = math.ceil(len(panels) / ncols)
        fig = Figure(figsize=(4.0 * ncols, 3.0 * nrows + 0.5), layout="constrained")
        axes = fig.subplots(nrows, ncols, squeeze=False).reshape(-1)
        marker = "o" if n <= 60 else None
        for ax, (label, curves, against) in zip(axes, panels, strict=False):
            x = frames if against is None else cols[against]
            for c in curves:
                ax.plot(x, cols[c], marker=marker, markersize=3, label=c if len(curves) > 1 else None)
            ax.set_xlabel("frame" if against is None else against)
            if against is None:
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylabel(curves[0] if len(curves) == 1 else label.split(" ")[0] + " (mm)")
            ax.grid(alpha=0.3)
            if len(curves) > 1:
                ax.legend(fontsize=7, frameon=False)
        for ax in axes[len(panels) :]:
            ax.set_visible(False)
        fig.suptitle(title, fontsize=10)
        path = Path(folder) / name
        fig.savefig(path, dpi=100)
        written.append(path)
    return written


def summary(table: Mapping[str, np.ndarray], per_frame: int = 8) -> str:
    """A text table: each column's min, mean and max over the frames that have a value, the gap
    count, and every frame's value when there are at most ``per_frame`` frames."""
    n, cols = _columns(table)
    width = max(len(c) for c in cols)
    show = n <= per_frame
    head = f"{'column':<{width}}  {'min':>9} {'mean':>9} {'max':>9}"
    head += "".join(f" {f'frame {i}':>9}" for i in range(n)) if show else ""
    lines = [head]
    for name, v in cols.items():
        ok = v[np.isfinite(v)]
        stats = (ok.min(), ok.mean(), ok.max()) if len(ok) else (np.nan,) * 3
        row = f"{name:<{width}}  " + " ".join(f"{s:>9.2f}" for s in stats)
        if show:
            row += "".join(f" {x:>9.2f}" for x in v)
        lines.append(row)
    gaps = int(sum(not np.isfinite([v[i] for v in cols.values()]).all() for i in range(n)))
    lines.append(f"{n} frame(s), {gaps} with gaps (missing poses)")
    return "\n".join(lines)


def write_report(out: str | os.PathLike, table: Mapping[str, np.ndarray]) -> list[Path]:
    """``out/kinematics.csv`` and the plots, all or nothing (:func:`~jtml.io.staged_dir`); a plot
    of an earlier report that this one does not draw is removed. Returns the files written."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise JTMLError("output path exists and is not a folder", out)
    _columns(table)
    with staged_dir(out) as stage:
        write_csv(stage / CSV_NAME, table)
        names = [CSV_NAME] + [p.name for p in write_plots(stage, table)]
    for stale in set(PLOT_NAMES) - set(names):
        (out / stale).unlink(missing_ok=True)
    return [out / name for name in names]


def log_kinematics(
    logger: Logger,
    table: Mapping[str, np.ndarray],
    prefix: str = "kinematics",
    plots: list[Path] | tuple[Path, ...] = (),
) -> int:
    """The curves into a Lightning logger (W&B): every column as the metric ``prefix/column``, one
    point per frame at step = frame, so W&B draws the same curves as the plots (a gap is no point,
    never bridged); the PNG ``plots`` as images under ``prefix/plots``. Returns the points logged.
    The logger's own rank rule applies (Lightning logs from rank zero only)."""
    n, cols = _columns(table)
    points = 0
    for i in range(n):
        row = {f"{prefix}/{k}": float(v[i]) for k, v in cols.items() if math.isfinite(v[i])}
        if row:
            logger.log_metrics(row, step=i)
            points += len(row)
    log_image = getattr(logger, "log_image", None)
    if plots and log_image is not None:
        log_image(f"{prefix}/plots", images=[str(p) for p in plots], caption=[Path(p).stem for p in plots])
    return points
