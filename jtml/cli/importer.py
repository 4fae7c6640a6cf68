"""``jtml import``: a DICOM cine or a video file → a study folder in the JointTrack layout.

::

    jtml import --dicom FILE_OR_DIR --out STUDY [--every N] [--start I] [--stop J] [--overwrite]
    jtml import --video FILE --out STUDY ...

Frames ``STUDY/<stem>_<NNNNN>.tif`` (uint8, LZW), numbered from 0 in acquisition order, zero-padded
so file-name order is that order; ``<stem>`` is the source file's (a DICOM folder's name). Source
frames ``start, start + every, ... < stop`` are written. DICOM pixel values follow
:mod:`jtml.io.dicom`'s windowing rule, video frames :mod:`jtml.io.video`'s. ``STUDY/import.json``
records the sources and their sha256, the selection and which source frame each written frame is,
frame timing, pixel spacing, the window used and the image description.

Calibration: ``calibration.txt`` only when the DICOM gives the detector pixel size
(ImagerPixelSpacing, square pixels) and DistanceSourceToDetector (its ``pd``; principal point at the
image centre, ``xo = yo = 0``). A pixel spacing alone gives ``calibration.stub.txt`` with ``pp`` and
no ``pd`` (set it, then rename the file): a guessed ``pd`` would silently bias every pose.

The whole study is built in a staging folder, so a bad input leaves ``--out`` as it was. Prints
one JSON line: the study, kind, frames written, source frames and calibration file.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

import jtml
from jtml.errors import JTMLError
from jtml.io import Calibration, atomic_write, staged_dir, write_calibration, write_image
from jtml.io.dicom import WINDOWING_RULE, DicomSeries, open_dicom
from jtml.io.hashing import file_sha256
from jtml.io.study import CALIBRATION_NAME, clear_study
from jtml.io.video import PIXEL_RULE, VideoSource

IMPORT_NAME = "import.json"
STUB_NAME = "calibration.stub.txt"
_PENDING = ".pending"  # frames are written here by index, renamed once their count (the padding) is known


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--dicom", type=Path, metavar="FILE_OR_DIR", help="multi-frame DICOM or a folder")
    source.add_argument("--video", type=Path, metavar="FILE", help="video file (MP4, AVI, MKV, MOV, ...)")
    parser.add_argument(
        "--out", required=True, type=Path, help="study folder to create (must be empty or new)"
    )
    parser.add_argument("--every", type=int, default=1, metavar="N", help="keep every N-th frame (default 1)")
    parser.add_argument("--start", type=int, default=0, metavar="I", help="first source frame (0-based)")
    parser.add_argument(
        "--stop", type=int, metavar="J", help="source frame to stop before (default: the end)"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the study in a non-empty --out (its frames, Labels/, poses, calibration, import.json)",
    )


def _check_selection(every: int, start: int, stop: int | None) -> None:
    if every < 1:
        raise JTMLError(f"--every must be at least 1, got {every}")
    if start < 0 or (stop is not None and stop < 0):
        raise JTMLError(f"--start and --stop must be >= 0, got {start} and {stop}")
    if stop is not None and start >= stop:
        raise JTMLError(f"--start {start} must be below --stop {stop}: the selection has no frames")


def _no_frames(start: int, n: int, source: Path) -> JTMLError:
    return JTMLError(f"the selection has no frames: --start {start} is past the last of {n} frame(s)", source)


def _calibration(series: DicomSeries) -> tuple[Calibration | None, float | None, str]:
    """(calibration, stub pixel size, note) from the DICOM's pixel spacing and source distance."""
    info = series.info()
    spacing = info["pixel_spacing_mm"]
    tag = next((k for k in ("ImagerPixelSpacing", "PixelSpacing") if k in spacing), None)
    if tag is None:
        return None, None, "no pixel spacing in the DICOM: no calibration written"
    values = spacing[tag]
    if len(values) != 2 or min(values) <= 0:
        raise JTMLError(f"{tag} must be two positive numbers (mm), got {values}", series.files[0].path)
    if not np.isclose(values[0], values[1], rtol=1e-6, atol=0.0):
        return (
            None,
            None,
            f"non-square pixels ({tag} {values} mm): JT_INTCALIB has one pixel size, none written",
        )
    pp, sid = values[0], info["distance_source_to_detector_mm"]
    if tag == "ImagerPixelSpacing" and sid:
        try:
            calib = Calibration(pd=sid, xo=0.0, yo=0.0, pp=pp)
        except JTMLError as e:
            raise JTMLError(f"DistanceSourceToDetector {sid}: {e.message}", series.files[0].path) from None
        note = f"pd = DistanceSourceToDetector, pp = {tag}, principal point at the image centre (xo = yo = 0)"
        return calib, None, note
    missing = "no DistanceSourceToDetector" if tag == "ImagerPixelSpacing" else f"{tag} is at the patient"
    note = (
        f"pp = {tag}; pd unknown ({missing}): set pd (mm) in {STUB_NAME}, "
        f"then rename it to {CALIBRATION_NAME}; pose commands need it"
    )
    return None, pp, note


def _write_stub(path: Path, pp: float, note: str) -> None:
    """A JT_INTCALIB file whose pd line is not a number, so nothing can read a guessed pd."""
    text = (
        "JT_INTCALIB\n"
        "SET_PD_MM  pd: principal distance (source to detector, mm); set it, then rename this file "
        f"to {CALIBRATION_NAME}\n"
        "0.0  xo (mm)\n"
        "0.0  yo (mm)\n"
        f"{pp!r}  pp (mm/pixel)\n"
        f"{note}\n"
    )
    with atomic_write(path) as tmp:
        tmp.write_text(text)


