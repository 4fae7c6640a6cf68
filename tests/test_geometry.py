"""Camera, rotations and the renderer against JointTrack's verified conventions and real labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jtml.errors import JTMLError
from jtml.geometry import (
    Camera,
    SilhouetteRenderer,
    euler312_to_matrix,
    geodesic_angle,
    matrix_to_euler312,
    matrix_to_pose,
    matrix_to_rot6d,
    pose_to_matrix,
    project_mesh,
    rasterize_triangles,
    rot6d_to_matrix,
    symmetric_twin,
)
from jtml.io import Calibration, list_images, read_calibration, read_mask, read_poses, read_stl

PARTS = {"fem": "KR_right_7_fem.stl", "tib": "KR_right_6_tib.stl"}


def _random_angles(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = (torch.rand(n, 3, generator=g, dtype=torch.float64) * 2 - 1) * torch.tensor([179.0, 89.0, 179.0])
    return a.double()


def test_euler312_matches_rz_rx_ry():
    z, x, y = np.deg2rad([30.0, -20.0, 45.0])
    rz = np.array([[np.cos(z), -np.sin(z), 0], [np.sin(z), np.cos(z), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(x), -np.sin(x)], [0, np.sin(x), np.cos(x)]])
    ry = np.array([[np.cos(y), 0, np.sin(y)], [0, 1, 0], [-np.sin(y), 0, np.cos(y)]])
    R = euler312_to_matrix(torch.tensor([30.0, -20.0, 45.0], dtype=torch.float64)).numpy()
    np.testing.assert_allclose(R, rz @ rx @ ry, atol=1e-12)


def test_rotation_round_trips_batched():
    angles = _random_angles(500).reshape(5, 100, 3)
    R = euler312_to_matrix(angles)
    assert R.shape == (5, 100, 3, 3)
    torch.testing.assert_close(matrix_to_euler312(R), angles, atol=1e-9, rtol=0)
    torch.testing.assert_close(rot6d_to_matrix(matrix_to_rot6d(R)), R, atol=1e-12, rtol=0)
    poses = torch.cat([torch.randn(5, 100, 3, dtype=torch.float64) * 50, angles], -1)
    torch.testing.assert_close(matrix_to_pose(pose_to_matrix(poses)), poses, atol=1e-9, rtol=0)


def test_rot6d_projects_arbitrary_vectors_to_rotations():
    R = rot6d_to_matrix(torch.randn(64, 6, dtype=torch.float64))
    eye = torch.eye(3, dtype=torch.float64).expand(64, 3, 3)
    torch.testing.assert_close(R.transpose(-1, -2) @ R, eye, atol=1e-12, rtol=0)
    torch.testing.assert_close(torch.linalg.det(R), torch.ones(64, dtype=torch.float64))


def test_geodesic_angle():
    a = torch.tensor([[10.0, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    b = torch.tensor([[10.0, 0.0, 37.0], [180.0, 0.0, 0.0]], dtype=torch.float64)
    ang = torch.rad2deg(geodesic_angle(euler312_to_matrix(a), euler312_to_matrix(b)))
    torch.testing.assert_close(ang, torch.tensor([37.0, 180.0], dtype=torch.float64))


def test_projection_formula_and_principal_point():
    cam = Camera.from_calibration(Calibration(1000.0, 0.0, 0.0, 0.5), 200, 100)
    uv = cam.project(torch.tensor([[0.0, 0.0, -900.0], [10.0, 5.0, -1000.0]], dtype=torch.float64))
    # f = 2000 px; +x goes right, +y goes up (smaller row).
    torch.testing.assert_close(uv, torch.tensor([[100.0, 50.0], [120.0, 40.0]], dtype=torch.float64))
    P = cam.backproject(uv, torch.tensor([-900.0, -1000.0], dtype=torch.float64))
    torch.testing.assert_close(P[1], torch.tensor([10.0, 5.0, -1000.0], dtype=torch.float64))


def test_camera_from_opencv_intrinsics_agrees_with_cv2():
    import cv2

    cam = Camera.from_calibration(Calibration(1198.0, 12.0, -7.0, 0.373), 1024, 1024)
    back = Camera.from_intrinsics(cam.intrinsics(), 1024, 1024, pixel_size=0.373)
    for a, b in zip((cam.pd, cam.xo, cam.yo, cam.pp), (back.pd, back.xo, back.yo, back.pp), strict=True):
        assert a == pytest.approx(b, abs=1e-9)
    P = np.array([[15.0, -20.0, -1030.0], [-40.0, 33.0, -980.0]])
    # OpenCV looks down +z with +y down: flip y and z; its pixel centres sit at integers (+0.5).
    cv_uv, _ = cv2.projectPoints(P * [1, -1, -1], np.zeros(3), np.zeros(3), cam.intrinsics(), None)
    np.testing.assert_allclose(cv_uv[:, 0] + 0.5, cam.project(P).numpy(), atol=1e-9)
    with pytest.raises(JTMLError, match="fx == fy"):
        Camera.from_intrinsics(np.diag([1000.0, 900.0, 1.0]), 64, 64)


def test_rasterizer_pixel_centre_rule():
    # Triangle covering pixel centres (0.5..2.5) on rows 0..2 of a right triangle.
    tri = np.array([[[0.5, 0.5], [3.0, 0.5], [0.5, 3.0]]])
    m = rasterize_triangles(tri, 4, 4)
    expected = np.array([[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]], bool)
    np.testing.assert_array_equal(m, expected)
    # A quad split into two triangles leaves no crack along the shared diagonal.
    quad = np.array([[[0.2, 0.2], [3.8, 0.2], [3.8, 3.8]], [[0.2, 0.2], [3.8, 3.8], [0.2, 3.8]]])
    assert rasterize_triangles(quad, 4, 4).all()
    # Fully off-image and degenerate triangles draw nothing.
    off = np.array([[[-9.0, -9.0], [-5.0, -9.0], [-5.0, -5.0]], [[1.0, 1.0], [2.0, 1.0], [3.0, 1.0]]])
    assert not rasterize_triangles(off, 4, 4).any()


def test_render_reproduces_all_six_hand_labels_exactly(kneel1):
    calib = read_calibration(kneel1 / "calibration.txt")
    frames = list_images(kneel1)
    cam = Camera.from_calibration(calib, 1024, 1024)
    for part, stl in PARTS.items():
        renderer = SilhouetteRenderer(read_stl(kneel1 / stl), cam)
        poses = read_poses(kneel1 / f"{part}.jts", n_frames=len(frames))
        for frame, pose in zip(frames, poses, strict=True):
            label = read_mask(kneel1 / "Labels" / part / f"{frame.stem}_label_{part}.tif", (1024, 1024))
            mask = renderer.render(pose)
            assert mask.sum() > 5000
            assert (mask != label.astype(bool)).sum() == 0, f"{part} {frame.name}"
        # A half-pixel shift visibly breaks the match (the test can fail).
        shifted = Camera.from_calibration(Calibration(calib.pd, calib.pp / 2, 0.0, calib.pp), 1024, 1024)
        label = read_mask(kneel1 / "Labels" / part / f"{frames[0].stem}_label_{part}.tif")
        assert (SilhouetteRenderer(read_stl(kneel1 / stl), shifted).render(poses[0]) != label).sum() > 50


def test_offset60_shifts_silhouette_by_documented_amount(kneel1):
    mesh = read_stl(kneel1 / "KR_right_7_fem.stl")
    pose = read_poses(kneel1 / "fem.jts")[0]
    c0 = Camera.from_calibration(read_calibration(kneel1 / "calibration.txt"), 1024, 1024)
    c60 = Camera.from_calibration(read_calibration(kneel1 / "calibration_offset60.txt"), 1024, 1024)
    shift = project_mesh(mesh.vertices, pose, c60) - project_mesh(mesh.vertices, pose, c0)
    px = 60 / 0.373  # 160.86 px: right (+u) for +xo, up (-v) for +yo
    np.testing.assert_allclose(shift, np.broadcast_to([px, -px], shift.shape), atol=1e-9)
    m0 = SilhouetteRenderer(mesh, c0).render(pose)
    m60 = SilhouetteRenderer(mesh, c60).render(pose)
    r0, c0_ = np.nonzero(m0)
    r60, c60_ = np.nonzero(m60)
    assert abs(m0.sum() - m60.sum()) < 0.01 * m0.sum()
    assert c60_.mean() - c0_.mean() == pytest.approx(px, abs=0.05)
    assert r60.mean() - r0.mean() == pytest.approx(-px, abs=0.05)


def test_symmetric_twin_on_axis_and_involution():
    pose = torch.tensor([0.0, 0.0, -1000.0, 25.0, -7.0, 12.0], dtype=torch.float64)
    torch.testing.assert_close(
        symmetric_twin(pose), torch.tensor([0.0, 0.0, -1000.0, 25.0, 7.0, -12.0]).double()
    )
    off = torch.tensor([[40.0, -30.0, -1020.0, -26.7, -7.4, -0.26]], dtype=torch.float64)
    torch.testing.assert_close(symmetric_twin(symmetric_twin(off)), off, atol=1e-9, rtol=0)


def test_pose_behind_source_is_an_error(kneel1):
    mesh = read_stl(kneel1 / "KR_right_7_fem.stl")
    cam = Camera(1198.0, 0.0, 0.0, 0.373, 64, 64)
    with pytest.raises(JTMLError, match="behind the X-ray source"):
        SilhouetteRenderer(mesh, cam).render(np.array([0.0, 0.0, 20.0, 0.0, 0.0, 0.0]))
