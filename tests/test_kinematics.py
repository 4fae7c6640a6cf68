"""``jtml.kinematics`` and ``jtml kinematics``: known motions read back with their clinical signs,
agreement with an independent implementation (pytransform3d), gaps, axes files, the CLI's files and
its bad input."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import pytransform3d.rotations as pr
import pytransform3d.transformations as pt

from jtml import kinematics as kin
from jtml.cli import main
from jtml.errors import JTMLError
from jtml.io import read_poses, read_stl, write_poses, write_stl
from jtml.sim.implants import procedural_models

SIDES = ("right", "left")
PNG = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------
# Independent constructions (pytransform3d and plain anatomy, not jtml's Euler code)
# ---------------------------------------------------------------------------------------------


def anatomy(side: str) -> dict[str, np.ndarray]:
    """Unit directions in the implant frame: right x posterior, left x anterior; y up; z medial."""
    posterior = np.array([1.0, 0.0, 0.0]) if side == "right" else np.array([-1.0, 0.0, 0.0])
    return {
        "posterior": posterior,
        "anterior": -posterior,
        "superior": np.array([0.0, 1.0, 0.0]),
        "medial": np.array([0.0, 0.0, 1.0]),
    }


def rotation_moving(a: np.ndarray, b: np.ndarray, degrees: float) -> np.ndarray:
    """The rotation by ``degrees`` that turns unit vector ``a`` towards ``b`` (a ⟂ b)."""
    return pr.matrix_from_axis_angle(np.r_[np.cross(a, b), np.deg2rad(degrees)])


def transform_from_row(row: np.ndarray) -> np.ndarray:
    R = pr.matrix_from_euler(np.deg2rad(row[3:]), 2, 0, 1, False)  # intrinsic z, x', y'': Rz·Rx·Ry
    return pt.transform_from(R, row[:3])


def random_rows(rng: np.random.Generator, n: int) -> np.ndarray:
    rows = np.zeros((n, 6))
    rows[:, :2] = rng.uniform(-60, 60, (n, 2))
    rows[:, 2] = rng.uniform(-1100, -900, n)
    rows[:, 3] = rng.uniform(-180, 180, n)
    rows[:, 4] = rng.uniform(-70, 70, n)
    rows[:, 5] = rng.uniform(-180, 180, n)
    return rows


def knee(side: str, rel: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A femur at a random camera pose and the tibia at ``femur · rel`` (both as 4×4)."""
    femur = transform_from_row(random_rows(rng, 1)[0])
    return femur[None], pt.concat(rel, femur)[None]  # concat(A2B, B2C) = B2C · A2B


def rel_transform(R: np.ndarray = None, t=(0.0, 0.0, 0.0)) -> np.ndarray:
    return pt.transform_from(np.eye(3) if R is None else R, np.asarray(t, dtype=float))


def angles(table) -> np.ndarray:
    return np.array([table[c][0] for c in kin.LAB_COLUMNS[:3]])


# ---------------------------------------------------------------------------------------------
# Known motions, both sides
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize(
    "moving, towards, degrees, expected",
    [
        ("distal", "posterior", 30.0, (30.0, 0.0, 0.0)),  # flexion: the distal end swings back
        ("distal", "medial", 5.0, (0.0, -5.0, 0.0)),  # varus (adduction): abduction negative
        ("anterior", "medial", 10.0, (0.0, 0.0, 10.0)),  # internal: the front of the tibia turns in
    ],
    ids=["flexion", "varus", "internal"],
)
def test_pure_motions_read_with_clinical_signs(side, moving, towards, degrees, expected):
    a = anatomy(side)
    a["distal"] = -a["superior"]
    R = rotation_moving(a[moving], a[towards], degrees)
    femur, tibia = knee(side, rel_transform(R), np.random.default_rng(1))
    lab = kin.lab_kinematics(femur, tibia, side)
    gs = kin.grood_suntay(femur, tibia, side)
    np.testing.assert_allclose(angles(lab), expected, atol=1e-9)
    np.testing.assert_allclose([gs[c][0] for c in kin.GS_COLUMNS[:3]], expected, atol=1e-9)
    # A pure rotation about the shared origin moves neither origin.
    np.testing.assert_allclose([lab[c][0] for c in kin.LAB_COLUMNS[3:]], 0.0, atol=1e-9)


