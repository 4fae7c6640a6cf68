"""Training distributions that cover real studies: either knee side, any in-plane angle, ranges from
tracked frames, segmentation-like masks — and what a prediction says when the side is wrong."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from jtml.data.degrade import MaskDegradation, degrade_mask
from jtml.data.pose import FluoroPoseDataModule
from jtml.errors import JTMLError
from jtml.geometry import Camera, SilhouetteRenderer
from jtml.geometry.knee import KneeRanges, knee_angles, mirror_mesh, mirror_pose_rows
from jtml.geometry.sampling import PoseSampler
from jtml.io import read_calibration, read_image, read_stl
from jtml.io.study import label_path, load_study
from jtml.sim.implants import procedural_models

CAM = Camera(pd=1198.0, xo=30.0, yo=-20.0, pp=0.373 * 4, width=256, height=256)  # off-centre


def in_range(a: np.ndarray, r: tuple[float, float]) -> bool:
    return bool(((a >= r[0] - 1e-9) & (a <= r[1] + 1e-9)).all())


# -- the mirror image of a knee ------------------------------------------------------------------------------


@pytest.mark.parametrize("calibration", ["calibration.txt", "calibration_offset60.txt"])
def test_a_mirrored_knee_renders_the_flipped_labels_exactly(kneel1, calibration):
    """Left implants (x -> -x, the lab's) at the mirrored poses through the calibration with xo negated render
    kneel1's true labels flipped left-right, to the pixel; mirror_pose_rows is its own inverse."""
    study = load_study(kneel1)
    calib = read_calibration(kneel1 / calibration)
    cam = Camera.from_calibration(calib, 1024, 1024)
    left_cam = Camera(cam.pd, -cam.xo, cam.yo, cam.pp, 1024, 1024)
    for part in ("fem", "tib"):
        poses = study.read_poses(part)
        left = mirror_pose_rows(poses)
        assert np.allclose(mirror_pose_rows(left), poses, atol=1e-9)
        right_r = SilhouetteRenderer(read_stl(study.models[part]), cam)
        left_r = SilhouetteRenderer(mirror_mesh(read_stl(study.models[part])), left_cam)
        for i, frame in enumerate(study.frames):
            truth = right_r.render(poses[i])
            if calibration == "calibration.txt":
                assert (truth == (read_image(label_path(kneel1, part, frame)) > 0)).all()
            assert (left_r.render(left[i]) == truth[:, ::-1]).all()
    # the knee itself is unchanged; in the left implants' frames flexion and axial rotation change sign
    # (the lab's left-knee rule), the varus-valgus angle does not
    fem, tib = study.read_poses("fem"), study.read_poses("tib")
    left = knee_angles(mirror_pose_rows(fem), mirror_pose_rows(tib))
    assert np.allclose(knee_angles(fem, tib) * [-1, 1, -1], left, atol=1e-9)


def _knees(side: str, n: int, seed: int = 0, ranges: dict | None = None):
    meshes = dict(procedural_models())
    if side == "left":
        meshes = {p: mirror_mesh(m) for p, m in meshes.items()}
    sampler = PoseSampler({"sampler": "knee", **(ranges or {})}, meshes, CAM, side=side)
    rng = np.random.default_rng(seed)
    return sampler, meshes, [sampler.knee(rng) for _ in range(n)]


@pytest.mark.parametrize("side", ["right", "left"])
def test_knee_sampler_draws_the_side_asked_for_inside_the_frame(side):
    sampler, meshes, knees = _knees(side, 40)
    fem, tib = np.stack([k["fem"] for k in knees]), np.stack([k["tib"] for k in knees])
    right = (mirror_pose_rows(fem), mirror_pose_rows(tib)) if side == "left" else (fem, tib)
    angles = knee_angles(*right)
    r = sampler.knee_ranges
    assert (
        in_range(angles[:, 0], r.flexion)
        and in_range(angles[:, 1], r.varus)
        and in_range(angles[:, 2], r.axial)
    )
    # the femur at any in-plane angle (the full circle is the default), tilts as the ranges say
    assert right[0][:, 3].min() < -120 and right[0][:, 3].max() > 120
    assert in_range(right[0][:, 4], r.tilt_x) and in_range(right[0][:, 5], r.tilt_y)
    for k in knees[:8]:  # both implants render inside the frame
        for part in ("fem", "tib"):
            m = SilhouetteRenderer(meshes[part], CAM).render(k[part])
            assert m.any() and not (m[0].any() or m[-1].any() or m[:, 0].any() or m[:, -1].any())
    if side == "left":  # in the left implants' frames flexion and axial rotation change sign
        assert np.allclose(knee_angles(fem, tib), angles * [-1, 1, -1], atol=1e-9)


def test_side_both_draws_each_side_and_bad_sides_are_refused():
    sampler, _, knees = _knees("both", 40, seed=1)
    fem, tib = np.stack([k["fem"] for k in knees]), np.stack([k["tib"] for k in knees])
    right = knee_angles(fem, tib)[:, 0] > 0  # flexion is negative in a left knee's raw angles
    left = knee_angles(mirror_pose_rows(fem), mirror_pose_rows(tib))[:, 0] > 0
    assert (right != left).all() and 5 < right.sum() < 35
    with pytest.raises(JTMLError, match="side must be one of"):
        PoseSampler({"sampler": "knee"}, dict(procedural_models()), CAM, side="up")
    with pytest.raises(JTMLError, match="side must be one of"):
        FluoroPoseDataModule(parts=["fem"], render=True, side="up", image_size=64, num_workers=0)


def test_knee_ranges_given_or_from_tracked_frames(kneel1, tmp_path):
    _, _, knees = _knees("right", 30, ranges={"flexion": [10, 20], "in_plane": [40, 50]})
    fem, tib = np.stack([k["fem"] for k in knees]), np.stack([k["tib"] for k in knees])
    assert in_range(knee_angles(fem, tib)[:, 0], (10, 20)) and in_range(fem[:, 3], (40, 50))
    # from a study's pose files: the angles its frames span, plus the margin; in-plane stays free
    study = load_study(kneel1)
    spec = {"from": {"fem": str(study.poses["fem"]), "tib": str(study.poses["tib"])}, "margin": 5}
    sampler = PoseSampler({"sampler": "knee", **spec}, dict(procedural_models()), CAM)
    r, a = sampler.knee_ranges, knee_angles(study.read_poses("fem"), study.read_poses("tib"))
    assert r.flexion == pytest.approx((a[:, 0].min() - 5, a[:, 0].max() + 5))
    assert r.varus == pytest.approx((a[:, 1].min() - 5, a[:, 1].max() + 5)) and r.in_plane == (-180, 180)
    assert KneeRanges.from_poses(study.read_poses("fem"), study.read_poses("tib"), 1198.0, 0).flexion[0] > 90
    bad = [
        ({"from": {"fem": str(tmp_path / "no.jts"), "tib": str(study.poses["tib"])}}, "no.jts"),
        ({"from": {"fem": str(study.poses["fem"])}}, "needs {fem"),
        ({**spec, "flexion": [0, 10]}, "only margin"),
        ({**spec, "margin": -1}, "margin must be"),
        ({"flexion": [20, 10]}, "low <= high"),
        ({"tilt": [0, 1]}, "unknown key"),
    ]
    for extra, message in bad:
        with pytest.raises(JTMLError, match=message):
            PoseSampler({"sampler": "knee", **extra}, dict(procedural_models()), CAM)
    with pytest.raises(JTMLError, match="give side left or right"):
        PoseSampler({"sampler": "knee", **spec}, dict(procedural_models()), CAM, side="both")
    # the independent sampler's per-part tilt from a pose file
    ind = PoseSampler({"sampler": "independent", "fem": {"from": str(study.poses["fem"]), "margin": 2}},
                      dict(procedural_models()), CAM)  # fmt: skip
    lo, hi = ind.angles["fem"]["x_rot"]
    assert hi - lo == pytest.approx(np.ptp(study.read_poses("fem")[:, 4]) + 4, abs=1e-6)


# -- segmentation-like masks ----------------------------------------------------------------------------


def test_mask_degradation_moves_the_boundary_only_as_far_as_asked(kneel1):
    study = load_study(kneel1)
    frame = study.frames[1]
    fem = read_image(label_path(kneel1, "fem", frame)) > 0
    tib = read_image(label_path(kneel1, "tib", frame)) > 0
    rng = np.random.default_rng(0)
    none = MaskDegradation(p=1.0, boundary_px=0, ragged_px=0, holes=0, overlap=0)
    assert (none(fem, rng) == fem).all()  # no setting: the exact mask back
    import cv2

    inside = cv2.distanceTransform(fem.astype(np.uint8), cv2.DIST_L2, 5)
    outside = cv2.distanceTransform((~fem).astype(np.uint8), cv2.DIST_L2, 5)
    shift = MaskDegradation(p=1.0, boundary_px=2.0, ragged_px=0, holes=0, overlap=0)
    moved = 0
    for _ in range(10):
        out = shift(fem, rng)
        changed = out != fem
        assert (np.maximum(inside, outside)[changed] <= 2.6).all()  # within 2 px (+ the pixel grid)
        if changed.any():  # (a level under half a pixel moves nothing)
            moved += 1
            assert ((out & ~fem).any()) != ((fem & ~out).any())  # a pure dilation or erosion
    assert moved >= 5
    # every kind together: close to the truth, never empty, and different every time
    masks = [degrade_mask(fem, rng, tib) for _ in range(20)]
    ious = [(m & fem).sum() / (m | fem).sum() for m in masks]
    assert 0.75 < min(ious) and max(ious) < 1.0 and len({m.tobytes() for m in masks}) == 20
    # the overlap with the other implant: removed, or the other implant's pixels merged in
    only = MaskDegradation(p=1.0, boundary_px=0, ragged_px=0, holes=0, overlap=1.0)
    both = fem & tib
    if both.any():
        kinds = set()
        for _ in range(12):
            out = only(fem, rng, tib)
            kinds.add("removed" if (out == (fem & ~tib)).all() else "merged" if (out >= fem).all() else "?")
        assert kinds == {"removed", "merged"}
    assert not MaskDegradation()(np.zeros((8, 8), bool), rng).any()


def test_mask_degradation_settings_are_checked():
    assert MaskDegradation.from_config(True) == MaskDegradation()
    assert MaskDegradation.from_config({"holes": 0}).holes == 0
    assert MaskDegradation.from_config(None) is None and MaskDegradation.from_config(False) is None
    for spec, message in [
        ({"hole": 1}, "unknown key"),
        ({"p": 2}, "probabilities"),
        ({"boundary_px": -1}, ">= 0"),
        ("lots", "true, false or a mapping"),
    ]:
        with pytest.raises(JTMLError, match=message):
            MaskDegradation.from_config(spec)
    with pytest.raises(JTMLError, match="needs input: mask"):
        FluoroPoseDataModule(parts=["fem"], input="frame", studies=["unused"], mask_degradation=True)


def test_degraded_training_renders_keep_the_pose_and_differ_from_exact_ones():
    base = dict(parts=["fem", "tib"], render=True, roi_size=32, train_samples=16, val_samples=4,
                batch_size=4, num_workers=0, image_size=256)  # fmt: skip
    exact = FluoroPoseDataModule(**base)
    noisy = FluoroPoseDataModule(**base, mask_degradation={"p": 1.0})
    exact.setup("fit")
    noisy.setup("fit")
    import torch

    differ = 0
    for i in range(8):
        torch.manual_seed(i)
        a = exact.train_dataset[i]
        torch.manual_seed(i)
        b = noisy.train_dataset[i]
        assert torch.equal(a["pose"], b["pose"])  # the same pose: only the input changed
        differ += not torch.equal(a["roi_mask"], b["roi_mask"])
    assert differ >= 6
    v = noisy.val_dataset[0]
    exact.setup("validate")
    assert torch.equal(v["roi_mask"], exact.val_dataset[0]["roi_mask"])  # validation renders stay exact


# -- prediction: registration from the network's pose, and the report ----------------------------------------


def test_refine_settings_are_checked():
    from jtml.callbacks.pose import PosePredictionWriter
    from jtml.registration.frame import RegistrationConfig

    assert PosePredictionWriter(refine={"seed": 3}).refine == RegistrationConfig(seed=3)
    assert PosePredictionWriter(refine=None).refine is None
    stage = {"range": [1, 1, 5, 2, 2, 2], "generations": 2}
    assert PosePredictionWriter(refine={"stages": [stage]}).refine.stages[0].generations == 2
    bad = [({"stage": []}, "unknown registration setting"), ({"stages": []}, "non-empty"),
           ({"stages": [{"range": [1, 2]}]}, "6 positive numbers"), ("fast", "a mapping")]  # fmt: skip
    for spec, message in bad:
        with pytest.raises(JTMLError, match=message):
            PosePredictionWriter(refine=spec)


@pytest.mark.slow
def test_predict_registers_the_network_poses_and_reports_each_frame(tmp_path, capsys, monkeypatch):
    """pose_from_mask.yaml's predict refines every part from the network's pose (and its twin's):
    the written silhouettes match the masks at least as well as the network's, the network's own
    poses are kept, and report.csv says per frame what was done."""
    import csv
    import json
    from pathlib import Path

    from jtml.cli import main
    from jtml.io import read_poses
    from jtml.sim.synth import generate_study

    monkeypatch.chdir(tmp_path)
    study = generate_study(tmp_path / "s", frames=3, seed=5, size=128, progress=False)
    config = str(Path(__file__).resolve().parents[1] / "experiments" / "pose_from_mask.yaml")
    args = ["--trainer.default_root_dir", str(tmp_path / "runs"), "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false", "--data.init_args.roi_size", "32",
            "--data.init_args.train_samples", "8", "--data.init_args.val_samples", "4",
            "--data.init_args.batch_size", "4", "--data.init_args.num_workers", "0",
            "--data.init_args.studies", f"[{study}]"]  # fmt: skip
    assert main(["fit", "--config", config, "--trainer.fast_dev_run", "1", *args]) == 0
    ckpt = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["checkpoint"]
    stage = "{range: [4, 4, 30, 10, 10, 10], population: 8, generations: 6}"
    small = f"{{seed: 0, priors: false, stages: [{stage}]}}"  # the invariant: never worse than its start
    out = tmp_path / "pred"
    pred = ["--ckpt_path", ckpt, "--trainer.callbacks.init_args.out_dir", str(out),
            "--trainer.callbacks.init_args.refine", small]  # fmt: skip
    assert main(["predict", "--config", config, *args, *pred]) == 0
    err = capsys.readouterr().err
    folder = out / study.name
    report = list(csv.DictReader((folder / "report.csv").open()))
    assert len(report) == 6 and {r["refined"] for r in report} == {"1"}
    for r in report:
        assert float(r["cost"]) <= float(r["network_cost"]) + 1e-9  # never worse than its start
        assert int(r["evaluations"]) > 0 and float(r["seconds"]) > 0 and r["written"] in ("network", "twin")
    for part in ("fem", "tib"):
        written, own = read_poses(folder / f"{part}.jts"), read_poses(folder / f"{part}_network.jts")
        assert written.shape == own.shape == (3, 6) and not np.allclose(written, own)
        assert f"registered 3 {part} pose(s)" in err


def test_a_knee_of_the_other_side_is_called_out(kneel1):
    """kneel1 (a right knee) mirrored into a left knee: plausible for a left-trained network's report,
    implausible — with a warning — for a right-trained one."""
    from jtml.callbacks.pose import PosePredictionWriter, _Row

    study = load_study(kneel1)
    fem, tib = (mirror_pose_rows(study.read_poses(p)) for p in ("fem", "tib"))

    def rows(part, poses):
        return {i: _Row("s", part, f"f{i}", i, 3, pose) for i, pose in enumerate(poses)}

    for side, warned in (("left", False), ("right", True), ("both", False)):
        writer = PosePredictionWriter()
        writer.side = side
        f, t = rows("fem", fem), rows("tib", tib)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            writer._check_side("s", f, t)
        said = [str(w.message) for w in caught if "plausible" in str(w.message)]
        assert bool(said) == warned, (side, said)
        assert {r.plausible for r in f.values()} == ({"no"} if warned else {"yes"})
        if warned:
            assert "side: right" in said[0] and "other side" in said[0]
