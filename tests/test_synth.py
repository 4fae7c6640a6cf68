"""``jtml synth``: the synthetic study generator (procedural implants, layout, exact labels)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from jtml import kinematics as kin
from jtml.cli import main
from jtml.errors import JTMLError
from jtml.geometry import Camera, SilhouetteRenderer, euler312_to_matrix, geodesic_angle
from jtml.io import read_calibration, read_image, read_mask, read_stl
from jtml.io.study import load_study
from jtml.sim.implants import procedural_models
from jtml.sim.synth import default_calibration, generate_study, plan_study_sequence

SIZE = 128


def hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "study"
    assert generate_study(out, frames=3, seed=7, size=SIZE) == out
    return out


def check_rerender(root: Path) -> dict[str, list[np.ndarray]]:
    """Re-render every mask from the written poses, STLs and calibration; return the masks."""
    s = load_study(root)
    assert s.parts == ["fem", "tib"]
    assert sorted(s.models) == ["fem", "tib"]
    calib = read_calibration(s.calibration)
    masks: dict[str, list[np.ndarray]] = {}
    for part in s.parts:
        poses = s.read_poses(part)
        assert poses.shape == (len(s.frames), 6)
        renderer = None
        for i, frame in enumerate(s.frames):
            image = read_image(frame)
            assert image.dtype == np.uint8 and image.ndim == 2
            if renderer is None:
                camera = Camera.from_calibration(calib, image.shape[1], image.shape[0])
                renderer = SilhouetteRenderer(read_stl(s.models[part]), camera)
            mask = read_mask(s.labels[part][i], shape=image.shape)
            rendered = renderer.render(poses[i])
            assert int((rendered != mask.astype(bool)).sum()) == 0, f"{part} frame {i} differs"
            masks.setdefault(part, []).append(mask)
    return masks


def test_procedural_implants_are_closed_and_in_the_lab_frames():
    models = procedural_models()
    assert sorted(models) == ["fem", "tib"]
    fem, tib = models["fem"], models["tib"]
    for mesh in (fem, tib):
        assert mesh.is_watertight and mesh.is_winding_consistent and mesh.volume > 0
        assert 1000 < len(mesh.faces) < 20000
    np.testing.assert_allclose(fem.bounds, [[-42, -25, -36], [25, 35, 36]], atol=1.0)
    np.testing.assert_allclose(tib.bounds, [[-24.5, -29.7, -37], [24.5, 3, 37]], atol=1.5)
    again = procedural_models()
    assert np.array_equal(again["fem"].vertices, fem.vertices)
    assert np.array_equal(again["tib"].faces, tib.faces)


def test_layout_and_exact_rerender(study):
    names = sorted(p.name for p in study.iterdir())
    assert names == [
        "Labels",
        "calibration.txt",
        "fem.jts",
        "fem.stl",
        "synth_0000.tif",
        "synth_0001.tif",
        "synth_0002.tif",
        "tib.jts",
        "tib.stl",
    ]
    assert (study / "Labels" / "fem" / "synth_0001_label_fem.tif").is_file()
    calib = read_calibration(study / "calibration.txt")
    assert (calib.pd, calib.xo, calib.yo) == (1198.0, 0.0, 0.0)
    assert calib.pp == pytest.approx(0.373 * 1024 / SIZE)
    masks = check_rerender(study)
    for part, frames in masks.items():
        for mask in frames:
            assert mask.sum() > 50, f"{part} silhouette too small"
            rows, cols = np.nonzero(mask)
            # Fully inside the image, off its border.
            assert rows.min() > 0 and cols.min() > 0
            assert rows.max() < SIZE - 1 and cols.max() < SIZE - 1


def test_frames_look_like_fluoroscopy(study):
    s = load_study(study)
    for i, frame in enumerate(s.frames):
        image = read_image(frame).astype(float)
        fem = read_mask(s.labels["fem"][i]).astype(bool)
        tib = read_mask(s.labels["tib"][i]).astype(bool)
        implants = fem | tib
        background = image[~implants]
        # Dark implants on a lighter, varied background; a dark collimator corner.
        assert np.median(image[implants]) + 40 < np.percentile(background, 75)
        assert background.std() > 15
        assert image[:3, :3].mean() < 40
        # Not a flat render: intensities vary inside the implants too.
        assert image[implants].std() > 1.0


def test_poses_are_plausible_knees(study):
    s = load_study(study)
    fem, tib = s.read_poses("fem"), s.read_poses("tib")
    pd = read_calibration(s.calibration).pd
    for poses in (fem, tib):
        assert np.all((poses[:, 2] < -0.78 * pd) & (poses[:, 2] > -0.97 * pd))
    # Near-lateral view: the femur's out-of-plane tilts are small.
    assert np.all(np.abs(fem[:, 4]) <= 10.0) and np.all(np.abs(fem[:, 5]) <= 10.0)
    # Femur and tibia are a few cm apart (a joint), never far.
    assert np.all(np.linalg.norm(fem[:, :3] - tib[:, :3], axis=1) < 80.0)


def test_same_seed_is_byte_identical_and_other_seed_differs(study, tmp_path):
    again = generate_study(tmp_path / "again", frames=3, seed=7, size=SIZE)
    other = generate_study(tmp_path / "other", frames=3, seed=8, size=SIZE)
    reference = hashes(study)
    assert len(reference) == 14  # 3 frames + 6 masks + 2 poses + 2 STLs + calibration
    assert hashes(again) == reference
    other_hashes = hashes(other)
    assert other_hashes.keys() == reference.keys()
    changed = [k for k in reference if reference[k] != other_hashes[k]]
    # Frames, masks and poses all change; the models and calibration do not.
    assert sorted(changed) == sorted(k for k in reference if not k.endswith((".stl", "calibration.txt")))


def test_cli_writes_study_and_refuses_non_empty_out(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["synth", "--out", str(out), "--frames", "2", "--seed", "3", "--size", "64"]) == 0
    assert str(out) in capsys.readouterr().out
    assert len(load_study(out).frames) == 2
    before = hashes(out)
    assert main(["synth", "--out", str(out), "--frames", "1", "--seed", "4", "--size", "64"]) == 2
    err = capsys.readouterr().err
    assert "not empty" in err and "--overwrite" in err
    assert hashes(out) == before
    # --overwrite replaces the study: the stale second frame and its labels are gone.
    args = ["synth", "--out", str(out), "--frames", "1", "--seed", "4", "--size", "64", "--overwrite"]
    assert main(args) == 0
    s = load_study(out)
    assert [f.name for f in s.frames] == ["synth_0000.tif"]
    assert sorted(p.name for p in (out / "Labels" / "fem").iterdir()) == ["synth_0000_label_fem.tif"]
    check_rerender(out)


def test_frames_zero_fails_cleanly(tmp_path, capsys):
    out = tmp_path / "none"
    assert main(["synth", "--out", str(out), "--frames", "0", "--seed", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "frames" in err[0] and "0" in err[0]
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "kwargs, message",
    [({"size": 16}, "size"), ({"seed": -1}, "seed"), ({"frames": 2.5}, "frames")],
)
def test_bad_arguments_raise(tmp_path, kwargs, message):
    args = {"frames": 1, "seed": 0, "size": SIZE, **kwargs}
    with pytest.raises(JTMLError, match=message):
        generate_study(tmp_path / "x", **args)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("content", [b"", b"this is not an STL at all\n" * 3])
def test_bad_model_names_the_file(tmp_path, capsys, content):
    bad = tmp_path / "broken_fem.stl"
    bad.write_bytes(content)
    out = tmp_path / "out"
    assert main(["synth", "--out", str(out), "--frames", "1", "--seed", "1", "--model", f"fem={bad}"]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err
    assert not out.exists()


def test_malformed_model_option(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["synth", "--out", str(out), "--frames", "1", "--seed", "1", "--model", "fem"]) == 2
    assert "PART=" in capsys.readouterr().err
    assert main(["synth", "--out", str(out), "--frames", "1", "--seed", "1", "--model", "pat=x.stl"]) == 2
    assert "pat" in capsys.readouterr().err
    assert not out.exists()


def test_user_models_and_calibration(kneel1, tmp_path):
    fem_stl, tib_stl = kneel1 / "KR_right_7_fem.stl", kneel1 / "KR_right_6_tib.stl"
    out = tmp_path / "real"
    args = ["synth", "--out", str(out), "--frames", "2", "--seed", "11", "--size", "256"]
    args += [
        "--model",
        f"fem={fem_stl}",
        "--model",
        f"tib={tib_stl}",
        "--calibration",
        str(kneel1 / "calibration.txt"),
    ]
    assert main(args) == 0
    # The written models are the given ones (kneel1's are ASCII STLs: binary float32 rounds them).
    for part, src in (("fem", fem_stl), ("tib", tib_stl)):
        written, given = read_stl(out / f"{part}.stl"), read_stl(src)
        assert written.faces.shape == given.faces.shape
        np.testing.assert_allclose(written.vertices, given.vertices, rtol=0, atol=1e-5)
    # The calibration is kneel1's, rescaled from 1024 to 256 pixels (same field of view).
    given, written = read_calibration(kneel1 / "calibration.txt"), read_calibration(out / "calibration.txt")
    assert (written.pd, written.xo, written.yo) == (given.pd, given.xo, given.yo)
    assert written.pp == pytest.approx(given.pp * 4)
    masks = check_rerender(out)
    assert all(m.sum() > 100 for frames in masks.values() for m in frames)


# --------------------------------------------------------------------------------------------
# Sequences (`jtml synth --sequence`): one smooth knee motion, right or left
# --------------------------------------------------------------------------------------------


def written_plan(root: Path, seed: int, frames: int, side: str):
    """The generator's own plan for a written sequence study, from its STLs and calibration."""
    models = {part: read_stl(root / f"{part}.stl") for part in ("fem", "tib")}
    size = read_image(load_study(root).frames[0]).shape[0]
    camera = Camera.from_calibration(read_calibration(root / "calibration.txt"), size, size)
    return plan_study_sequence(seed, frames, models, camera, side)


