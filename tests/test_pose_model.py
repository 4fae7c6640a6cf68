"""Pose data and network: parameterisation, exact augmentation, refusals, a tiny fit, CLI and predict."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from jtml.data.pose import FluoroPoseDataModule
from jtml.errors import JTMLError
from jtml.geometry import Camera, SilhouetteRenderer, euler312_to_matrix, render_silhouette, symmetric_twin
from jtml.geometry.knee import resolve_tibia_twin, varus_valgus
from jtml.geometry.roi import crop_roi, in_plane_rotation_matrix, rotate_pose_in_plane
from jtml.io import Calibration, read_calibration, read_image, read_poses, read_stl, write_poses
from jtml.models.parameterisation import decode_pose, encode_pose, ray_rotation
from jtml.models.pose import PoseModule
from jtml.sim.implants import procedural_models
from jtml.sim.synth import generate_study

pytestmark = pytest.mark.filterwarnings("ignore:.*(does not have many workers|LeafSpec|log_every_n_steps).*")
ROOT = Path(__file__).resolve().parents[1]
# An off-centre fluoroscope (principal point offsets), so sign errors in u0/v0 cannot hide.
CAM = Camera(pd=1198.0, xo=30.0, yo=-20.0, pp=0.373 * 4, width=256, height=256)
POSE = np.array([15.0, -10.0, -1000.0, -35.0, 6.0, -8.0])


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0.5, b > 0.5
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


def tiny_dm(**kw) -> FluoroPoseDataModule:
    base = dict(parts=["fem", "tib"], render=True, roi_size=32, train_samples=8, val_samples=4, batch_size=4)
    base.update(num_workers=0, image_size=256)
    return FluoroPoseDataModule(**{**base, **kw})


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    """A 4-frame 128² synthetic study of the procedural implants (frames, masks, poses, STLs)."""
    return generate_study(tmp_path_factory.mktemp("synth") / "s1", frames=4, seed=3, size=128, progress=False)


# -- parameterisation --------------------------------------------------------------------------------------


def random_batch(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = np.random.default_rng(seed)
    pose = np.column_stack(
        [
            g.uniform(-80, 80, n),
            g.uniform(-80, 80, n),
            g.uniform(-1100, -900, n),
            g.uniform(-180, 180, n),
            g.uniform(-40, 40, n),
            g.uniform(-40, 40, n),
        ]
    )
    cams = np.tile([1198.0, 30.0, -20.0, 0.373, 1024, 1024], (n, 1))
    roi = np.column_stack([g.uniform(200, 800, n), g.uniform(200, 800, n), g.uniform(150, 350, n)])
    return torch.from_numpy(pose), torch.from_numpy(roi), torch.from_numpy(cams)


def test_encode_decode_roundtrip_and_resolution_independence():
    pose, roi, cam = random_batch(64, 0)
    t = encode_pose(pose, roi, cam, 100.0)
    back = decode_pose(t["offset"], t["log_depth"], t["rotation"], roi, cam, 100.0)
    d = back - pose
    d[:, 3:] = (d[:, 3:] + 180) % 360 - 180
    assert d.abs().max() < 1e-8
    # the same fluoroscope imaged onto 256² pixels: ROI and pixel size scale, targets do not change
    cam4 = cam.clone()
    cam4[:, 3] *= 4
    cam4[:, 4:] /= 4
    t4 = encode_pose(pose, roi / 4, cam4, 100.0)
    for k in ("offset", "log_depth", "rotation"):
        assert torch.allclose(t[k], t4[k], atol=1e-10), k
    # non-allocentric is the camera-frame rotation itself; allocentric differs off-axis
    plain = encode_pose(pose, roi, cam, 100.0, allocentric=False)
    assert torch.allclose(plain["rotation"], euler312_to_matrix(pose[:, 3:]))
    assert (plain["rotation"] - t["rotation"]).abs().max() > 0.05


def test_ray_rotation_points_the_axis_along_the_ray():
    _, roi, cam = random_batch(16, 1)
    R = ray_rotation(roi[:, :2], cam)
    axis = R @ torch.tensor([0.0, 0.0, -1.0], dtype=torch.float64)
    z = torch.full((16,), -1000.0, dtype=torch.float64)
    c = Camera(1198.0, 30.0, -20.0, 0.373, 1024, 1024)
    ray = c.backproject(roi[:, :2], z)
    assert torch.allclose(axis, ray / ray.norm(dim=-1, keepdim=True), atol=1e-12)
    assert torch.allclose(
        R.transpose(1, 2) @ R, torch.eye(3, dtype=torch.float64).expand(16, 3, 3), atol=1e-12
    )
    # at the principal point the ray is the axis: no rotation
    u0, v0 = c.principal_point
    centre = ray_rotation(torch.tensor([[u0, v0]], dtype=torch.float64), cam[:1])
    assert torch.allclose(centre[0], torch.eye(3, dtype=torch.float64), atol=1e-12)


def test_in_plane_rotation_is_exact_and_its_sign_right():
    """Turning the image about the principal point = rendering the rotated pose (R' = Rz·R, t' = Rz·t)."""
    r = SilhouetteRenderer(procedural_models()["fem"], CAM)
    ref = r.render(POSE).astype(np.float32)
    for theta in (25.0, -40.0):
        turned = cv2.warpAffine(
            ref, in_plane_rotation_matrix(CAM, theta), (256, 256), flags=cv2.INTER_NEAREST
        )
        rendered = r.render(rotate_pose_in_plane(POSE, theta))
        assert dice(turned, rendered) > 0.97
        assert dice(turned, r.render(rotate_pose_in_plane(POSE, -theta))) < 0.6  # the wrong sign
    # the principal point is the fixed point: about the image centre instead it misses
    off = cv2.getRotationMatrix2D((127.5, 127.5), 25.0, 1.0)
    turned = cv2.warpAffine(ref, off, (256, 256), flags=cv2.INTER_NEAREST)
    assert dice(turned, r.render(rotate_pose_in_plane(POSE, 25.0))) < 0.9


# -- data --------------------------------------------------------------------------------------------------


def test_rendered_samples_are_exact_deterministic_and_fresh():
    dm = tiny_dm(roi_jitter=[0.05, 0.1], calibration=None)
    dm.setup("fit")
    cam = dm.camera
    meshes = procedural_models()
    batch = next(iter(dm.train_dataloader()))
    assert batch["roi_mask"].shape == (4, 1, 32, 32) and "roi_image" not in batch
    # sample i shows parts[i % 2]; the shuffled epoch holds each part train_samples / 2 times
    epoch_parts = torch.cat([b["part"] for b in dm.train_dataloader()])
    assert sorted(epoch_parts.tolist()) == [0, 0, 0, 0, 1, 1, 1, 1]
    assert batch["pose"].dtype == torch.float64 and bool(batch["valid"].all())
    for i in range(4):
        part = dm.parts[int(batch["part"][i])]
        full = SilhouetteRenderer(meshes[part], cam).render(batch["pose"][i].numpy()).astype(np.float32)
        u, v, side = batch["roi"][i].tolist()
        box = (round(u - side / 2), round(v - side / 2), round(side))
        assert np.allclose(crop_roi(full, box, 32), batch["roi_mask"][i, 0].numpy(), atol=1e-6)
    val = [torch.cat([b["pose"] for b in dm.val_dataloader()]) for _ in range(2)]
    assert torch.equal(val[0], val[1])  # fixed validation renders
    train = [torch.cat([b["pose"] for b in dm.train_dataloader()]) for _ in range(2)]
    assert not torch.equal(train[0], train[1])  # fresh training poses every epoch


def test_file_samples_with_rotation_keep_the_label(study):
    dm = FluoroPoseDataModule(
        parts=["fem", "tib"],
        input="both",
        studies=[str(study)],
        roi_size=48,
        rotation_range=60.0,
        roi_jitter=[0.05, 0.05],
        train_transforms=[{"name": "RandomGamma", "params": {"p": 1.0}}],
        val_fraction=0.25,
        test_fraction=0.0,
        batch_size=4,
        num_workers=0,
    )
    dm.setup("fit")
    cam = Camera.from_calibration(Calibration(**_calib(study)), 128, 128)
    meshes = procedural_models()
    torch.manual_seed(0)  # the augmentation draws from torch's generator: fix the angles drawn
    batch = next(iter(dm.train_dataloader()))
    assert batch["roi_image"].shape == batch["roi_mask"].shape == (4, 1, 48, 48)  # 3 frames x 2 parts
    assert float(batch["roi_image"].min()) == 0.0 and float(batch["roi_image"].max()) == 1.0
    truth = {p: read_poses(study / f"{p}.jts") for p in ("fem", "tib")}
    rotated = checked = 0
    for i in range(4):
        part = dm.parts[int(batch["part"][i])]
        pose = batch["pose"][i].numpy()
        original = truth[part][int(batch["frame_pos"][i])]
        # the turn: the angle between the translations' in-plane components (t' = Rz(θ)·t)
        theta = np.degrees(np.arctan2(pose[1], pose[0]) - np.arctan2(original[1], original[0]))
        rotated += abs((theta + 180) % 360 - 180) > 0.01
        assert np.allclose(rotate_pose_in_plane(original, theta), pose, atol=1e-6)
        u, v, side = batch["roi"][i].tolist()
        box = (round(u - side / 2), round(v - side / 2), round(side))
        renderer = SilhouetteRenderer(meshes[part], cam)
        right = crop_roi(renderer.render(pose).astype(np.float32), box, 48)
        wrong = crop_roi(renderer.render(rotate_pose_in_plane(original, -theta)).astype(np.float32), box, 48)
        roi = batch["roi_mask"][i, 0].numpy()
        # 128² frames: the implant is ~35 px wide, so resampling costs a few % of Dice
        assert dice(right, roi) > 0.9, i
        if abs((theta + 180) % 360 - 180) >= 15.0:  # turned the other way by ≥ 30°: visibly wrong
            assert dice(wrong, roi) < dice(right, roi) - 0.15, (i, theta)
            checked += 1
    assert rotated == 4 and checked >= 2  # every training sample was turned, and its label with it
    val = next(iter(dm.val_dataloader()))
    for i in range(len(val["pose"])):  # validation samples are not augmented
        expected = truth[dm.parts[int(val["part"][i])]][int(val["frame_pos"][i])]
        assert torch.allclose(val["pose"][i], torch.from_numpy(expected))


def _calib(study: Path) -> dict:
    from jtml.io import read_calibration

    c = read_calibration(study / "calibration.txt")
    return {"pd": c.pd, "xo": c.xo, "yo": c.yo, "pp": c.pp}


# -- refusals ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    [
        [{"name": "HorizontalFlip", "params": {"p": 0.5}}],
        [{"name": "ElasticTransform"}],
        [{"name": "Affine", "params": {"shear": 10}}],
        [
            {
                "name": "OneOf",
                "transforms": [
                    {"name": "GaussNoise"},
                    {"name": "RandomCrop", "params": {"height": 8, "width": 8}},
                ],
            }
        ],
        "lab",
    ],
)
def test_pose_inconsistent_augmentation_is_refused(study, spec):
    with pytest.raises(JTMLError, match="not pose-consistent"):
        FluoroPoseDataModule(studies=[str(study)], input="frame", train_transforms=spec)


def test_bad_configurations_are_one_clear_error(study, tmp_path):
    with pytest.raises(JTMLError, match="calibration file not found") as e:
        tiny_dm(calibration=str(tmp_path / "missing_calibration.txt"))
    assert "missing_calibration.txt" in str(e.value)
    with pytest.raises(JTMLError, match="input: mask"):
        tiny_dm(input="frame")
    with pytest.raises(JTMLError, match="input: mask takes none"):
        FluoroPoseDataModule(studies=[str(study)], train_transforms=[{"name": "GaussNoise"}])
    with pytest.raises(JTMLError, match="behind the X-ray source"):
        tiny_dm(pose_ranges={"sampler": "independent", "depth": [-0.9, -0.8]})
    dm = tiny_dm(pose_ranges={"sampler": "independent", "depth": [0.02, 0.03]})  # far too close: huge
    dm.setup("fit")
    with pytest.raises(JTMLError, match="field of view"):
        dm.train_dataset[0]
    with pytest.raises(JTMLError, match="unknown key"):
        tiny_dm(pose_ranges={"sampler": "independent", "fem": {"yaw": [0, 1]}})
    # a study without calibration.txt, one whose pose file is short, one with a pose off the view
    broken = tmp_path / "broken"
    shutil.copytree(study, broken)
    (broken / "calibration.txt").unlink()
    with pytest.raises(JTMLError, match="no calibration.txt"):  # pose data needs it
        FluoroPoseDataModule(studies=[str(broken)], num_workers=0).setup("fit")
    short = tmp_path / "short"
    shutil.copytree(study, short)
    write_poses(short / "fem.jts", read_poses(study / "fem.jts")[:3])
    with pytest.raises(JTMLError, match="has 3 pose row"):
        FluoroPoseDataModule(studies=[str(short)], num_workers=0).setup("fit")
    away = tmp_path / "away"
    shutil.copytree(study, away)
    poses = read_poses(study / "fem.jts")
    poses[2, 0] += 3000.0
    write_poses(away / "fem.jts", poses)
    with pytest.raises(JTMLError, match="outside the 128x128 field of view") as e:
        FluoroPoseDataModule(studies=[str(away)], num_workers=0, val_fraction=0.0, test_fraction=0.0).setup(
            "fit"
        )
    assert "synth_0002" in str(e.value)


def test_mask_model_refuses_frames(study, tmp_path):
    model = PoseModule(parts=["fem", "tib"], roi_size=32, backbone="resnet10t")
    frame = cv2.imread(str(study / "synth_0000.tif"), cv2.IMREAD_UNCHANGED)
    calib = Calibration(**_calib(study))
    with pytest.raises(JTMLError, match="cannot take frames"):
        model.estimate(frame, calib, "fem")
    with pytest.raises(JTMLError, match="cannot take frames"):
        model.inputs({"roi_image": torch.zeros(1, 1, 32, 32)})
    dm = FluoroPoseDataModule(
        parts=["fem", "tib"], input="frame", studies=[str(study)], roi_size=32, num_workers=0
    )
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, max_steps=1)
    trainer.fit_loop.max_epochs = 1
    with pytest.raises(JTMLError, match="mask model cannot take frames"):
        trainer.fit(model, dm)
    mask = cv2.imread(str(study / "Labels/fem/synth_0000_label_fem.tif"), cv2.IMREAD_UNCHANGED)
    pose = model.estimate(mask, calib, "fem")
    assert pose.shape == (6,) and np.isfinite(pose).all() and pose[2] < 0
    assert np.isnan(model.estimate(np.zeros_like(mask), calib, "fem")).all()


# -- a tiny fit, checkpoints --------------------------------------------------------------------------------


def test_fit_lowers_the_loss_and_checkpoint_roundtrip(tmp_path):
    pl.seed_everything(0)
    # the synthetic studies' in-plane angles (the default, the full circle, takes longer to learn)
    ranges = {"sampler": "knee", "in_plane": [-95, 35]}
    dm = tiny_dm(roi_size=48, train_samples=192, val_samples=32, batch_size=16, pose_ranges=ranges)
    model = PoseModule(
        parts=["fem", "tib"],
        backbone="resnet10t",
        roi_size=48,
        head_hidden=64,
        trap_aware_loss=True,
        optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3),
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=5,
        logger=False,
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    before = trainer.validate(model, dm, verbose=False)[0]
    trainer.fit(model, dm)
    after = trainer.validate(model, dm, verbose=False)[0]
    assert after["val/loss"] < 0.8 * before["val/loss"], (before["val/loss"], after["val/loss"])
    assert after["val/fem/z_median"] < before["val/fem/z_median"]
    assert "val/tib/mtre_mean" in after and "val/trap_geodesic_median" in after
    ckpt = tmp_path / "pose.ckpt"
    trainer.save_checkpoint(ckpt)
    loaded = PoseModule.load_from_checkpoint(ckpt)  # weights_only, no network, no STL files
    assert loaded.parts == ["fem", "tib"] and loaded.trap_aware_loss
    assert set(loaded._vertices) == {"fem", "tib"} and loaded.val_metrics["fem"].vertices is not None
    batch = next(iter(dm.val_dataloader()))
    model.eval(), loaded.eval()
    with torch.no_grad():
        a = model.decode(model(*model.inputs(batch)), batch)
        b = loaded.decode(loaded(*loaded.inputs(batch)), batch)
    assert torch.equal(a, b)


def test_checkpoints_of_the_old_layout_load_and_resume(tmp_path):
    """Checkpoints written before the network became ``PoseModule.net`` (keys ``backbone.*``,
    ``neck.*``, ``head.*``) load with the same outputs, and a fit resumes from them."""
    pl.seed_everything(0)
    dm = tiny_dm(roi_size=32, train_samples=8, val_samples=4, batch_size=4)

    def fit(model: PoseModule, max_steps: int, ckpt_path: Path | None = None) -> pl.Trainer:
        trainer = pl.Trainer(
            accelerator="cpu", max_steps=max_steps, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        )  # fmt: skip
        trainer.fit(model, dm, ckpt_path=ckpt_path)
        return trainer

    model = PoseModule(parts=["fem", "tib"], backbone="resnet10t", roi_size=32, head_hidden=32)
    trainer = fit(model, 2)
    new = tmp_path / "new.ckpt"
    trainer.save_checkpoint(new)
    ckpt = torch.load(new, map_location="cpu", weights_only=True)
    assert {k.split(".")[0] for k in ckpt["state_dict"]} == {"net"}
    ckpt["state_dict"] = {k.removeprefix("net."): v for k, v in ckpt["state_dict"].items()}
    assert {k.split(".")[0] for k in ckpt["state_dict"]} == {"backbone", "neck", "head"}
    old = tmp_path / "old.ckpt"
    torch.save(ckpt, old)
    loaded = PoseModule.load_from_checkpoint(old).eval()
    batch = next(iter(dm.val_dataloader()))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(*model.inputs(batch)), loaded(*loaded.inputs(batch)))
    resumed = PoseModule(parts=["fem", "tib"], backbone="resnet10t", roi_size=32, head_hidden=32)
    trainer = fit(resumed, 3, ckpt_path=old)  # the optimizer state restores onto the same parameters
    assert trainer.global_step == 3
    assert not torch.equal(resumed.net.head.weight, loaded.net.head.weight)


def test_compile_option_compiles_the_network_in_place():
    """``compile`` (the quick ``eager`` backend here) compiles ``net`` in place: same outputs, same keys."""
    torch.manual_seed(0)
    model = PoseModule(parts=["fem", "tib"], backbone="resnet10t", roi_size=32, compile={"backend": "eager"})
    eager = PoseModule(parts=["fem", "tib"], backbone="resnet10t", roi_size=32).eval()
    eager.load_state_dict(model.state_dict())
    torch._dynamo.reset()
    model.configure_model()
    assert model.net._compiled_call_impl is not None and list(model.state_dict()) == list(eager.state_dict())
    model.eval()
    x, part, bbox = torch.rand(2, 1, 32, 32), torch.tensor([0, 1]), torch.rand(2, 4)
    with torch.no_grad():
        torch.testing.assert_close(model(x, part, bbox), eager(x, part, bbox))
    with pytest.raises(JTMLError, match="compile"):
        PoseModule(parts=["fem"], backbone="resnet10t", roi_size=32, compile="yes")


# -- LightningCLI: both experiment YAMLs, and predict writing JointTrack files ------------------------------


def _tiny_overrides(tmp_path: Path, study: Path) -> list[str]:
    return [
        "--trainer.default_root_dir",
        str(tmp_path / "runs"),
        "--trainer.logger",
        "false",
        "--trainer.enable_progress_bar",
        "false",
        "--model.init_args.backbone",
        "resnet10t",
        "--model.init_args.roi_size",
        "32",
        "--data.init_args.roi_size",
        "32",
        "--data.init_args.train_samples",
        "8",
        "--data.init_args.val_samples",
        "4",
        "--data.init_args.batch_size",
        "4",
        "--data.init_args.num_workers",
        "0",
        "--data.init_args.synthetic",
        "null",
        "--data.init_args.studies",
        f"[{study}]",
    ]


@pytest.mark.parametrize("yaml", ["demo_pose.yaml", "pose_from_mask.yaml"])
def test_experiment_yamls_fit_and_predict_jointtrack_files(yaml, tmp_path, study, capsys, monkeypatch):
    from jtml.cli import main

    monkeypatch.chdir(tmp_path)
    config = str(ROOT / "experiments" / yaml)
    args = _tiny_overrides(tmp_path, study)
    assert main(["fit", "--config", config, "--trainer.fast_dev_run", "1", *args]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert Path(summary["checkpoint"]).is_file() and np.isfinite(summary["metrics"]["train/loss"])
    assert main(["predict", "--config", config, "--ckpt_path", summary["checkpoint"], *args]) == 0
    captured = capsys.readouterr()
    (line,) = captured.out.splitlines()  # stdout: the JSON summary alone; the writer speaks on stderr
    assert Path(json.loads(line)["run_dir"]).is_dir()
    for part in ("fem", "tib"):
        (written,) = (tmp_path / "runs").glob(f"{Path(yaml).stem}/*/predictions/{study.name}/{part}.jts")
        assert f"wrote {written}" in captured.err
        poses = read_poses(written, n_frames=4)  # one row per frame, JointTrack's format
        assert np.isfinite(poses).all() and (poses[:, 2] < 0).all()
    # report.csv: per frame and part the written pose's silhouette IoU against the input mask (checked
    # here by rendering it independently), and for the tibia which of the pose and its twin was written
    report = list(csv.DictReader(written.with_name("report.csv").open()))
    frames = sorted(f.stem for f in study.glob("*.tif"))
    assert sorted((r["frame"], r["part"]) for r in report) == sorted(
        (f, p) for f in frames for p in ("fem", "tib")
    )
    calib = read_calibration(study / "calibration.txt")
    for r in report:
        pose = read_poses(written.with_name(f"{r['part']}.jts"))[frames.index(r["frame"])]
        mask = read_image(study / "Labels" / r["part"] / f"{r['frame']}_label_{r['part']}.tif") > 0
        model = next(study.glob(f"*{r['part']}.stl"))
        render = render_silhouette(read_stl(model), pose, Camera.from_calibration(calib, 128, 128))
        iou = (render & mask).sum() / (render | mask).sum()
        assert float(r["iou"]) == pytest.approx(iou, abs=1e-6)
        assert r["written"] in ("network", "twin") and r["review"] in ("0", "1")
        if r["part"] == "tib" and r["reason"] == "silhouette":  # the better-matching silhouette was written
            assert float(r["iou"]) > float(r["twin_iou"])
    twins = [r for r in report if r["written"] == "twin"]
    raw = written.with_name("tib_network.jts")
    assert raw.is_file() == bool(twins)


def test_cli_bad_input_is_one_error_line(tmp_path, study, capsys, monkeypatch):
    from jtml.cli import main

    monkeypatch.chdir(tmp_path)
    config = str(ROOT / "experiments" / "pose_from_mask.yaml")
    base = ["fit", "--config", config, *_tiny_overrides(tmp_path, study)]
    cases = [
        (
            ["--data.init_args.calibration", str(tmp_path / "nowhere" / "calibration.txt")],
            "calibration file not found",
        ),
        (
            [
                "--data.init_args.render",
                "false",
                "--data.init_args.pose_ranges",
                "null",
                "--data.init_args.input",
                "frame",
                "--model.init_args.input",
                "both",
            ],
            "contradicts data.init_args.input 'frame'",
        ),
    ]
    for extra, needle in cases:
        assert main([*base, *extra]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
        assert len(err) == 1 and needle in err[0], err
    assert not list((tmp_path / "runs").glob("*/*/checkpoints"))  # failed runs leave no run directory


def test_varus_valgus_rule_undoes_the_tibia_twin(study):
    """JointTrack's rule (keep the tibia twin with the smaller varus-valgus angle to the femur)."""

    fem, tib = read_poses(study / "fem.jts"), read_poses(study / "tib.jts")
    twin = symmetric_twin(tib).numpy()
    assert (np.abs(varus_valgus(fem, tib)) <= 5.0 + 1e-9).all()  # the synthetic knees' varus-valgus range
    out, flipped = resolve_tibia_twin(fem, twin)
    assert flipped.all() and np.allclose(out, tib, atol=1e-9)
    out, flipped = resolve_tibia_twin(fem, tib)
    assert not flipped.any() and np.array_equal(out, tib)
    fem[1] = np.nan  # a frame without a femur pose is left alone
    out, flipped = resolve_tibia_twin(fem, twin)
    assert flipped.tolist() == [True, False, True, True] and np.array_equal(out[1], twin[1])


