"""Formats: round trips, the real files' numbers, and one clear error per kind of bad input."""

from __future__ import annotations

import numpy as np
import pytest
import trimesh

from jtml.errors import JTMLError
from jtml.io import (
    Calibration,
    read_calibration,
    read_image,
    read_mask,
    read_poses,
    read_stl,
    write_calibration,
    write_image,
    write_mask,
    write_poses,
    write_stl,
)


def test_calibration_round_trip(tmp_path):
    cal = Calibration(1198.0, 60.0, -12.5, 0.373)
    write_calibration(tmp_path / "c.txt", cal)
    assert read_calibration(tmp_path / "c.txt") == cal


def test_real_calibration(kneel1):
    assert read_calibration(kneel1 / "calibration.txt") == Calibration(1198.0, 0.0, 0.0, 0.373)
    assert read_calibration(kneel1 / "calibration_offset60.txt") == Calibration(1198.0, 60.0, 60.0, 0.373)


@pytest.mark.parametrize(
    "text, problem",
    [
        ("JT_CALIB\n1198\n0\n0\n0.373\n", "expected header"),
        ("JT_INTCALIB\n1198\n0\n0\n", "3 value line(s)"),
        ("JT_INTCALIB\n1198\nzero\n0\n0.373\n", "line 3 (xo) is not a number"),
        ("JT_INTCALIB\n1198\n0\n0\n-0.373\n", "pixel size must be positive"),
        ("JT_INTCALIB\n1198\n0\n0\n0\n", "pixel size must be positive"),
        ("JT_INTCALIB\n0\n0\n0\n0.373\n", "principal distance must be positive"),
        ("JT_INTCALIB\nnan\n0\n0\n0.373\n", "must be finite"),
    ],
)
def test_bad_calibration(tmp_path, text, problem):
    path = tmp_path / "bad.txt"
    path.write_text(text)
    with pytest.raises(JTMLError, match="bad.txt") as e:
        read_calibration(path)
    assert problem in str(e.value)


def test_missing_files(tmp_path):
    for reader in (read_calibration, read_poses, read_stl, read_image, read_mask):
        with pytest.raises(JTMLError, match="not found") as e:
            reader(tmp_path / "nope.xyz")
        assert "nope.xyz" in str(e.value)


def test_real_poses_match_file(kneel1):
    fem = read_poses(kneel1 / "fem.jts", n_frames=3)
    assert fem.shape == (3, 6)
    np.testing.assert_array_equal(fem[0], [18.52191, 19.69514, -1027.713, -26.69708, -7.419319, -0.2587041])
    np.testing.assert_array_equal(fem[2], [16.4709, 16.4248, -1028.69, -24.12223, -7.678545, 0.3264978])
    fft = read_poses(kneel1 / "FFT" / "fem_fft.jts", n_frames=3)  # tab-separated columns
    np.testing.assert_array_equal(fft[1], [19.152664, 20.487323, -1055.649, -27.40297, -7.534504, -0.414539])


def test_jts_round_trip_is_exact(tmp_path):
    rng = np.random.default_rng(0)
    poses = rng.normal(size=(5, 6)) * [30, 30, 100, 90, 20, 20] + [0, 0, -1000, 0, 0, 0]
    write_poses(tmp_path / "p.jts", poses)
    np.testing.assert_array_equal(read_poses(tmp_path / "p.jts"), poses)
    assert (tmp_path / "p.jts").read_text().splitlines()[0] == "JT_EULER_312"


def test_jtak_keeps_not_optimized_rows_aligned(tmp_path):
    path = tmp_path / "k.jtak"
    path.write_text(
        "JTA_EULER_KINEMATICS\nX_TRAN\t\tY_TRAN\t\tZ_TRAN\t\tZ_ROT\t\tX_ROT\t\tY_ROT\n"
        "18.52191,\t19.69514,\t-1027.713,\t-26.69708,\t-7.419319,\t-0.2587041,\n"
        "NOT_OPTIMIZED,\t0,\t0,\t0,\t0,\t0,\n"
        "16.4709,\t16.4248,\t-1028.69,\t-24.12223,\t-7.678545,\t0.3264978,\n"
    )
    poses = read_poses(path, n_frames=3)
    assert poses.shape == (3, 6)
    assert np.isnan(poses[1]).all()
    assert poses[2, 0] == 16.4709
    write_poses(tmp_path / "again.jtak", poses)
    back = read_poses(tmp_path / "again.jtak")
    np.testing.assert_array_equal(np.isnan(back), np.isnan(poses))
    np.testing.assert_array_equal(back[[0, 2]], poses[[0, 2]])
    with pytest.raises(JTMLError, match="cannot store missing"):
        write_poses(tmp_path / "x.jts", poses)
    assert not (tmp_path / "x.jts").exists()