@pytest.mark.parametrize("side", SIDES)
def test_pure_translations_read_with_clinical_signs(side):
    a = anatomy(side)
    # The tibia 40 mm below, 3 mm posterior and 2 mm medial of the femur (in the femur's frame):
    # the femur is then 40 mm above, 3 mm anterior and 2 mm lateral of the tibia.
    t = -40.0 * a["superior"] + 3.0 * a["posterior"] + 2.0 * a["medial"]
    femur, tibia = knee(side, rel_transform(t=t), np.random.default_rng(2))
    lab = kin.lab_kinematics(femur, tibia, side)
    assert lab[kin.FEMUR_SI][0] == pytest.approx(40.0, abs=1e-9)
    assert lab[kin.FEMUR_AP][0] == pytest.approx(3.0, abs=1e-9)
    assert lab[kin.FEMUR_ML][0] == pytest.approx(-2.0, abs=1e-9)
    gs = kin.grood_suntay(femur, tibia, side)
    assert gs[kin.GS_SI][0] == pytest.approx(-40.0, abs=1e-9)
    assert gs[kin.GS_AP][0] == pytest.approx(-3.0, abs=1e-9)
    assert gs[kin.GS_ML][0] == pytest.approx(2.0, abs=1e-9)


def test_left_knee_is_the_mirror_of_the_right():
    """The same clinical motion, mirrored x -> -x (models and camera), reads the same."""
    rng = np.random.default_rng(3)
    fem = random_rows(rng, 20)
    tib = random_rows(rng, 20)
    tib[:, 4] = rng.uniform(-40, 40, 20)
    S = np.array([-1.0, 1.0, 1.0, -1.0, 1.0, -1.0])  # S·T·S on pose rows
    right = kin.knee_kinematics(fem, tib, "right")
    left = kin.knee_kinematics(fem * S, tib * S, "left")
    for column in right:
        np.testing.assert_allclose(left[column], right[column], atol=1e-9, err_msg=column)
    # ...and the right knee's numbers read as a left knee are not the same (the side matters).
    wrong = kin.knee_kinematics(fem, tib, "left")
    assert not np.allclose(wrong[kin.FLEXION], right[kin.FLEXION])


# ---------------------------------------------------------------------------------------------
# Agreement with pytransform3d on random poses
# ---------------------------------------------------------------------------------------------