def test_cpu_threads_callback_gives_the_thread_count_back():
    """A run in the same process after a CPUThreads run (a notebook, this suite) keeps its own thread
    count: the count changes float summation order, so a leak made later runs irreproducible."""
    from types import SimpleNamespace

    from jtml.callbacks.system import CPUThreads

    before = torch.get_num_threads()
    cb = CPUThreads(num_threads=2 if before == 1 else 1)
    trainer, module = SimpleNamespace(datamodule=None), SimpleNamespace(device=torch.device("cpu"))
    try:
        cb.setup(trainer, module, "fit")
        assert torch.get_num_threads() == cb.num_threads != before
        cb.teardown(trainer, module, "fit")
        assert torch.get_num_threads() == before
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("hardware", [True, False])
def test_cpu_threads_warns_of_bf16_on_a_cpu_that_emulates_it(monkeypatch, hardware):
    """bf16-mixed (the pose YAMLs') is ~9× slower than float32 where the CPU emulates bf16: the run
    says so and how to avoid it; where the CPU has it, or with float32, nothing is said."""
    import warnings
    from types import SimpleNamespace

    from jtml.callbacks import system

    monkeypatch.setattr(system, "cpu_has_bf16", lambda: hardware)
    before = torch.get_num_threads()
    module = SimpleNamespace(device=torch.device("cpu"))
    try:
        for precision in ("bf16-mixed", "32-true"):
            cb = system.CPUThreads(num_threads=1)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                cb.setup(SimpleNamespace(datamodule=None, precision=precision), module, "fit")
            said = [str(w.message) for w in caught if "bf16" in str(w.message)]
            if precision == "bf16-mixed" and not hardware:
                assert len(said) == 1 and "--trainer.precision 32-true" in said[0], said
            else:
                assert said == [], said
    finally:
        torch.set_num_threads(before)
