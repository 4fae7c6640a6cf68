"""The notebook API (`jtml.api`) gives what the commands give: the same masks as `jtml predict`, the
same poses as the pose writer's `.jts`, the same scores as `jtml score-poses`."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import numpy as np
import pytest

from jtml import api
from jtml.errors import JTMLError
from jtml.io import list_images, read_image, read_mask, read_poses, read_stl
from jtml.sim.synth import generate_study

matplotlib.use("Agg")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    return generate_study(tmp_path_factory.mktemp("api") / "s1", frames=4, seed=5, size=128, progress=False)


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory, study) -> dict:
    tmp = tmp_path_factory.mktemp("seg")
    return api.run(
        "fit", ROOT / "experiments" / "demo_seg.yaml",
        "--trainer.default_root_dir", tmp / "runs", "--trainer.max_epochs", "1", "--trainer.logger", "false",
        "--data.init_args.synthetic", "null", "--data.init_args.studies", f"[{study}]",
        "--data.init_args.image_size", "64", "--data.init_args.batch_size", "2",
        "--data.init_args.num_workers", "0", "--data.init_args.val_fraction", "0.25",
    )  # fmt: skip


@pytest.fixture(scope="module")
def pose_run(tmp_path_factory, study) -> dict:
    tmp = tmp_path_factory.mktemp("pose")
    return api.run(
        "fit", ROOT / "experiments" / "pose_from_mask.yaml",
        "--trainer.default_root_dir", tmp / "runs", "--trainer.fast_dev_run", "1",
        "--trainer.logger", "false", "--model.init_args.backbone", "resnet10t",
        "--data.init_args.roi_size", "32",
        "--data.init_args.train_samples", "8", "--data.init_args.val_samples", "4",
        "--data.init_args.batch_size", "4", "--data.init_args.num_workers", "0",
        "--data.init_args.synthetic", "null", "--data.init_args.studies", f"[{study}]",
        "--data.init_args.models", json.dumps({p: str(study / f"{p}.stl") for p in ("fem", "tib")}),
        "--data.init_args.calibration", str(study / "calibration.txt"), "--data.init_args.image_size", "128",
    )  # fmt: skip


def test_segmenter_masks_are_jtml_predicts(seg_run, study, tmp_path):
    out = tmp_path / "pred"
    api.run(
        "predict", ROOT / "experiments" / "demo_seg.yaml", "--ckpt_path", seg_run["checkpoint"],
        "--trainer.default_root_dir", tmp_path / "runs", "--trainer.logger", "false",
        "--data.init_args.studies", f"[{study}]", "--trainer.callbacks.init_args.out_dir", out,
        "--data.init_args.num_workers", "0",
    )  # fmt: skip
    seg = api.Segmenter.from_checkpoint(seg_run["checkpoint"])
    frames = list_images(study)
    masks = seg(frames)  # paths
    assert sorted(masks) == ["fem", "tib"] and masks["fem"].shape == (len(frames), 128, 128)
    for i, f in enumerate(frames):
        for part in ("fem", "tib"):
            written = read_mask(out / part / f"{f.stem}_label_{part}.tif")
            assert np.array_equal(masks[part][i], written), (f, part)
    stacked = seg(np.stack([read_image(f) for f in frames]))  # arrays: the same
    assert all(np.array_equal(stacked[p], masks[p]) for p in masks)


def test_pose_estimator_gives_the_writers_poses(pose_run, study, tmp_path):
    out = tmp_path / "poses"
    api.run(
        "predict", ROOT / "experiments" / "pose_from_mask.yaml", "--ckpt_path", pose_run["checkpoint"],
        "--trainer.default_root_dir", tmp_path / "runs", "--trainer.logger", "false",
        "--data.init_args.synthetic", "null", "--data.init_args.studies", f"[{study}]",
        "--data.init_args.models", json.dumps({p: str(study / f"{p}.stl") for p in ("fem", "tib")}),
        "--data.init_args.calibration", str(study / "calibration.txt"), "--data.init_args.num_workers", "0",
        "--trainer.callbacks.init_args.out_dir", out, "--trainer.precision", "32-true",  # the API's
    )  # fmt: skip
    poser = api.PoseEstimator.from_checkpoint(pose_run["checkpoint"])
    frames = list_images(study)
    masks = np.stack([read_mask(study / "Labels" / "fem" / f"{f.stem}_label_fem.tif") for f in frames])
    poses = poser(masks, study / "calibration.txt", part="fem")
    written = read_poses(out / study.name / "fem_network.jts")  # fem.jts: those poses registered
    np.testing.assert_allclose(poses, written, rtol=0, atol=1e-6)  # batch of 1 vs of 8
    empty = poser(np.zeros((1, 128, 128), np.uint8), study / "calibration.txt", part="fem")
    assert np.isnan(empty).all()  # no silhouette, no pose


def test_score_poses_is_score_poses_command(study, tmp_path, capsys):
    truth = read_poses(study / "fem.jts")
    pred = truth + np.array([0.5, -0.25, 3.0, 1.0, 0.0, -0.5])
    from jtml.io import write_poses

    write_poses(tmp_path / "pred.jts", pred)
    vertices = np.asarray(read_stl(study / "fem.stl").vertices, dtype=np.float64)
    mine = api.score_poses(pred, truth, vertices)
    cli = api.run(
        "score-poses", None, "--truth", study / "fem.jts", "--pred", tmp_path / "pred.jts",
        "--model", f"fem={study / 'fem.stl'}", "--calibration", study / "calibration.txt",
        "--image-size", "128", "--json",
    )  # fmt: skip
    assert mine["z"]["mean"] == pytest.approx(3.0) and mine == {k: cli[k] for k in mine}


def test_overlay_and_errors(study):
    frame = list_images(study)[0]
    mask = read_mask(study / "Labels" / "fem" / f"{frame.stem}_label_fem.tif")
    ax = api.show_overlay(frame, [mask], title="fem")
    (image,) = ax.get_images()
    rgb = image.get_array()
    assert rgb.shape == (128, 128, 3) and ax.get_title() == "fem"
    assert (rgb[mask > 0, 0] > rgb[mask > 0, 1]).mean() > 0.5  # the femur is tinted red
    with pytest.raises(JTMLError, match="jtml fit"):
        api.run("fit", ROOT / "experiments" / "demo_seg.yaml", "--data.init_args.index", "/nowhere.csv")
    with pytest.raises(JTMLError, match="no frame has a pose in both"):
        api.score_poses(np.full((2, 6), np.nan), np.zeros((2, 6)))