@pytest.fixture(scope="module")
def sequences(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sequence")
    out = {}
    for side in ("right", "left"):
        out[side] = generate_study(root / side, frames=5, seed=21, size=SIZE, sequence=True, side=side)
    return out


def test_sequence_layout_rerender_and_flexion_truth(sequences):
    root = sequences["right"]
    assert sorted(p.name for p in root.iterdir()) == [
        "Labels",
        "calibration.txt",
        "fem.jts",
        "fem.stl",
        *[f"synth_000{i}.tif" for i in range(5)],
        "tib.jts",
        "tib.stl",
    ]
    check_rerender(root)
    s = load_study(root)
    fem, tib = s.read_poses("fem"), s.read_poses("tib")
    plan = written_plan(root, 21, 5, "right")
    np.testing.assert_array_equal(fem, [k.fem for k in plan.knees])  # the poses written are the plan's
    np.testing.assert_array_equal(tib, [k.tib for k in plan.knees])
    # 0 -> 90 -> 0 degrees, a raised cosine; recovered from the .jts files by jtml.kinematics.
    t = np.linspace(0.0, 1.0, 5)
    np.testing.assert_allclose(plan.motion.flexion, 45.0 * (1 - np.cos(2 * np.pi * t)), atol=1e-12)
    k = kin.knee_kinematics(fem, tib, "right", fem_model=read_stl(root / "fem.stl"))
    np.testing.assert_allclose(k[kin.FLEXION], plan.motion.flexion, rtol=0, atol=1e-6)
    np.testing.assert_allclose(k[kin.ABDUCTION], plan.motion.abduction, rtol=0, atol=1e-6)
    np.testing.assert_allclose(k[kin.INTERNAL], plan.motion.internal, rtol=0, atol=1e-6)
    np.testing.assert_allclose(k[kin.GS_FLEXION], plan.motion.flexion, rtol=0, atol=1e-6)
    # Plausible coupling: the tibia rotates internally and the femur rolls back as the knee flexes.
    assert k[kin.INTERNAL][2] - k[kin.INTERNAL][0] > 4.0
    for half in ("medial", "lateral"):
        assert k[f"{half}_ap_mm(+ant)"][2] < k[f"{half}_ap_mm(+ant)"][0] - 3.0
    # One look for the whole study: the dark collimator corner and the field's brightness stay put.
    images = [read_image(f).astype(float) for f in s.frames]
    assert max(abs(im.mean() - images[0].mean()) for im in images) < 0.1 * images[0].mean()


def test_sequence_poses_are_smooth():
    """60 frames (planned, not rendered): per-frame rotation and translation steps are small and
    change little from one frame to the next; the view drifts only a little."""
    camera = Camera.from_calibration(default_calibration(SIZE), SIZE, SIZE)
    plan = plan_study_sequence(4, 60, procedural_models(), camera)
    assert plan.motion.flexion.max() == pytest.approx(90.0, abs=0.1)
    for part in ("fem", "tib"):
        rows = np.array([getattr(k, part) for k in plan.knees])
        R = euler312_to_matrix(rows[:, 3:])
        step = np.rad2deg(geodesic_angle(R[:-1], R[1:]).numpy())
        assert step.max() < 3.5 and np.abs(np.diff(step)).max() < 0.4, part
        assert np.linalg.norm(np.diff(rows[:, :3], axis=0), axis=1).max() < 2.0, part
        assert np.abs(np.diff(rows[:, :3], 2, axis=0)).max() < 0.25, part
    fem = np.array([k.fem for k in plan.knees])
    assert np.ptp(fem[:, 4]) < 5.0 and np.ptp(fem[:, 5]) < 5.0  # out-of-plane tilt drift
    assert np.ptp(fem[:, 2]) < 7.0  # depth drift (mm)


def test_left_sequence_is_the_mirror_of_the_right(sequences):
    right, left = sequences["right"], sequences["left"]
    for part in ("fem", "tib"):
        r, lm = read_stl(right / f"{part}.stl"), read_stl(left / f"{part}.stl")
        # Every triangle mirrored x -> -x and re-wound, so it still faces outwards.
        np.testing.assert_array_equal(lm.triangles, (r.triangles * np.array([-1.0, 1.0, 1.0]))[:, ::-1])
        assert lm.volume > 0
    S = np.array([-1.0, 1.0, 1.0, -1.0, 1.0, -1.0])  # (x, z_rot, y_rot) change sign
    sr, sl = load_study(right), load_study(left)
    for part in ("fem", "tib"):
        np.testing.assert_allclose(sl.read_poses(part), sr.read_poses(part) * S, rtol=0, atol=1e-9)
    # Clinically the same knee motion on both sides.
    kr = kin.knee_kinematics(
        sr.read_poses("fem"), sr.read_poses("tib"), "right", fem_model=read_stl(right / "fem.stl")
    )
    kl = kin.knee_kinematics(
        sl.read_poses("fem"), sl.read_poses("tib"), "left", fem_model=read_stl(left / "fem.stl")
    )
    for column in kr:
        np.testing.assert_allclose(kl[column], kr[column], rtol=0, atol=1e-6, err_msg=column)
    np.testing.assert_allclose(kl[kin.FLEXION], written_plan(left, 21, 5, "left").motion.flexion, atol=1e-6)
    check_rerender(left)
    # The principal point is the image centre: a left frame is a right frame seen in a mirror.
    for i in range(5):
        for part in ("fem", "tib"):
            ml, mr = read_mask(sl.labels[part][i]), read_mask(sr.labels[part][i])
            assert (ml != np.fliplr(mr)).sum() <= 2, (part, i)  # pixel-centre ties at most
        a = read_image(sl.frames[i]).astype(float).ravel()
        b = read_image(sr.frames[i]).astype(float)
        assert np.corrcoef(a, np.fliplr(b).ravel())[0, 1] > 0.9
        assert np.corrcoef(a, np.fliplr(b).ravel())[0, 1] > np.corrcoef(a, b.ravel())[0, 1] + 0.03


def test_sequence_cli_same_seed_same_bytes_and_bad_side(tmp_path, capsys):
    args = ["synth", "--sequence", "--frames", "2", "--seed", "9", "--size", "64", "--side", "left"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert "left knee" in capsys.readouterr().out
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    assert hashes(tmp_path / "a") == hashes(tmp_path / "b")
    assert len(hashes(tmp_path / "a")) == 2 + 4 + 2 + 2 + 1
    bad = ["synth", "--frames", "2", "--seed", "9", "--size", "64"]
    assert main([*bad, "--sequence", "--side", "up", "--out", str(tmp_path / "c")]) == 2
    assert "side must be" in capsys.readouterr().err
    assert main([*bad, "--side", "left", "--out", str(tmp_path / "d")]) == 2
    assert "--sequence" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]