@dataclass
class _Plan:
    """One source, opened and checked: what import.json says of it and its frames to come."""

    stem: str
    record: dict[str, Any]  # kind, sources, order, pixels, frame_times_from
    info: dict[str, Any]  # the image description (modality, size, timing, spacing, ...)
    frames: Iterator[tuple[int, np.ndarray | None, float | None]]  # (source frame, image or skipped, time)
    total: int | None  # for the progress bar
    n_frames: int | None  # the source's frame count; None: known once decoded (video)
    calibration: tuple[Calibration | None, float | None, str | None] = (None, None, None)


def _plan_dicom(path: Path, every: int, start: int, stop: int | None) -> _Plan:
    series = open_dicom(path)
    n = series.n_frames
    indices = list(range(start, n if stop is None else min(stop, n), every))
    if not indices:
        raise _no_frames(start, n, path)
    times, times_from = series.frame_times()
    record = {
        "kind": "dicom",
        "sources": [
            {
                "file": str(f.path.resolve()),
                "sha256": file_sha256(f.path),
                "frames": f.frames,
                "instance_number": f.instance,
                "window": {**f.voi, "range": list(f.voi_range) if f.voi_range else None},
            }
            for f in series.files
        ],
        "order": series.order,
        "pixels": WINDOWING_RULE,
        "frame_times_from": times_from,
    }
    frames = zip(indices, series.frames(indices), (times[i] for i in indices), strict=True)
    stem = path.resolve().name if path.is_dir() else path.stem
    return _Plan(stem, record, series.info(), frames, len(indices), n, _calibration(series))


def _plan_video(path: Path, every: int, start: int, stop: int | None) -> _Plan:
    video = VideoSource(path)
    record = {
        "kind": "video",
        "sources": [{"file": str(video.path.resolve()), "sha256": file_sha256(video.path)}],
        "order": "decoding output order (presentation order)",
        "pixels": PIXEL_RULE,
        "frame_times_from": "pts * time_base",
    }

    def keep(i: int) -> bool:
        return i >= start and (stop is None or i < stop) and (i - start) % every == 0

    info = video.info()
    calibration = (None, None, "a video carries no pixel spacing: no calibration written")
    return _Plan(path.stem, record, info, video.frames(keep), info["declared_frames"], None, calibration)


def import_study(
    out: Path,
    *,
    dicom: Path | None = None,
    video: Path | None = None,
    every: int = 1,
    start: int = 0,
    stop: int | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Write the study and its ``import.json``; returns the record. Bad input raises
    :class:`JTMLError` and leaves ``out`` as it was. ``progress``: a tqdm bar (default: on a TTY)."""
    if (dicom is None) == (video is None):
        raise JTMLError("give exactly one of --dicom and --video")
    _check_selection(every, start, stop)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise JTMLError("output path exists and is not a folder", out)
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise JTMLError("output folder is not empty (use --overwrite to replace the study in it)", out)
    source = Path(dicom if dicom is not None else video)
    plan = (_plan_dicom if dicom is not None else _plan_video)(source, every, start, stop)
    calib, stub_pp, note = plan.calibration
    show = sys.stderr.isatty() if progress is None else progress
    written: list[tuple[int, float | None]] = []
    seen = 0
    with staged_dir(out) as stage:
        pending = stage / _PENDING
        for i, image, time_s in tqdm(
            plan.frames, total=plan.total, desc="import", unit="frame", disable=not show
        ):
            seen = i + 1
            if image is not None:
                write_image(pending / f"{len(written)}.tif", image)
                written.append((i, time_s))
        n_frames = plan.n_frames if plan.n_frames is not None else seen
        if not written:
            raise _no_frames(start, n_frames, source)
        width = max(5, len(str(len(written) - 1)))
        names = [f"{plan.stem}_{k:0{width}d}.tif" for k in range(len(written))]
        for k, name in enumerate(names):
            (pending / f"{k}.tif").rename(stage / name)
        pending.rmdir()
        calibration_file = None
        if calib is not None:
            write_calibration(stage / CALIBRATION_NAME, calib)
            calibration_file = CALIBRATION_NAME
        elif stub_pp is not None:
            _write_stub(stage / STUB_NAME, stub_pp, note)
            calibration_file = STUB_NAME
        record = {
            "jtml_version": jtml.__version__,
            **plan.record,
            "source_frames": n_frames,
            "selection": {"every": every, "start": start, "stop": stop},
            "frames": [
                {"file": name, "source_frame": i, "time_s": t}
                for name, (i, t) in zip(names, written, strict=True)
            ],
            **plan.info,
            "calibration": {"file": calibration_file, "note": note},
        }
        with atomic_write(stage / IMPORT_NAME) as tmp:
            tmp.write_text(json.dumps(record, indent=2) + "\n")
        if out.is_dir():
            clear_study(out, extra=(STUB_NAME, IMPORT_NAME))
    if stub_pp is not None:
        print(f"jtml import: {note}", file=sys.stderr)
    return record


def run(args: argparse.Namespace) -> int:
    record = import_study(
        args.out,
        dicom=args.dicom,
        video=args.video,
        every=args.every,
        start=args.start,
        stop=args.stop,
        overwrite=args.overwrite,
    )
    summary = {
        "out": str(args.out),
        "kind": record["kind"],
        "frames": len(record["frames"]),
        "source_frames": record["source_frames"],
        "calibration": record["calibration"]["file"],
    }
    print(json.dumps(summary), flush=True)
    return 0
