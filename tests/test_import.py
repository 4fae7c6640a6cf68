"""`jtml import` (issue #15, item 1): DICOM cine and video files → a study folder. Every source is
built here with pydicom or PyAV; expected pixels come from the DICOM standard's formula, not from
the module under test."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
from pathlib import Path

import av
import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import get_decoder
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    XRayAngiographicImageStorage,
    generate_uid,
)

from jtml.cli import main
from jtml.errors import JTMLError
from jtml.io import Calibration, list_images, read_calibration, read_image

DEMO = Path(__file__).resolve().parents[1] / "experiments" / "demo_seg.yaml"
N, SIZE = 20, 64
CENTER, WIDTH = 30000, 4001  # integer window: no pixel lands exactly on a rounding tie
FRAME_TIME_MS = 66.7


def _pixels(seed: int = 0, n: int = N, low: int = 27000, high: int = 33000) -> np.ndarray:
    return np.random.default_rng(seed).integers(low, high, (n, SIZE, SIZE), dtype=np.uint16)


def _dicom(path: Path, pixels: np.ndarray, *, syntax=ExplicitVRLittleEndian, pixel_data=True, **elements):
    """A 16-bit grayscale XA file (multi-frame when len(pixels) > 1); ``elements`` are set on it."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = XRayAngiographicImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "XA"
    ds.Rows, ds.Columns = pixels.shape[1:]
    ds.NumberOfFrames = len(pixels)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    for key, value in elements.items():
        setattr(ds, key, value)
    if pixel_data and syntax.is_compressed:
        ds.PixelData = encapsulate([b"\x00junk, not a codestream" * 4 for _ in pixels])
        ds["PixelData"].VR = "OB"
    elif pixel_data:
        ds.PixelData = pixels.astype("<u2").tobytes()
        ds["PixelData"].VR = "OW"
    ds.save_as(path, enforce_file_format=True)
    return path


def _cine(path: Path, pixels: np.ndarray | None = None, **elements) -> Path:
    """The acceptance file: 20 frames, MONOCHROME2, 16-bit, a window, a pixel spacing, a frame time."""
    elements = {"WindowCenter": CENTER, "WindowWidth": WIDTH, "PixelSpacing": [0.3, 0.3], **elements}
    return _dicom(path, _pixels() if pixels is None else pixels, FrameTime=FRAME_TIME_MS, **elements)


