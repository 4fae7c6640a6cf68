"""Grayscale DICOM cine (one multi-frame file, or a folder of files) → 8-bit frames in acquisition order.

Read with pydicom; the display pipeline is pydicom's own. The rule, per frame, from its file:

1. modality: ``pydicom.pixels.apply_modality_lut`` (Modality LUT or RescaleSlope/Intercept).
2. VOI: the file's first WindowCenter/WindowWidth through ``pydicom.pixels.apply_windowing``
   (VOILUTFunction LINEAR, LINEAR_EXACT or SIGMOID, PS3.3 C.11.2.1.2), whose output range
   ``[lo, hi]`` is pydicom's for the file (BitsStored, PixelRepresentation, rescale); else its VOI
   LUT Sequence through ``apply_voi`` (``[lo, hi] = [0, 2**bits - 1]``, bits from the LUT
   descriptor); else no VOI: ``[lo, hi]`` = min–max of step 1 over every frame of the source.
3. 8 bits: ``floor((y - lo) / (hi - lo) * 255 + 0.5)`` (rounded half up), 0 when ``hi == lo``.
4. MONOCHROME1 (low values are bright) is inverted, ``255 - v``, so higher is brighter as in
   MONOCHROME2. Colour files are refused.

Acquisition order: a file's frames in their stored order; the files of a folder sorted by
AcquisitionTime (ContentTime when not every file has one), then InstanceNumber, then file name.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut, apply_voi, apply_windowing, get_decoder, iter_pixels
from pydicom.pixels.utils import get_nr_frames
from pydicom.valuerep import TM

from jtml.errors import JTMLError

WINDOWING_RULE = (
    "apply_modality_lut; VOI = first WindowCenter/WindowWidth (apply_windowing, output [lo, hi] per "
    "pydicom), else VOI LUT Sequence (apply_voi, [0, 2**bits - 1]), else [lo, hi] = min-max of the "
    "modality output over all source frames; v = floor((y - lo) / (hi - lo) * 255 + 0.5), 0 if hi == lo; "
    "MONOCHROME1 inverted (255 - v)"
)
GRAYSCALE = ("MONOCHROME1", "MONOCHROME2")
_REQUIRED = ("Rows", "Columns", "SamplesPerPixel", "PhotometricInterpretation", "BitsAllocated", "BitsStored")
_DEFER = "1 KB"  # pixel data (and other large values) stay on disk until iter_pixels reads them


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def _seconds(t: TM) -> float:
    return t.hour * 3600 + t.minute * 60 + t.second + t.microsecond / 1e6


def _floats(ds: Dataset, keyword: str) -> list[float] | None:
    """A numeric element as a list of floats (None when absent or empty)."""
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    values = list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]
    return [float(v) for v in values]


@dataclass
class DicomFile:
    """One file of a series: its header (pixel data left on disk) and where it sits in time."""

    path: Path
    header: Dataset
    frames: int
    voi: dict[str, Any]
    voi_range: tuple[float, float] | None  # [lo, hi] of the VOI output; None: the series' min-max

    @property
    def instance(self) -> int | None:
        value = self.header.get("InstanceNumber")
        return None if value in (None, "") else int(value)

    def time(self, keyword: str) -> float | None:
        """AcquisitionTime/ContentTime in seconds after midnight."""
        value = self.header.get(keyword)
        if value in (None, ""):
            return None
        try:
            return _seconds(TM(value))
        except ValueError:
            raise JTMLError(f"{keyword} {value!r} is not a DICOM time (HHMMSS.FFFFFF)", self.path) from None

    def frame_offsets(self) -> tuple[list[float] | None, str | None]:
        """Each frame's time after the file's first, in seconds, and the element it comes from."""
        n = self.frames
        vector = _floats(self.header, "FrameTimeVector")
        if vector is not None and len(vector) == n:  # increments in ms; the first is 0
            return list(np.cumsum(vector) / 1000.0), "FrameTimeVector"
        frame_time = _floats(self.header, "FrameTime")
        if frame_time and frame_time[0] > 0:
            return [i * frame_time[0] / 1000.0 for i in range(n)], "FrameTime"
        rate = _floats(self.header, "CineRate")
        if rate and rate[0] > 0:
            return [i / rate[0] for i in range(n)], "CineRate"
        return ([0.0], None) if n == 1 else (None, None)


def _read_header(path: Path) -> DicomFile:
    try:
        ds = pydicom.dcmread(path, defer_size=_DEFER)
    except InvalidDicomError:
        raise JTMLError("not a DICOM file (no 'DICM' prefix after the 128-byte preamble)", path) from None
    except (OSError, EOFError, ValueError, KeyError) as e:
        raise JTMLError(f"cannot read DICOM file: {_one_line(e)}", path) from None
    if "PixelData" not in ds:
        kind = "float pixel data is not supported" if "FloatPixelData" in ds else "no pixel data"
        raise JTMLError(f"{kind} (an image-less DICOM such as a report or a DICOMDIR?)", path)
    missing = [k for k in _REQUIRED if ds.get(k) in (None, "")]
    if missing:
        raise JTMLError(f"missing image element(s) {', '.join(missing)}", path)
    photometric = str(ds.PhotometricInterpretation)
    if photometric not in GRAYSCALE or int(ds.SamplesPerPixel) != 1:
        raise JTMLError(
            f"photometric interpretation {photometric} with {ds.SamplesPerPixel} sample(s) per pixel: only "
            f"grayscale ({' or '.join(GRAYSCALE)}, one sample) is supported",
            path,
        )
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if syntax is None:
        raise JTMLError("no TransferSyntaxUID in the file meta information", path)
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise JTMLError(f"transfer syntax {syntax} ({syntax.name}) has no pixel data decoder", path) from None
    if not decoder.is_available:
        raise JTMLError(
            f"compressed transfer syntax {syntax.name} ({syntax}): no decoder is installed "
            f"(one of: {'; '.join(decoder.missing_dependencies)})",
            path,
        )
    try:
        frames = get_nr_frames(ds, warn=False)
    except (TypeError, ValueError) as e:
        raise JTMLError(f"bad NumberOfFrames: {_one_line(e)}", path) from None
    voi, voi_range = _voi(ds, path)
    return DicomFile(path=path, header=ds, frames=frames, voi=voi, voi_range=voi_range)


def _voi(ds: Dataset, path: Path) -> tuple[dict[str, Any], tuple[float, float] | None]:
    """A file's VOI transform as import.json records it, and its output range ``[lo, hi]`` (None:
    the series' min–max). Bad values raise here, before anything is written."""
    centers, widths = _floats(ds, "WindowCenter"), _floats(ds, "WindowWidth")
    if centers and widths:
        function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
        try:  # pydicom's own output range: what the window maps the far sides to
            lo, hi = apply_windowing(np.array([-np.inf, np.inf]), ds)
        except ValueError as e:
            raise JTMLError(f"bad window: {_one_line(e)}", path) from None
        voi = {"kind": "window", "center": centers[0], "width": widths[0], "function": function}
        return voi, (float(lo), float(hi))
    if ds.get("VOILUTSequence"):
        descriptor = ds.VOILUTSequence[0].get("LUTDescriptor")
        if descriptor is None or len(descriptor) != 3 or "LUTData" not in ds.VOILUTSequence[0]:
            raise JTMLError("VOI LUT Sequence without a LUT Descriptor and LUT Data", path)
        bits = int(descriptor[2])
        return {"kind": "lut", "bits": bits, "entries": int(descriptor[0]) or 2**16}, (
            0.0,
            float(2**bits - 1),
        )
    return {"kind": "range"}, None


