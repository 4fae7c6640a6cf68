"""``jtml score-poses``: score a pose file against the tracked (ground-truth) poses with PoseError.

Both files have one row per frame of the same study (file-name order), so they must have the same
number of rows: a differing count is an error (there is no safe way to pair the rows). Frames with
no pose in either file (``NOT_OPTIMIZED`` rows of a ``.jtak``) are excluded and listed — on stderr
for the table, under ``"excluded"`` in the JSON. A pose at or behind the X-ray source is an error in
either file, and so is a true pose whose model lies outside the field of view (``--image-size``² at
the calibration's pixel size); a predicted pose outside the view is scored, with a warning.

``--json`` prints exactly one JSON object: ``x``, ``y``, ``z``, ``z_rot``, ``x_rot``, ``y_rot``,
``geodesic``, ``mtre`` (each ``{"mean", "median"}``, absolute errors, mm and degrees; also
``inplane`` = √(Δx² + Δy²) and ``translation`` = √(Δx² + Δy² + Δz²)), ``success`` (fractions of
frames, for d/θ = 1 mm/1°, 2 mm/2°, 5 mm/5°: ``inplane_<d>mm_<θ>deg`` in-plane translation error ≤ d
and geodesic ≤ θ, depth ignored; ``3d_<d>mm_<θ>deg`` 3-D translation error ≤ d and geodesic ≤ θ;
``mtre_<d>mm`` mTRE ≤ d), ``trap_rate``, ``n``, plus ``trap_aware`` (the same blocks for the
symmetric-trap-aware poses), ``part``, ``excluded`` (1-based frame rows and why) and
``pred_outside_view``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from jtml.cli.labels import parse_part_paths
from jtml.errors import JTMLError
from jtml.geometry import Camera, project_mesh
from jtml.io import read_calibration, read_poses, read_stl

UNITS = {"x": "mm", "y": "mm", "z": "mm", "z_rot": "deg", "x_rot": "deg", "y_rot": "deg"}
UNITS.update(inplane="mm", translation="mm", geodesic="deg", mtre="mm")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--truth", required=True, help="tracked poses (.jts/.jtak), one row per frame")
    parser.add_argument("--pred", required=True, help="poses to score (.jts/.jtak), same frames and order")
    parser.add_argument("--model", required=True, metavar="PART=STL", help="the part's model (for mTRE)")
    parser.add_argument("--calibration", required=True, help="JT_INTCALIB file of the study")
    parser.add_argument(
        "--image-size",
        type=int,
        default=1024,
        metavar="PX",
        help="frame size (square) the calibration applies to, for the field-of-view check (default 1024)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def _check_poses(
    poses: np.ndarray, vertices: np.ndarray, camera: Camera, path: Path, strict_view: bool
) -> list[int]:
    """Raise for a pose behind the source (or, ``strict_view``, outside the view); return the rows
    (0-based) whose model lies outside the view otherwise."""
    outside = []
    for i, pose in enumerate(poses):
        if not np.isfinite(pose).all():
            continue
        try:
            uv = project_mesh(vertices, pose, camera)
        except JTMLError as e:
            raise JTMLError(f"row {i + 1}: {e.message}", path) from None
        W, H = camera.width, camera.height
        if not ((uv[:, 0] >= 0) & (uv[:, 0] <= W) & (uv[:, 1] >= 0) & (uv[:, 1] <= H)).any():
            if strict_view:
                raise JTMLError(
                    f"row {i + 1}: pose {pose.tolist()} puts the model outside the {W}x{H} field of view "
                    "(wrong calibration, model or file?)",
                    path,
                )
            outside.append(i)
    return outside


def score(
    truth_path: Path,
    pred_path: Path,
    stl: Path,
    calibration: Path,
    image_size: int = 1024,
    part: str = "part",
) -> dict[str, Any]:
    """The ``--json`` object (see the module docstring); every bad input is one JTMLError."""
    from jtml.metrics.pose import PoseError

    calib = read_calibration(calibration)
    if image_size < 1:
        raise JTMLError(f"--image-size must be positive, got {image_size}")
    camera = Camera.from_calibration(calib, image_size, image_size)
    vertices = np.asarray(read_stl(stl).vertices, dtype=np.float64)
    truth = read_poses(truth_path, allow_missing=True)
    pred = read_poses(pred_path, allow_missing=True)
    if len(truth) != len(pred):
        raise JTMLError(
            f"has {len(pred)} pose row(s) but the truth {truth_path} has {len(truth)}: both must have one "
            "row per frame of the same study (use NOT_OPTIMIZED rows in a .jtak for frames without a pose)",
            pred_path,
        )
    _check_poses(truth, vertices, camera, truth_path, strict_view=True)
    outside = _check_poses(pred, vertices, camera, pred_path, strict_view=False)
    miss_t, miss_p = np.isnan(truth).any(axis=1), np.isnan(pred).any(axis=1)
    excluded = [
        {
            "frame": int(i) + 1,
            "missing_in": "both" if miss_t[i] and miss_p[i] else "truth" if miss_t[i] else "pred",
        }
        for i in np.flatnonzero(miss_t | miss_p)
    ]
    keep = ~(miss_t | miss_p)
    if not keep.any():
        raise JTMLError(f"no frame has a pose in both files ({len(truth)} row(s))", pred_path)
    metric = PoseError(vertices)
    metric.update(pred[keep], truth[keep])
    out = {"part": part, **metric.nested()}
    out["excluded"] = excluded
    out["pred_outside_view"] = [int(i) + 1 for i in outside]
    return out


def _fmt(v: float | None) -> str:
    return "nan" if v is None else f"{v:.3f}"


def _success_label(key: str) -> str:
    """``inplane_2mm_2deg`` → ``success in-plane 2 mm/2°`` (the kind always shown: an in-plane
    success says nothing about depth), ``3d_2mm_2deg`` → ``success 3-D 2 mm/2°``, ``mtre_2mm`` →
    ``success mTRE ≤ 2 mm``."""
    kind, _, rest = key.partition("_")
    if kind == "mtre":
        return f"success mTRE ≤ {rest.removesuffix('mm')} mm"
    mm, _, deg = rest.partition("mm_")
    return f"success {'in-plane' if kind == 'inplane' else '3-D'} {mm} mm/{deg.removesuffix('deg')}°"


def format_table(result: dict[str, Any]) -> str:
    """A plain-text table of the plain and trap-aware errors."""
    names = [n for n in UNITS if n in result]
    lines = [
        f"{result['part']}: {result['n']} frame(s) scored (absolute errors)",
        f"{'':16}{'mean':>10}{'median':>10}{'trap mean':>12}{'trap median':>13}",
    ]
    for n in names:
        plain, trap = result[n], result["trap_aware"][n]
        lines.append(
            f"{n + ' (' + UNITS[n] + ')':16}{_fmt(plain['mean']):>10}{_fmt(plain['median']):>10}"
            f"{_fmt(trap['mean']):>12}{_fmt(trap['median']):>13}"
        )
    trap = result["trap_aware"]["success"]
    for key, value in result["success"].items():
        lines.append(f"{_success_label(key):32}{_fmt(value):>10}   trap-aware {_fmt(trap[key])}")
    lines.append(f"{'trap rate':32}{_fmt(result['trap_rate']):>10}   (twin closer than the pose)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    models = parse_part_paths([args.model], "--model")
    ((part, stl),) = models.items()
    result = score(Path(args.truth), Path(args.pred), stl, Path(args.calibration), args.image_size, part)
    if result["excluded"]:
        shown = ", ".join(f"{e['frame']} ({e['missing_in']})" for e in result["excluded"])
        print(f"note: excluded frame(s) without a pose in both files: {shown}", file=sys.stderr)
    if result["pred_outside_view"]:
        rows = ", ".join(map(str, result["pred_outside_view"]))
        print(
            f"warning: predicted pose(s) put the model outside the field of view: row(s) {rows}",
            file=sys.stderr,
        )
    print(json.dumps(result) if args.json else format_table(result))
    return 0