def independent(fem: np.ndarray, tib: np.ndarray, side: str, A_f: np.ndarray, A_t: np.ndarray):
    """Lab angles/translations and the G&S decomposition computed with pytransform3d only."""
    rot_sign = np.array([1.0, 1.0, 1.0]) if side == "right" else np.array([-1.0, 1.0, -1.0])
    ap = -1.0 if side == "right" else 1.0
    out = []
    for f, t in zip(fem, tib, strict=True):
        F = pt.concat(pt.invert_transform(A_f), transform_from_row(f))  # anatomical -> camera
        T = pt.concat(pt.invert_transform(A_t), transform_from_row(t))
        rel = pt.concat(T, pt.invert_transform(F))  # tibia in femur: F⁻¹ · T
        e = np.rad2deg(pr.euler_from_matrix(rel[:3, :3], 2, 0, 1, False)) * rot_sign
        femur_in_tibia = pt.invert_transform(rel)[:3, 3] * np.array([ap, 1.0, 1.0])
        # G&S in the camera frame: e1 femoral z, e3 tibial y, e2 = e3 × e1; H = O_t − O_f.
        e1, e3 = F[:3, 2], T[:3, 1]
        e2 = np.cross(e3, e1) / np.linalg.norm(np.cross(e3, e1))
        H = T[:3, 3] - F[:3, 3]
        out.append((e, femur_in_tibia, (e1, e2, e3), H))
    return out


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("with_axes", [False, True], ids=["stl-axes", "axes-files"])
def test_agrees_with_pytransform3d_on_random_poses(side, with_axes):
    rng = np.random.default_rng(10 + with_axes + 2 * (side == "left"))
    n = 200
    fem = random_rows(rng, n)
    # The tibia near the femur with any flexion/rotation but |abduction| < 75° (away from gimbal lock).
    rel = random_rows(rng, n)
    rel[:, :3] = rng.uniform(-50, 50, (n, 3))
    rel[:, 4] = rng.uniform(-75, 75, n)
    tib = np.array(
        [pt.concat(transform_from_row(r), transform_from_row(f)) for r, f in zip(rel, fem, strict=True)]
    )
    A_f = A_t = np.eye(4)
    if with_axes:
        A_f = pt.transform_from(pr.random_matrix(rng), rng.uniform(-5, 5, 3))
        A_t = pt.transform_from(pr.random_matrix(rng), rng.uniform(-5, 5, 3))
    got = kin.knee_kinematics(fem, tib, side, fem_axes=A_f, tib_axes=A_t)  # femur rows, tibia 4×4
    ref = independent(fem, _rows_of(tib), side, A_f, A_t)
    lab_angles = np.array([r[0] for r in ref])
    lab_trans = np.array([r[1] for r in ref])
    gs_ang = np.stack([got[c] for c in kin.GS_COLUMNS[:3]], 1)
    np.testing.assert_allclose(
        np.stack([got[c] for c in kin.LAB_COLUMNS[:3]], 1), lab_angles, rtol=0, atol=1e-6
    )
    np.testing.assert_allclose(gs_ang, lab_angles, rtol=0, atol=1e-6)
    np.testing.assert_allclose(
        np.stack([got[c] for c in kin.LAB_COLUMNS[3:]], 1), lab_trans, rtol=0, atol=1e-6
    )
    # G&S translations: H = q1 e1 + q2 e2 + q3 e3 exactly, q2 = H·e2 (e2 ⟂ e1, e3); signs per side.
    ap = -1.0 if side == "right" else 1.0
    q = np.stack([got[kin.GS_ML], ap * got[kin.GS_AP], got[kin.GS_SI]], 1)
    for qi, (_, _, (e1, e2, e3), H) in zip(q, ref, strict=True):
        np.testing.assert_allclose(qi[0] * e1 + qi[1] * e2 + qi[2] * e3, H, rtol=0, atol=1e-6)
        assert qi[1] == pytest.approx(H @ e2, abs=1e-6)


def _rows_of(T: np.ndarray) -> np.ndarray:
    """4×4 → JointTrack rows through pytransform3d (intrinsic z, x', y'')."""
    rows = []
    for M in T:
        e = np.rad2deg(pr.euler_from_matrix(M[:3, :3], 2, 0, 1, False))
        rows.append([*M[:3, 3], *e])
    return np.array(rows)


def test_matrices_and_rows_give_the_same_numbers():
    rng = np.random.default_rng(4)
    fem, tib = random_rows(rng, 10), random_rows(rng, 10)
    F = np.array([transform_from_row(r) for r in fem])
    T = np.array([transform_from_row(r) for r in tib])
    a = kin.knee_kinematics(fem, tib, "right")
    b = kin.knee_kinematics(F, T, "right")
    for column in a:
        np.testing.assert_allclose(a[column], b[column], atol=1e-9)
    one = kin.knee_kinematics(fem[3], tib[3], "right")  # a single frame as a (6,) row
    assert one[kin.FLEXION].shape == (1,) and one[kin.FLEXION][0] == pytest.approx(a[kin.FLEXION][3])


def test_an_axes_transform_recovers_the_anatomical_angles():
    """STL frames turned against the anatomical ones: with the axes given, the known angles."""
    rng = np.random.default_rng(5)
    a = anatomy("right")
    rel = rel_transform(rotation_moving(-a["superior"], a["posterior"], 40.0), t=(0.0, -35.0, 0.0))
    femur, tibia = knee("right", rel, rng)  # anatomical frames in the camera
    A_f = pt.transform_from(pr.active_matrix_from_angle(1, np.deg2rad(7.0)), [1.0, 2.0, 3.0])
    A_t = pt.transform_from(pr.active_matrix_from_angle(0, np.deg2rad(-4.0)), [0.0, -1.0, 0.5])
    # p_anat = A p_stl, so the STL frames' poses are T_anat · A.
    fem_stl, tib_stl = femur @ A_f, tibia @ A_t
    wrong = kin.lab_kinematics(fem_stl, tib_stl, "right")
    right = kin.lab_kinematics(fem_stl, tib_stl, "right", fem_axes=A_f, tib_axes=A_t)
    np.testing.assert_allclose(angles(right), [40.0, 0.0, 0.0], atol=1e-9)
    assert abs(angles(wrong)[1]) > 1.0  # the STL axes alone would read a varus/valgus that is not there