@pytest.mark.parametrize(
    "text, problem",
    [
        ("JT_EULER_311\nh\n1,2,-3,4,5,6\n", "expected header"),
        ("JT_EULER_312\nh\n1,2,-3,4,5\n", "expected 6 columns"),
        ("JT_EULER_312\nh\n1,2,-3,4,5,6,7\n", "expected 6 columns"),
        ("JT_EULER_312\nh\n1,2,nan,4,5,6\n", "NaN or infinite"),
        ("JT_EULER_312\nh\n1,2,-inf,4,5,6\n", "NaN or infinite"),
        ("JT_EULER_312\nh\n1,2,x,4,5,6\n", "non-numeric"),
        ("JT_EULER_312\nh\nNOT_OPTIMIZED,0,0,0,0,0\n", "NOT_OPTIMIZED row"),
    ],
)
def test_bad_jts(tmp_path, text, problem):
    path = tmp_path / "bad.jts"
    path.write_text(text)
    with pytest.raises(JTMLError, match="bad.jts") as e:
        read_poses(path)
    assert problem in str(e.value)


def test_fewer_pose_rows_than_frames(kneel1):
    with pytest.raises(JTMLError, match="has 3 pose row.*4 frame"):
        read_poses(kneel1 / "fem.jts", n_frames=4)


def test_stl_round_trip_and_bad_stl(tmp_path, kneel1):
    mesh = read_stl(kneel1 / "KR_right_7_fem.stl")
    assert len(mesh.faces) == 12412
    assert mesh.bounds[1, 2] == pytest.approx(36.050331)
    write_stl(tmp_path / "m.stl", mesh)
    back = read_stl(tmp_path / "m.stl")
    np.testing.assert_allclose(back.vertices[back.faces], mesh.vertices[mesh.faces], atol=1e-5)
    (tmp_path / "garbage.stl").write_bytes(b"solid x\nthis is not an stl\n" + bytes(range(256)))
    (tmp_path / "empty.stl").write_bytes(b"")
    for name in ("garbage.stl", "empty.stl"):
        with pytest.raises(JTMLError, match=name):
            read_stl(tmp_path / name)
    write_stl(tmp_path / "nofaces.stl", trimesh.Trimesh())
    with pytest.raises(JTMLError, match="no triangles"):
        read_stl(tmp_path / "nofaces.stl")


@pytest.mark.parametrize(
    "suffix, dtype",
    [(".tif", np.uint8), (".tif", np.uint16), (".png", np.uint8), (".png", np.uint16), (".jpg", np.uint8)],
)
def test_image_round_trip(tmp_path, suffix, dtype):
    rng = np.random.default_rng(1)
    img = rng.integers(0, np.iinfo(dtype).max, size=(40, 56), dtype=dtype)
    if suffix == ".jpg":
        img = np.full((40, 56), 120, np.uint8)  # lossy: use a flat image
    write_image(tmp_path / f"f{suffix}", img)
    back = read_image(tmp_path / f"f{suffix}")
    assert back.dtype == dtype and back.shape == img.shape
    np.testing.assert_array_equal(back, img)


def test_real_label_is_lzw_and_binary(kneel1):
    path = kneel1 / "Labels" / "fem" / "AT_K1_V1_0160_label_fem.tif"
    mask = read_mask(path, (1024, 1024))
    assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1}
    assert mask.sum() == 13315


def test_written_mask_is_lab_format(tmp_path):
    mask = np.zeros((20, 30), bool)
    mask[5:9, 3:20] = True
    write_mask(tmp_path / "m.tif", mask)
    raw = read_image(tmp_path / "m.tif")
    assert raw.dtype == np.uint8 and set(np.unique(raw)) == {0, 255}
    assert (tmp_path / "m.tif").read_bytes()[:2] in (b"II", b"MM")
    np.testing.assert_array_equal(read_mask(tmp_path / "m.tif"), mask)


def test_bad_images_and_masks(tmp_path, kneel1):
    data = (kneel1 / "AT_K1_V1_0160.tif").read_bytes()
    (tmp_path / "trunc.tif").write_bytes(data[: len(data) // 2])
    (tmp_path / "corrupt.tif").write_bytes(b"II*\x00" + b"\xff" * 200)
    for name in ("trunc.tif", "corrupt.tif"):
        with pytest.raises(JTMLError, match=f"{name}: cannot decode"):
            read_image(tmp_path / name)
    write_image(tmp_path / "gray.tif", np.arange(12, dtype=np.uint8).reshape(3, 4))
    with pytest.raises(JTMLError, match="gray.tif: mask is not binary"):
        read_mask(tmp_path / "gray.tif")
    write_mask(tmp_path / "small.tif", np.ones((3, 4)))
    with pytest.raises(JTMLError, match="small.tif: mask size 4x3 differs from its frame's 1024x1024"):
        read_mask(tmp_path / "small.tif", (1024, 1024))
