"""``jtml labels``: render label masks from tracked poses, how a lab turns tracked studies into
segmentation training data. Output: ``OUT/<part>/<frame>_label_<part>.tif`` (uint8 {0,255}).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from tqdm import tqdm

from jtml.errors import JTMLError
from jtml.geometry import Camera, SilhouetteRenderer, project_mesh
from jtml.io import list_images, read_calibration, read_image, read_poses, read_stl, staged_dir, write_mask


def parse_part_paths(values: list[str] | None, flag: str) -> dict[str, Path]:
    """``["fem=a.stl", "tib=b.stl"]`` → ``{"fem": Path("a.stl"), ...}`` with clear errors."""
    out: dict[str, Path] = {}
    for value in values or []:
        part, sep, path = value.partition("=")
        if not sep or not part or not path:
            raise JTMLError(f"{flag} expects PART=PATH (e.g. fem=femur.stl), got {value!r}")
        if part in out:
            raise JTMLError(f"{flag} names part {part!r} twice")
        out[part] = Path(path)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", required=True, help="folder of frames (file-name order = pose rows)")
    parser.add_argument("--calibration", required=True, help="JT_INTCALIB calibration file")
    parser.add_argument("--model", action="append", required=True, metavar="PART=STL", help="repeatable")
    parser.add_argument("--poses", action="append", required=True, metavar="PART=JTS", help="repeatable")
    parser.add_argument("--out", required=True, help="output folder (gets one sub-folder per part)")


def run(args: argparse.Namespace) -> int:
    models = parse_part_paths(args.model, "--model")
    poses = parse_part_paths(args.poses, "--poses")
    if set(models) != set(poses):
        raise JTMLError(f"--model parts {sorted(models)} and --poses parts {sorted(poses)} differ")
    frames = list_images(args.images)
    if not frames:
        raise JTMLError("no frames (.tif/.png/.jpg) in the image folder", args.images)
    calib = read_calibration(args.calibration)
    # Read and check everything before writing anything.
    meshes = {part: read_stl(path) for part, path in models.items()}
    tables = {
        part: read_poses(path, n_frames=len(frames), allow_missing=True) for part, path in poses.items()
    }
    probe = Camera.from_calibration(calib, 1, 1)
    for part, table in tables.items():
        for i, pose in enumerate(table):
            if np.isfinite(pose).all():
                try:
                    project_mesh(meshes[part].vertices, pose, probe)
                except JTMLError as e:
                    raise JTMLError(f"row {i + 1} ({frames[i].name}): {e.message}", poses[part]) from None
    renderers: dict[tuple[str, tuple[int, int]], SilhouetteRenderer] = {}
    with staged_dir(args.out) as stage:
        for i, frame in enumerate(tqdm(frames, desc="labels", unit="frame")):
            shape = read_image(frame).shape
            for part, mesh in meshes.items():
                pose = tables[part][i]
                if not np.isfinite(pose).all():  # NOT_OPTIMIZED frame in a .jtak: no label to write
                    continue
                key = (part, shape)
                if key not in renderers:
                    renderers[key] = SilhouetteRenderer(
                        mesh, Camera.from_calibration(calib, shape[1], shape[0])
                    )
                write_mask(stage / part / f"{frame.stem}_label_{part}.tif", renderers[key].render(pose))
    print(f"wrote {len(frames)} frame(s) x {len(meshes)} part(s) of labels to {args.out}")
    return 0