# ---------------------------------------------------------------------------------------------
# Gaps, condyles, bad arrays
# ---------------------------------------------------------------------------------------------


def condyle_mesh() -> np.ndarray:
    """Two point clouds: medial (z > 0) lowest at (3, −25, 20), lateral lowest at (−2, −24, −20)."""
    rng = np.random.default_rng(6)
    med = np.c_[rng.uniform(-10, 10, 200), rng.uniform(-20, 30, 200), rng.uniform(12, 30, 200)]
    lat = np.c_[rng.uniform(-10, 10, 200), rng.uniform(-19, 30, 200), rng.uniform(-30, -12, 200)]
    return np.vstack([med, lat, [[3.0, -25.0, 20.0], [-2.0, -24.0, -20.0]]])


@pytest.mark.parametrize("side", SIDES)
def test_condyle_lowest_points_in_the_tibial_frame(side):
    v = condyle_mesh()
    tray = np.array([[0.0, 3.0, 0.0], [10.0, -20.0, 5.0]])  # its highest point at y = 3
    t = np.array([0.5, -40.0, 1.0])
    femur, tibia = knee(side, rel_transform(t=t), np.random.default_rng(7))
    out = kin.condyle_lowest_points(femur, tibia, v, side, tib_model=tray)
    ap = -1.0 if side == "right" else 1.0
    # tibia at +t in the femur -> femoral points at p − t in the tibia
    for half, p in (("medial", [3.0, -25.0, 20.0]), ("lateral", [-2.0, -24.0, -20.0])):
        q = np.array(p) - t
        np.testing.assert_allclose(
            [out[f"{half}_ap_mm(+ant)"][0], out[f"{half}_si_mm(+sup)"][0], out[f"{half}_ml_mm(+med)"][0]],
            [ap * q[0], q[1], q[2]],
            atol=1e-9,
        )
        assert out[f"{half}_gap_mm(+above tray)"][0] == pytest.approx(q[1] - 3.0)
    # Under flexion the lowest point is found again among all vertices (brute force, pytransform3d).
    a = anatomy(side)
    rel = rel_transform(rotation_moving(-a["superior"], a["posterior"], 60.0), t=t)
    femur, tibia = knee(side, rel, np.random.default_rng(8))
    out = kin.condyle_lowest_points(femur, tibia, v, side)
    in_tibia = pt.transform(pt.invert_transform(rel), np.c_[v, np.ones(len(v))])[:, :3]
    med = in_tibia[v[:, 2] > 0]
    lowest = med[np.argmin(med[:, 1])]
    assert out["medial_si_mm(+sup)"][0] == pytest.approx(lowest[1], abs=1e-9)
    assert out["medial_ap_mm(+ant)"][0] == pytest.approx(ap * lowest[0], abs=1e-9)