@dataclass
class DicomSeries:
    """The files of one cine in acquisition order; frames are decoded only when iterated."""

    source: Path
    files: list[DicomFile]
    order: str
    time_keyword: str | None = None  # the time element the files were sorted by
    _range: tuple[float, float] | None = field(default=None, repr=False)

    @property
    def n_frames(self) -> int:
        return sum(f.frames for f in self.files)

    @property
    def header(self) -> Dataset:
        """The first file's header: the series' modality, geometry, spacing."""
        return self.files[0].header

    def _locate(self, indices: Sequence[int]) -> Iterator[tuple[DicomFile, list[int]]]:
        """Group series frame indices (ascending) into (file, frame indices in that file) runs."""
        starts = np.cumsum([0] + [f.frames for f in self.files])
        run: list[int] = []
        current = -1
        for i in indices:
            k = int(np.searchsorted(starts, i, side="right")) - 1
            if k != current and run:
                yield self.files[current], run
                run = []
            current = k
            run.append(i - int(starts[k]))
        if run:
            yield self.files[current], run

    def _modality(self, indices: Sequence[int]) -> Iterator[tuple[DicomFile, np.ndarray]]:
        for item, local in self._locate(indices):
            try:
                for raw in iter_pixels(item.path, indices=local):
                    yield item, apply_modality_lut(raw, item.header)
            except (RuntimeError, ValueError, NotImplementedError) as e:
                raise JTMLError(f"cannot decode the pixel data: {_one_line(e)}", item.path) from None

    def value_range(self) -> tuple[float, float]:
        """Min–max of the modality output over every frame (the VOI of files without one)."""
        if self._range is None:
            lo, hi = math.inf, -math.inf
            for _, values in self._modality(range(self.n_frames)):
                lo, hi = min(lo, float(values.min())), max(hi, float(values.max()))
            self._range = (lo, hi)
        return self._range

    def frames(self, indices: Sequence[int]) -> Iterator[np.ndarray]:
        """Yield the series frames ``indices`` (ascending) as 8-bit images, by the module's rule."""
        for item, values in self._modality(indices):
            kind = item.voi["kind"]
            if kind == "window":
                y = apply_windowing(values, item.header)
            elif kind == "lut":
                y = apply_voi(np.rint(values).astype(np.int64), item.header)
            else:
                y = values
            lo, hi = item.voi_range if item.voi_range is not None else self.value_range()
            if hi > lo:
                scaled = np.floor((np.asarray(y, dtype=np.float64) - lo) / (hi - lo) * 255.0 + 0.5)
                out = np.clip(scaled, 0, 255).astype(np.uint8)
            else:
                out = np.zeros(np.shape(values), dtype=np.uint8)
            if str(item.header.PhotometricInterpretation) == "MONOCHROME1":
                out = 255 - out
            yield out

    def frame_times(self) -> tuple[list[float | None], str | None]:
        """Each frame's time after the series' first frame (seconds; None where unknown), and the
        elements it comes from: a file's own frame timing, offset by its AcquisitionTime/ContentTime
        when the series is a folder of files."""
        offsets = [f.frame_offsets() for f in self.files]
        if len(self.files) == 1:
            times, how = offsets[0]
            return (list(times) if times else [None] * self.n_frames), how
        keyword = self.time_keyword
        if keyword is None:
            return [None] * self.n_frames, None
        out: list[float | None] = []
        t0 = self.files[0].time(keyword)
        for item, (times, _) in zip(self.files, offsets, strict=True):
            start = item.time(keyword)
            out.extend([None] * item.frames if times is None else [start - t0 + t for t in times])
        return out, ", ".join([keyword, *sorted({how for _, how in offsets if how})])

    def info(self) -> dict[str, Any]:
        """What import.json records about the source: modality, geometry, spacing, timing, VOI."""
        ds = self.header
        timing = {
            name: _floats(ds, name)
            for name in ("FrameTime", "FrameTimeVector", "CineRate", "RecommendedDisplayFrameRate")
        }
        for name in ("FrameTime", "CineRate", "RecommendedDisplayFrameRate"):
            if timing[name] is not None:
                timing[name] = timing[name][0]
        spacing = {name: _floats(ds, name) for name in ("ImagerPixelSpacing", "PixelSpacing")}
        return {
            "modality": str(ds.get("Modality", "")) or None,
            "rows": int(ds.Rows),
            "columns": int(ds.Columns),
            "bits_stored": int(ds.BitsStored),
            "photometric_interpretation": str(ds.PhotometricInterpretation),
            "inverted": str(ds.PhotometricInterpretation) == "MONOCHROME1",
            "transfer_syntax": str(ds.file_meta.TransferSyntaxUID),
            "timing": {k: v for k, v in timing.items() if v is not None},
            "pixel_spacing_mm": {k: v for k, v in spacing.items() if v is not None},
            "distance_source_to_detector_mm": (_floats(ds, "DistanceSourceToDetector") or [None])[0],
        }