def _standard_window(x: np.ndarray, center: float, width: float, y_min: float, y_max: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 (VOI LUT Function LINEAR), then y_min..y_max linearly to 0..255, rounded
    half up: the windowing jtml import documents."""
    x = x.astype(np.float64)
    c, w = center - 0.5, width - 1.0
    y = ((x - c) / w + 0.5) * (y_max - y_min) + y_min
    y = np.where(x <= c - w / 2, y_min, np.where(x > c + w / 2, y_max, y))
    return np.floor((y - y_min) / (y_max - y_min) * 255 + 0.5).astype(np.uint8)


def _video(path: Path, frames: np.ndarray, codec: str = "ffv1", rate: int = 25) -> Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "gray"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="gray")))
        container.mux(stream.encode())
    return path


def _import(*args: str) -> tuple[int, str]:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(["import", *args])
    return code, buf.getvalue()


def _ok(*args: str) -> tuple[dict, dict]:
    """Run an import that must succeed: (stdout summary, import.json)."""
    code, out = _import(*args)
    assert code == 0
    summary = json.loads(out.strip())
    return summary, json.loads((Path(summary["out"]) / "import.json").read_text())


def _frames(study: Path) -> np.ndarray:
    return np.stack([read_image(p) for p in list_images(study)])


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- DICOM -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rescale", [None, (2.0, -30000.0)], ids=["stored", "rescaled"])
def test_multiframe_dicom_frames_in_order_with_the_standard_window(tmp_path, capsys, rescale):
    pixels = _pixels()
    extra = {} if rescale is None else {"RescaleSlope": rescale[0], "RescaleIntercept": rescale[1]}
    src = _cine(tmp_path / "cine.dcm", pixels, **extra)
    summary, record = _ok("--dicom", str(src), "--out", str(tmp_path / "study"))
    study = tmp_path / "study"
    names = [p.name for p in list_images(study)]
    assert names == [f"cine_{k:05d}.tif" for k in range(N)]
    got = _frames(study)
    assert got.dtype == np.uint8 and got.shape == (N, SIZE, SIZE)
    slope, intercept = rescale or (1.0, 0.0)
    values = pixels * slope + intercept  # the modality output the window applies to
    y_min, y_max = intercept, 65535 * slope + intercept  # 16-bit unsigned, rescaled
    expected = _standard_window(values, CENTER, WIDTH, y_min, y_max)
    assert 0 < expected.mean() < 255 and len(np.unique(expected)) > 100  # a window that shows detail
    np.testing.assert_array_equal(got, expected)  # frame k is source frame k: order too
    assert summary == {
        "out": str(study),
        "kind": "dicom",
        "frames": N,
        "source_frames": N,
        "calibration": "calibration.stub.txt",
    }
    assert record["jtml_version"] and record["kind"] == "dicom"
    (source,) = record["sources"]
    assert source["file"] == str(src.resolve()) and source["sha256"] == _sha256(src) and source["frames"] == N
    assert source["window"] == {
        "kind": "window",
        "center": CENTER,
        "width": WIDTH,
        "function": "LINEAR",
        "range": [y_min, y_max],
    }
    assert record["source_frames"] == N and record["selection"] == {"every": 1, "start": 0, "stop": None}
    assert [f["file"] for f in record["frames"]] == names
    assert [f["source_frame"] for f in record["frames"]] == list(range(N))
    assert [f["time_s"] for f in record["frames"]] == pytest.approx(
        [k * FRAME_TIME_MS / 1000 for k in range(N)]
    )
    assert record["frame_times_from"] == "FrameTime" and record["timing"] == {"FrameTime": FRAME_TIME_MS}
    assert record["pixel_spacing_mm"] == {"PixelSpacing": [0.3, 0.3]}
    assert record["order"] == "file order (multi-frame)" and "MONOCHROME1 inverted" in record["pixels"]
    assert (record["modality"], record["rows"], record["columns"], record["bits_stored"]) == (
        "XA",
        64,
        64,
        16,
    )
    assert record["photometric_interpretation"] == "MONOCHROME2" and record["inverted"] is False
    # PixelSpacing alone: a stub with pp, never a guessed pd, and said so on stderr and in import.json
    assert not (study / "calibration.txt").exists()
    stub = study / "calibration.stub.txt"
    assert record["calibration"]["file"] == stub.name and "pd unknown" in record["calibration"]["note"]
    assert "pd unknown" in capsys.readouterr().err
    lines = stub.read_text().splitlines()
    assert lines[0] == "JT_INTCALIB" and float(lines[4].split()[0]) == 0.3
    with pytest.raises(JTMLError, match="line 2 \\(pd\\) is not a number"):
        read_calibration(stub)  # renamed without setting pd, it still cannot be read as a calibration


def test_detector_spacing_and_source_distance_give_a_calibration(tmp_path):
    src = _cine(tmp_path / "cine.dcm", ImagerPixelSpacing=[0.154, 0.154], DistanceSourceToDetector=1100.0)
    summary, record = _ok("--dicom", str(src), "--out", str(tmp_path / "study"))
    assert (
        summary["calibration"] == "calibration.txt"
        and not (tmp_path / "study" / "calibration.stub.txt").exists()
    )
    assert read_calibration(tmp_path / "study" / "calibration.txt") == Calibration(pd=1100.0, pp=0.154)
    assert record["pixel_spacing_mm"] == {"ImagerPixelSpacing": [0.154, 0.154], "PixelSpacing": [0.3, 0.3]}
    assert record["distance_source_to_detector_mm"] == 1100.0


def test_monochrome1_is_inverted(tmp_path):
    pixels = _pixels(seed=3)
    _ok("--dicom", str(_cine(tmp_path / "m2.dcm", pixels)), "--out", str(tmp_path / "m2"))
    m1 = _cine(tmp_path / "m1.dcm", pixels, PhotometricInterpretation="MONOCHROME1")
    _, record = _ok("--dicom", str(m1), "--out", str(tmp_path / "m1"))
    np.testing.assert_array_equal(_frames(tmp_path / "m1"), 255 - _frames(tmp_path / "m2"))
    assert record["inverted"] is True and record["photometric_interpretation"] == "MONOCHROME1"


def test_without_a_window_the_full_range_of_all_frames_is_used(tmp_path):
    pixels = _pixels(seed=4, low=1000, high=3000)
    src = _dicom(tmp_path / "raw.dcm", pixels)  # no window, no spacing
    lo, hi = float(pixels.min()), float(pixels.max())
    expected = np.floor((pixels - lo) / (hi - lo) * 255 + 0.5).astype(np.uint8)
    summary, record = _ok("--dicom", str(src), "--out", str(tmp_path / "all"))
    np.testing.assert_array_equal(_frames(tmp_path / "all"), expected)
    assert record["sources"][0]["window"] == {"kind": "range", "range": None}
    assert "min-max" in record["pixels"] and summary["calibration"] is None
    assert record["calibration"]["note"].startswith("no pixel spacing")
    # a selection keeps the same mapping: the range is over all source frames, not the written ones
    _ok("--dicom", str(src), "--out", str(tmp_path / "odd"), "--start", "1", "--every", "2")
    np.testing.assert_array_equal(_frames(tmp_path / "odd"), expected[1::2])


def test_a_voi_lut_sequence_is_applied_when_there_is_no_window(tmp_path):
    """PS3.3 C.11.2.1.1: values below the first mapped one take the first entry, above the last the
    last; 16-bit entries, then 0..65535 linearly to 0..255."""
    pixels = _pixels(seed=9, low=900, high=1400)
    table = np.random.default_rng(10).integers(0, 65536, 256).tolist()
    item = Dataset()
    item.add_new(0x00283002, "US", [256, 1000, 16])  # LUT Descriptor: entries, first mapped value, bits
    item.add_new(0x00283006, "US", table)  # LUT Data
    src = _dicom(tmp_path / "lut.dcm", pixels, VOILUTSequence=[item])
    _, record = _ok("--dicom", str(src), "--out", str(tmp_path / "study"))
    y = np.asarray(table)[np.clip(pixels.astype(np.int64) - 1000, 0, 255)]
    expected = np.floor(y / 65535 * 255 + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(_frames(tmp_path / "study"), expected)
    assert record["sources"][0]["window"] == {
        "kind": "lut",
        "bits": 16,
        "entries": 256,
        "range": [0.0, 65535.0],
    }


@pytest.mark.parametrize("with_times", [True, False], ids=["AcquisitionTime", "InstanceNumber"])
def test_folder_of_single_frame_files_is_sorted_into_acquisition_order(tmp_path, with_times):
    pixels = _pixels(seed=5, n=5)
    folder = tmp_path / "series"
    folder.mkdir()
    series = generate_uid()
    acquisition = [3, 0, 4, 1, 2]  # file k (named so file-name order is k) is acquired acquisition[k]-th
    for k, rank in enumerate(acquisition):
        times = {"AcquisitionTime": f"1015{rank:02d}.500000"} if with_times else {}
        _cine(
            folder / f"IM_{k}",
            pixels[rank : rank + 1],
            SeriesInstanceUID=series,
            InstanceNumber=rank + 1,
            **times,
        )
    _, record = _ok("--dicom", str(folder), "--out", str(tmp_path / "study"))
    np.testing.assert_array_equal(
        _frames(tmp_path / "study"), _standard_window(pixels, CENTER, WIDTH, 0.0, 65535.0)
    )
    assert [Path(s["file"]).name for s in record["sources"]] == [
        f"IM_{acquisition.index(r)}" for r in range(5)
    ]
    assert [s["instance_number"] for s in record["sources"]] == [1, 2, 3, 4, 5]
    assert [f["file"] for f in record["frames"]] == [f"series_{k:05d}.tif" for k in range(5)]
    if with_times:
        assert record["order"] == "AcquisitionTime, InstanceNumber, file name"
        assert [f["time_s"] for f in record["frames"]] == pytest.approx([0.0, 1.0, 2.0, 3.0, 4.0])
    else:
        assert record["order"] == "InstanceNumber, file name"
        assert [f["time_s"] for f in record["frames"]] == [None] * 5


def test_every_start_stop_select_source_frames(tmp_path):
    pixels = _pixels(seed=6)
    src = _cine(tmp_path / "cine.dcm", pixels)
    _, record = _ok(
        "--dicom", str(src), "--out", str(tmp_path / "s"), "--every", "3", "--start", "2", "--stop", "15"
    )
    chosen = [2, 5, 8, 11, 14]
    np.testing.assert_array_equal(
        _frames(tmp_path / "s"), _standard_window(pixels[chosen], CENTER, WIDTH, 0, 65535)
    )
    assert [f["source_frame"] for f in record["frames"]] == chosen
    assert [f["file"] for f in record["frames"]] == [f"cine_{k:05d}.tif" for k in range(5)]
    assert record["selection"] == {"every": 3, "start": 2, "stop": 15} and record["source_frames"] == N
    _, tail = _ok("--dicom", str(src), "--out", str(tmp_path / "t"), "--start", "18", "--stop", "99")
    assert [f["source_frame"] for f in tail["frames"]] == [18, 19]


def test_overwrite_replaces_a_previous_import(tmp_path):
    src = _cine(tmp_path / "cine.dcm")
    out = tmp_path / "study"
    _ok("--dicom", str(src), "--out", str(out))
    (out / "notes.txt").write_text("mine\n")
    (out / "Labels" / "fem").mkdir(parents=True)
    (out / "Labels" / "fem" / "cine_00000_label_fem.tif").write_bytes(b"stale")
    _ok("--dicom", str(src), "--out", str(out), "--every", "5", "--overwrite")
    assert [p.name for p in list_images(out)] == [f"cine_{k:05d}.tif" for k in range(4)]
    assert not (out / "Labels").exists() and (out / "notes.txt").read_text() == "mine\n"
    assert json.loads((out / "import.json").read_text())["selection"]["every"] == 5


# -- video -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,codec", [("clip.mkv", "ffv1"), ("clip.avi", "rawvideo")])
def test_video_frames_equal_the_source(tmp_path, name, codec):
    frames = np.random.default_rng(7).integers(0, 256, (N, SIZE, SIZE), dtype=np.uint8)
    src = _video(tmp_path / name, frames, codec=codec)
    summary, record = _ok("--video", str(src), "--out", str(tmp_path / "study"))
    assert [p.name for p in list_images(tmp_path / "study")] == [f"clip_{k:05d}.tif" for k in range(N)]
    np.testing.assert_array_equal(_frames(tmp_path / "study"), frames)
    assert summary == {
        "out": str(tmp_path / "study"),
        "kind": "video",
        "frames": N,
        "source_frames": N,
        "calibration": None,
    }
    assert record["kind"] == "video" and record["sources"] == [
        {"file": str(src.resolve()), "sha256": _sha256(src)}
    ]
    assert (
        record["fps"] == 25.0 and record["codec"] == codec and (record["rows"], record["columns"]) == (64, 64)
    )
    assert [f["time_s"] for f in record["frames"]] == pytest.approx([k / 25 for k in range(N)])
    assert record["calibration"] == {
        "file": None,
        "note": "a video carries no pixel spacing: no calibration written",
    }
    # a selection, counted against every decoded frame
    _, part = _ok(
        "--video", str(src), "--out", str(tmp_path / "part"), "--start", "3", "--stop", "15", "--every", "4"
    )
    np.testing.assert_array_equal(_frames(tmp_path / "part"), frames[[3, 7, 11]])
    assert [f["source_frame"] for f in part["frames"]] == [3, 7, 11] and part["source_frames"] == N


# -- bad input: one error naming the file, exit 2, nothing written ------------------------------------
def _no_pixels(tmp: Path) -> Path:
    return _dicom(tmp / "report.dcm", _pixels(n=1), pixel_data=False)


def _jpeg_ls(tmp: Path) -> Path:
    if get_decoder(JPEGLSLossless).is_available:
        pytest.skip("a JPEG-LS decoder is installed here")
    return _dicom(tmp / "jls.dcm", _pixels(n=2), syntax=JPEGLSLossless)


def _not_dicom(tmp: Path) -> Path:
    (tmp / "notes.dcm").write_text("not a DICOM file\n")
    return tmp / "notes.dcm"


def _junk_video(tmp: Path) -> Path:
    (tmp / "clip.mp4").write_bytes(np.random.default_rng(8).bytes(4096))
    return tmp / "clip.mp4"


BAD = {
    "no pixel data": (_no_pixels, "--dicom", "no pixel data"),
    "no decoder installed": (_jpeg_ls, "--dicom", "no decoder is installed"),
    # pillow may decode JPEG 2000 here: then the junk fragments are what fails
    "undecodable JPEG 2000": (
        lambda t: _dicom(
            t / "j2k.dcm", _pixels(n=2), syntax=JPEG2000Lossless, WindowCenter=CENTER, WindowWidth=WIDTH
        ),
        "--dicom",
        "(no decoder is installed|cannot decode the pixel data)",
    ),
    "not a DICOM file": (_not_dicom, "--dicom", "not a DICOM file"),
    "undecodable video": (_junk_video, "--video", "cannot open the video"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_source_is_one_error_and_nothing_is_written(tmp_path, capsys, case):
    make, flag, message = BAD[case]
    src = make(tmp_path)
    out = tmp_path / "study"
    capsys.readouterr()
    code, stdout = _import(flag, str(src), "--out", str(out))
    assert code == 2 and stdout == ""
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: {src}: ")
    assert re.search(message, line), line
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == [src.name]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--every", "0"], "--every must be at least 1"),
        (["--start", "9", "--stop", "4"], "--start 9 must be below --stop 4"),
        (["--start", "20"], "the selection has no frames: --start 20 is past the last of 20 frame(s)"),
    ],
)
@pytest.mark.parametrize("kind", ["dicom", "video"])
def test_bad_selection_is_one_error_and_nothing_is_written(tmp_path, capsys, args, message, kind):
    if kind == "dicom":
        src = _cine(tmp_path / "cine.dcm")
    else:
        src = _video(tmp_path / "clip.mkv", np.zeros((N, SIZE, SIZE), dtype=np.uint8))
    out = tmp_path / "study"
    code, _ = _import(f"--{kind}", str(src), "--out", str(out), *args)
    assert code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: ") and message in line
    if "past the last" in message:
        assert str(src) in line
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == [src.name]


def test_non_empty_out_is_refused_and_left_unchanged(tmp_path, capsys):
    src = _cine(tmp_path / "cine.dcm")
    out = tmp_path / "study"
    out.mkdir()
    (out / "keep.txt").write_text("not yours\n")
    code, _ = _import("--dicom", str(src), "--out", str(out))
    assert code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == f"error: {out}: output folder is not empty (use --overwrite to replace the study in it)"
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "not yours\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cine.dcm", "study"]


# -- then `jtml predict` on the imported study ---------------------------------------------------------
def test_predict_runs_on_an_imported_study(tmp_path, capsys):
    synth = {"out": str(tmp_path / "synth"), "frames": 8, "seed": 0, "size": SIZE}
    settings = ["--trainer.default_root_dir", str(tmp_path / "runs"), "--trainer.logger", "false",
                "--data.init_args.image_size", str(SIZE), "--data.init_args.num_workers", "0"]  # fmt: skip
    fit = ["fit", "--config", str(DEMO), *settings, "--trainer.max_epochs", "1",
           "--data.init_args.synthetic", json.dumps(synth), "--data.init_args.batch_size", "4",
           "--data.init_args.val_fraction", "0.25", "--data.init_args.test_fraction", "0.25"]  # fmt: skip
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(fit) == 0
    ckpt = json.loads(buf.getvalue().strip().splitlines()[-1])["checkpoint"]
    study = tmp_path / "imported"
    _ok("--dicom", str(_cine(tmp_path / "cine.dcm")), "--out", str(study))
    out = tmp_path / "pred"
    predict = ["predict", "--config", str(DEMO), "--ckpt_path", ckpt, *settings, "--data.studies",
               json.dumps([str(study)]), "--trainer.callbacks.init_args.out_dir", str(out)]  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(predict) == 0
    frames = list_images(study)
    assert len(frames) == N
    for part in ("fem", "tib"):
        masks = sorted((out / part).iterdir())
        assert [m.name for m in masks] == [f"{f.stem}_label_{part}.tif" for f in frames]
        assert all(read_image(m).shape == (SIZE, SIZE) for m in masks)