def test_missing_frames_are_gaps_never_interpolated():
    rng = np.random.default_rng(9)
    fem, tib = random_rows(rng, 6), random_rows(rng, 6)
    full = kin.knee_kinematics(fem, tib, "right", fem_model=condyle_mesh())
    fem_gap, tib_gap = fem.copy(), tib.copy()
    fem_gap[2] = np.nan
    tib_gap[4] = np.nan
    gappy = kin.knee_kinematics(fem_gap, tib_gap, "right", fem_model=condyle_mesh())
    assert set(gappy) == set(kin.LAB_COLUMNS + kin.GS_COLUMNS + kin.CONDYLE_COLUMNS)
    for column, values in gappy.items():
        assert np.isnan(values[[2, 4]]).all(), column
        np.testing.assert_array_equal(values[[0, 1, 3, 5]], full[column][[0, 1, 3, 5]])


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda f, t: kin.knee_kinematics(f, t, None), "side is required"),
        (lambda f, t: kin.knee_kinematics(f, t, "up"), "side must be"),
        (lambda f, t: kin.knee_kinematics(f[:3], t, "left"), "same frames"),
        (lambda f, t: kin.knee_kinematics(f[:, :5], t, "left"), "pose rows"),
        (lambda f, t: kin.knee_kinematics(f, t, "left", fem_axes=np.diag([1.0, 1, 2, 1])), "not a rotation"),
        (lambda f, t: kin.knee_kinematics(f, t, "left", tib_axes=np.diag([-1.0, 1, 1, 1])), "mirror"),
        (lambda f, t: kin.knee_kinematics(f, t, "left", tib_model=condyle_mesh()), "femoral model"),
        (lambda f, t: kin.condyle_lowest_points(f, t, condyle_mesh()[:200], "left"), "no lateral"),
        (
            lambda f, t: kin.knee_kinematics(np.tile(np.diag([2.0, 1, 1, 1]), (4, 1, 1)), t, "left"),
            "femur frame 0: the 3x3",
        ),
    ],
)
def test_bad_arrays_raise_one_clear_error(call, message):
    rng = np.random.default_rng(11)
    fem, tib = random_rows(rng, 4), random_rows(rng, 4)
    with pytest.raises(JTMLError, match=message):
        call(fem, tib)


# ---------------------------------------------------------------------------------------------
# Axes files
# ---------------------------------------------------------------------------------------------


def test_axes_file_round_trip_and_plain_savetxt(tmp_path):
    A = pt.transform_from(pr.random_matrix(np.random.default_rng(12)), [1.5, -2.0, 0.25])
    kin.write_axes(tmp_path / "fem_axes.txt", A, comment="femur of study X")
    assert np.array_equal(kin.read_axes(tmp_path / "fem_axes.txt"), A)
    np.savetxt(tmp_path / "saved.txt", A, delimiter=",", header="from numpy")
    np.testing.assert_allclose(kin.read_axes(tmp_path / "saved.txt"), A, atol=1e-15)


@pytest.mark.parametrize(
    "text, message",
    [
        ("1 0 0 0\n0 1 0 0\n0 0 1 0\n", "got 3 row"),
        ("1 0 0\n0 1 0\n0 0 1\n0 0 0\n", "expected 4 numbers"),
        ("1 0 0 0\n0 1 0 0\n0 0 1 0\n0 0 0 x\n", "non-numeric"),
        ("2 0 0 0\n0 1 0 0\n0 0 1 0\n0 0 0 1\n", "not a rotation"),
        ("-1 0 0 0\n0 1 0 0\n0 0 1 0\n0 0 0 1\n", "mirror"),
        ("1 0 0 0\n0 1 0 0\n0 0 1 0\n0 0 1 1\n", "last row"),
        ("", "got 0 row"),
    ],
)
def test_bad_axes_files_name_the_file(tmp_path, text, message):
    path = tmp_path / "axes.txt"
    path.write_text(text)
    with pytest.raises(JTMLError, match=message) as e:
        kin.read_axes(path)
    assert e.value.path == str(path)


# ---------------------------------------------------------------------------------------------
# jtml kinematics
# ---------------------------------------------------------------------------------------------


def read_csv(path: Path) -> tuple[list[str], np.ndarray]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    values = np.array([[float(x) if x else np.nan for x in row] for row in rows[1:]])
    return rows[0], values