def _dicom_files(folder: Path) -> list[Path]:
    files = sorted(
        p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.name != "DICOMDIR"
    )
    if not files:
        raise JTMLError("folder holds no DICOM files", folder)
    return files


def open_dicom(source: str | os.PathLike) -> DicomSeries:
    """Read the headers of a DICOM file or of every file in a folder; check and sort them.

    Everything the import needs is checked here (pixel data present, a decoder installed,
    grayscale, one series of one frame size), so a bad input fails before a frame is written."""
    source = Path(source)
    if source.is_dir():
        items = [_read_header(p) for p in _dicom_files(source)]
    elif source.is_file():
        items = [_read_header(source)]
    else:
        raise JTMLError("DICOM file or folder not found", source)
    first = items[0]
    for item in items[1:]:
        for key in ("SeriesInstanceUID", "Rows", "Columns"):
            if item.header.get(key) != first.header.get(key):
                raise JTMLError(
                    f"{key} {item.header.get(key)} differs from {first.path.name}'s {first.header.get(key)}: "
                    "import one series (one frame size) at a time",
                    item.path,
                )
    if len(items) == 1:
        return DicomSeries(source=source, files=items, order="file order (multi-frame)")
    keyword = next(
        (k for k in ("AcquisitionTime", "ContentTime") if all(i.time(k) is not None for i in items)), None
    )
    by_instance = all(i.instance is not None for i in items)
    items.sort(
        key=lambda i: (i.time(keyword) if keyword else 0.0, i.instance if by_instance else 0, i.path.name)
    )
    keys = [*([keyword] if keyword else []), *(["InstanceNumber"] if by_instance else []), "file name"]
    return DicomSeries(source=source, files=items, order=", ".join(keys), time_keyword=keyword)


__all__ = ["GRAYSCALE", "WINDOWING_RULE", "DicomFile", "DicomSeries", "open_dicom"]