def test_cli_on_kneel1_right_knee(kneel1, tmp_path, capsys):
    out = tmp_path / "kin"
    args = [
        "kinematics",
        "--fem",
        str(kneel1 / "fem.jts"),
        "--tib",
        str(kneel1 / "tib.jts"),
        "--side",
        "right",
    ]
    args += [
        "--fem-model",
        str(kneel1 / "KR_right_7_fem.stl"),
        "--tib-model",
        str(kneel1 / "KR_right_6_tib.stl"),
    ]
    assert main([*args, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    fem, tib = read_poses(kneel1 / "fem.jts"), read_poses(kneel1 / "tib.jts")
    k = kin.knee_kinematics(
        fem,
        tib,
        "right",
        fem_model=read_stl(kneel1 / "KR_right_7_fem.stl"),
        tib_model=read_stl(kneel1 / "KR_right_6_tib.stl"),
    )
    header, values = read_csv(out / "kinematics.csv")
    assert header == ["frame", *kin.COLUMNS]
    assert values.shape == (3, 1 + len(kin.COLUMNS))
    np.testing.assert_array_equal(values[:, 0], [0, 1, 2])
    for j, column in enumerate(kin.COLUMNS, start=1):
        np.testing.assert_allclose(values[:, j], k[column], atol=5e-7, err_msg=column)
    # A kneeling right knee: deep flexion, a little varus, internal tibial rotation, the condyles
    # an insert's thickness above the tray on either side of the midline.
    assert np.all((values[:, 1] > 100) & (values[:, 1] < 115))
    assert np.all(np.abs(values[:, 2]) < 5) and np.all((values[:, 3] > 0) & (values[:, 3] < 15))
    assert np.all(k["medial_ml_mm(+med)"] > 15) and np.all(k["lateral_ml_mm(+med)"] < -15)
    assert np.all((k[kin.GAP_COLUMNS[0]] > 5) & (k[kin.GAP_COLUMNS[0]] < 15))
    # The printed summary carries every frame's values.
    for value in k[kin.FLEXION]:
        assert f"{value:.2f}" in printed
    assert "flexion_deg(+flex)" in printed and "3 frame(s), 0 with gaps" in printed
    for name in kin.PLOT_NAMES:
        assert (out / name).read_bytes()[:8] == PNG, name
    assert sorted(p.name for p in out.iterdir()) == sorted(["kinematics.csv", *kin.PLOT_NAMES])
    assert [p.name for p in tmp_path.iterdir()] == ["kin"]  # no staging folder left
    # Without the models: no condyle plot, and a stale one from the run above is removed.
    assert main([*args[:7], "--out", str(out)]) == 0
    assert not (out / "condyles.png").exists()
    header, _ = read_csv(out / "kinematics.csv")
    assert header == ["frame", *kin.LAB_COLUMNS, *kin.GS_COLUMNS]


def test_cli_not_optimized_rows_are_empty_fields(tmp_path, capsys):
    rng = np.random.default_rng(13)
    fem, tib = random_rows(rng, 5), random_rows(rng, 5)
    fem[1] = np.nan
    write_poses(tmp_path / "fem.jtak", fem)
    write_poses(tmp_path / "tib.jts", tib)
    assert "NOT_OPTIMIZED" in (tmp_path / "fem.jtak").read_text()
    out = tmp_path / "out"
    args = ["kinematics", "--fem", str(tmp_path / "fem.jtak"), "--tib", str(tmp_path / "tib.jts")]
    assert main([*args, "--side", "left", "--out", str(out)]) == 0
    assert "5 frame(s), 1 with gaps" in capsys.readouterr().out
    lines = (out / "kinematics.csv").read_text().splitlines()
    assert lines[2] == "1" + "," * (len(kin.LAB_COLUMNS) + len(kin.GS_COLUMNS))
    _, values = read_csv(out / "kinematics.csv")
    assert np.isfinite(values[[0, 2, 3, 4]]).all()


def _bad_inputs(tmp: Path) -> dict[str, tuple[list[str], str]]:
    rng = np.random.default_rng(14)
    fem, tib = str(tmp / "fem.jts"), str(tmp / "tib.jts")
    write_poses(fem, random_rows(rng, 3))
    write_poses(tib, random_rows(rng, 3))
    short = tmp / "short_tib.jts"
    write_poses(short, random_rows(rng, 2))
    tray = tmp / "tib.stl"
    write_stl(tray, procedural_models()["tib"])
    garbage = tmp / "garbage.jts"
    garbage.write_text("JT_EULER_312\nheader\n1, 2, 3\n")
    axes = tmp / "bad_axes.txt"
    axes.write_text("1 0 0 0\n0 1 0 0\n")
    stl = tmp / "bad.stl"
    stl.write_bytes(b"")
    base = ["kinematics", "--fem", fem, "--tib", tib]
    return {
        "lengths": ([*base[:3], "--tib", str(short), "--side", "right"], str(short)),
        "side-missing": (base, "side is required"),
        "side-wrong": ([*base, "--side", "middle"], "side must be"),
        "missing-file": (
            ["kinematics", "--fem", str(tmp / "nope.jts"), "--tib", tib, "--side", "right"],
            "nope.jts",
        ),
        "unreadable-poses": ([*base[:3], "--tib", str(garbage), "--side", "right"], str(garbage)),
        "bad-axes": ([*base, "--side", "right", "--fem-axes", str(axes)], str(axes)),
        "bad-stl": ([*base, "--side", "right", "--fem-model", str(stl)], str(stl)),
        "tib-model-alone": (
            [*base, "--side", "right", "--tib-model", str(tray)],
            "--fem-model",
        ),
    }


@pytest.mark.parametrize(
    "case",
    [
        "lengths",
        "side-missing",
        "side-wrong",
        "missing-file",
        "unreadable-poses",
        "bad-axes",
        "bad-stl",
        "tib-model-alone",
    ],
)
def test_cli_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, case):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    args, expected = _bad_inputs(inputs)[case]
    out = tmp_path / "results" / "kin"
    assert main([*args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and expected in err[0], err
    assert not (tmp_path / "results").exists()


def test_cli_failure_leaves_an_existing_report_untouched(kneel1, tmp_path, capsys):
    out = tmp_path / "kin"
    base = [
        "kinematics",
        "--fem",
        str(kneel1 / "fem.jts"),
        "--tib",
        str(kneel1 / "tib.jts"),
        "--out",
        str(out),
    ]
    assert main([*base, "--side", "right"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    bad = tmp_path / "bad.stl"
    shutil.copy(kneel1 / "KR_right_7_fem.stl", bad)
    bad.write_bytes(bad.read_bytes()[:100])  # truncated
    assert main([*base, "--side", "right", "--fem-model", str(bad)]) == 2
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.stl", "kin"]


def _offline_runs(folder: Path) -> list[Path]:
    return sorted((folder / "wandb").glob("offline-run-*"))


def test_cli_wandb_logs_every_curve_per_frame_and_run_adds_to_a_run_directory(kneel1, tmp_path, capsys):
    """``--wandb``: the same curves as kinematics.csv in the offline W&B run (step = frame) and the
    plots as images; ``--run DIR``: into that folder's W&B run (the same id, resumed)."""
    from jtml.runs.wandb_offline import read_offline_run

    out = tmp_path / "kin"
    args = ["kinematics", "--fem", str(kneel1 / "fem.jts"), "--tib", str(kneel1 / "tib.jts"),
            "--side", "right"]  # fmt: skip
    assert main([*args, "--out", str(out), "--wandb", "jtml-test"]) == 0
    assert "logged" in capsys.readouterr().out
    (folder,) = _offline_runs(out)
    run = read_offline_run(folder)
    k = kin.knee_kinematics(read_poses(kneel1 / "fem.jts"), read_poses(kneel1 / "tib.jts"), "right")
    for column in (kin.FLEXION, kin.ABDUCTION, kin.INTERNAL, kin.GS_AP):
        series = run.series(f"kinematics/{column}")
        assert len(series) == 3, column
        np.testing.assert_allclose([v for _, v in series], k[column], atol=1e-9, err_msg=column)
    steps = [h["trainer/global_step"] for h in run.history if f"kinematics/{kin.FLEXION}" in h]
    assert steps == [0, 1, 2]
    (images,) = [h for h in run.history if "kinematics/plots/count" in h]
    assert images["kinematics/plots/count"] == 3  # no models: rotations, translations, Grood & Suntay
    assert len(list(folder.glob("files/media/images/kinematics/*.png"))) == 3
    assert run.config["side"] == "right"
    # --run: the curves of a second pair go into that run directory's run (resumed, same id)
    again = tmp_path / "again"
    assert main([*args, "--out", str(again), "--run", str(out)]) == 0
    folders = _offline_runs(out)
    # the folder name is not the id: a resume within the same second is named ``…-<id>-1``
    assert len(folders) == 2 and len({read_offline_run(f).run_id for f in folders}) == 1
    assert not (again / "wandb").exists()
    # --run without a W&B run: one error, nothing written
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([*args, "--out", str(tmp_path / "none"), "--run", str(empty)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds no W&B run" in err[0] and str(empty) in err[0]
    assert not (tmp_path / "none").exists()
