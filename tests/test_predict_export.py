"""`jtml predict` with SegmentationPredictionWriter and `jtml export` (TorchScript/ONNX) end to end:
one tiny demo model is trained once; its masks, overlays and exported model are read back from disk."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from jtml.cli import main
from jtml.data.segmentation import FluoroSegDataModule
from jtml.deploy.segmentation import JTMLAppModel, export_segmentation, load_segmentation_checkpoint
from jtml.errors import JTMLError
from jtml.io import list_images, read_image
from jtml.sim.synth import generate_study

DEMO = Path(__file__).resolve().parents[1] / "experiments" / "demo_seg.yaml"
SIZE = 64  # the network's image_size


def _tiny(tmp: Path) -> list[str]:
    synth = {"out": str(tmp / "synth"), "frames": 8, "seed": 0, "size": SIZE}
    return [
        "--trainer.default_root_dir", str(tmp / "runs"), "--trainer.max_epochs", "1",
        "--trainer.logger", "false",
        "--data.init_args.synthetic", json.dumps(synth), "--data.init_args.image_size", str(SIZE),
        "--data.init_args.batch_size", "4", "--data.init_args.num_workers", "0",
        "--data.init_args.val_fraction", "0.25", "--data.init_args.test_fraction", "0.25",
    ]  # fmt: skip


def _predict_args(tmp: Path, ckpt: str, study: Path, out: Path | None, *extra: str) -> list[str]:
    args = [
        "predict",
        "--config",
        str(DEMO),
        "--ckpt_path",
        ckpt,
        "--trainer.default_root_dir",
        str(tmp / "runs"),
        "--trainer.logger",
        "false",
        "--data.init_args.studies",
        json.dumps([str(study)]),  # exactly these: all their frames
        "--data.init_args.image_size",
        str(SIZE),
        "--data.init_args.num_workers",
        "0",
    ]  # fmt: skip  (the YAML's SegmentationPredictionWriter writes)
    if out is not None:
        args += ["--trainer.callbacks.init_args.out_dir", str(out)]
    return args + list(extra)


def _errors(capsys) -> list[str]:
    return [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("predict_export")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(["fit", "--config", str(DEMO), *_tiny(tmp)])
    assert code == 0
    ckpt = json.loads(buf.getvalue().strip().splitlines()[-1])["checkpoint"]
    assert ckpt and Path(ckpt).is_file()
    return tmp, ckpt


def _check_outputs(out: Path, frames: list[Path], parts=("fem", "tib")) -> None:
    for frame in frames:
        shape = read_image(frame).shape
        for part in parts:
            mask = read_image(out / part / f"{frame.stem}_label_{part}.tif")
            assert mask.dtype == np.uint8 and mask.shape == shape
            assert set(np.unique(mask)) <= {0, 255}
        picture = out / "overlays" / f"{frame.stem}.png"
        assert picture.is_file() and read_image(picture).shape == shape
    for part in parts:
        assert len(list((out / part).iterdir())) == len(frames)
    assert len(list((out / "overlays").iterdir())) == len(frames)


def test_predict_writes_masks_and_overlays_at_frame_size(trained, capsys):
    tmp, ckpt = trained
    study = generate_study(tmp / "new_study", frames=3, seed=7, size=96)  # frames larger than the network
    (study / "notes.txt").write_text("not a frame\n")  # ignored
    out = tmp / "pred"
    assert main(_predict_args(tmp, ckpt, study, out, "--trainer.enable_progress_bar", "false")) == 0
    captured = capsys.readouterr()
    (line,) = captured.out.splitlines()  # stdout: the JSON summary alone; the writer speaks on stderr
    assert Path(json.loads(line)["run_dir"]).is_dir()
    assert f"wrote masks and overlays of 3 frame(s) to {out}" in captured.err
    _check_outputs(out, list_images(study))


def test_predict_on_a_plain_folder_of_frames(trained, capsys):
    """Frames only (no calibration.txt, poses or labels) and a file that is not a frame."""
    tmp, ckpt = trained
    folder = tmp / "frames_only"
    folder.mkdir()
    for frame in list_images(tmp / "synth")[:3]:
        shutil.copy(frame, folder / frame.name)
    (folder / "README.txt").write_text("acquisition notes\n")  # no image suffix: not a frame, ignored
    out = tmp / "pred_frames_only"
    assert main(_predict_args(tmp, ckpt, folder, out)) == 0
    _check_outputs(out, list_images(folder))
    assert len(list_images(folder)) == 3


def test_non_empty_out_dir_is_refused(trained, capsys):
    tmp, ckpt = trained
    out = tmp / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main(_predict_args(tmp, ckpt, tmp / "synth", out)) == 2
    err = _errors(capsys)
    assert len(err) == 1 and str(out) in err[0] and "not empty" in err[0]
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_unreadable_frame_is_one_error(trained, capsys):
    tmp, ckpt = trained
    study = tmp / "broken"
    shutil.copytree(tmp / "synth", study)
    bad = list_images(study)[0]
    bad.write_bytes(b"II*\x00 truncated")
    assert main(_predict_args(tmp, ckpt, study, tmp / "pred_broken")) == 2
    err = capsys.readouterr().err  # the datamodule lists every bad file of the study in one error
    assert len([ln for ln in err.splitlines() if ln.startswith("error:")]) == 1
    assert str(bad) in err and "Traceback" not in err
    assert not (tmp / "pred_broken").exists()


def _module_logits(module, dm: FluoroSegDataModule, size: int | None = None) -> list[torch.Tensor]:
    dm.setup("predict")
    out = []
    with torch.no_grad():
        for sample in dm.predict_dataset:
            logits = module(sample["image"][None])
            if size is not None and logits.shape[-1] != size:
                logits = F.interpolate(logits, size=(size, size), mode="bilinear", align_corners=False)
            out.append(logits)
    return out


def _app_logits(model, frames: list[Path]) -> list[torch.Tensor]:
    with torch.no_grad():  # the app's input: raw 0–255 with implants white
        return [model(255.0 - torch.from_numpy(read_image(f)).float()[None, None]) for f in frames]


def _assert_parity(app: list[torch.Tensor], eager: list[torch.Tensor]) -> None:
    assert len(app) == len(eager) > 0
    for a, e in zip(app, eager, strict=True):
        assert a.shape == e.shape
        assert (a - e).abs().max().item() <= 1e-4
        # thresholded masks equal; a pixel whose logit is within the 1e-4 agreement of 0 may round
        # either way between kernels (ONNX Runtime vs torch), so it cannot be held to one side
        differ = (a > 0) != (e > 0)
        assert not (differ & (e.abs() > 1e-4)).any()
        assert differ.sum().item() <= 1e-5 * differ.numel(), differ.sum().item()


def test_export_torchscript_matches_eager(trained, capsys):
    tmp, ckpt = trained
    out = tmp / "seg.pt"
    args = ["export", "--ckpt_path", ckpt, "--format", "torchscript", "--out", str(out), "--size", str(SIZE)]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["output"] == [1, 2, SIZE, SIZE] and summary["parts"] == ["fem", "tib"]
    assert summary["preprocessing"]["invert"] is False and summary["preprocessing"]["image_size"] == SIZE
    model = torch.jit.load(str(out))
    module, _ = load_segmentation_checkpoint(ckpt)
    dm = FluoroSegDataModule(
        studies=[str(tmp / "synth")],
        image_size=SIZE,
        num_workers=0,
        predict_split="all",
        train_transforms="none",
    )
    frames = [r.image for r in dm.split_rows("all")]
    _assert_parity(_app_logits(model, frames), _module_logits(module, dm))


def test_torchscript_export_returns_the_input_frame_size(trained, capsys):
    """Exported for 80² frames (network 64²), fed 96², 128², 96×128 and 72² frames: the logits come
    back at each frame's own size and equal the eager model's prediction on that frame (issue #10,
    item 8: the traced wrapper used to return 80² logits whatever the frame). 96 → 64 is a
    non-integer shrink factor, where OpenCV's INTER_AREA is not an average pool."""
    tmp, ckpt = trained
    out = tmp / "seg_any_size.pt"
    args = ["export", "--ckpt_path", ckpt, "--format", "torchscript", "--out", str(out), "--size", "80"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["output"] == [1, 2, 80, 80] and summary["any_frame_size"] is True
    model = torch.jit.load(str(out))
    module, prep = load_segmentation_checkpoint(ckpt)
    for side in (96, 128):
        study = generate_study(tmp / f"study{side}", frames=2, seed=side, size=side)
        dm = FluoroSegDataModule(
            studies=[str(study)], image_size=SIZE, num_workers=0, predict_split="all", train_transforms="none"
        )
        frames = [r.image for r in dm.split_rows("all")]
        app = _app_logits(model, frames)
        assert [tuple(a.shape) for a in app] == [(1, 2, side, side)] * 2
        _assert_parity(app, _module_logits(module, dm, size=side))  # the dataset's preprocessing, eagerly
    # a non-square frame (padded to a square, resized, cropped back) and one smaller than --size
    eager = JTMLAppModel(module.model, **prep).eval()
    frame = 255.0 - torch.from_numpy(read_image(frames[0])).float()[None, None]
    for x, shape in ((frame[..., 16:112, :], (1, 2, 96, 128)), (frame[..., 28:100, 28:100], (1, 2, 72, 72))):
        with torch.no_grad():
            scripted = model(x)
            assert scripted.shape == shape
            _assert_parity([scripted], [eager(x)])


class _Seen(torch.nn.Module):
    """A stand-in network that keeps what it was fed."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen = x.clone()
        return x


@pytest.mark.parametrize(("side", "size"), [(96, 64), (100, 64), (128, 64), (192, 64), (1000, 256)])
def test_app_model_shrinks_like_the_dataset(side, size):
    """The network input equals FluoroSegDataset's cv2.resize(INTER_AREA) grey levels at integer and
    non-integer factors (the exported model now takes any frame size, so every factor occurs); a
    pixel whose average is within float rounding of a half grey level may land either way."""
    stored = np.random.default_rng(side).integers(0, 256, (side, side), dtype=np.uint8)
    net = _Seen()
    JTMLAppModel(net, size, normalize="none")(255.0 - torch.from_numpy(stored).float()[None, None])
    ref = torch.from_numpy(cv2.resize(stored, (size, size), interpolation=cv2.INTER_AREA)).float()
    diff = (net.seen[0, 0] - ref).abs()
    assert diff.max().item() <= 1.0 and (diff > 0).float().mean().item() <= 1e-4, (diff > 0).sum().item()


def test_crop_mode_torchscript_refuses_other_frame_sizes(trained, tmp_path, capsys):
    """resize_mode crop runs the (traced) network at the frame's native size: the export holds for
    --size frames only, and a frame of another size is refused with a message, not answered wrongly."""
    tmp, ckpt = trained
    raw = torch.load(ckpt, map_location="cpu", weights_only=True)
    raw["datamodule_hyper_parameters"] = {**raw["datamodule_hyper_parameters"], "resize_mode": "crop"}
    crop_ckpt = tmp_path / "crop.ckpt"
    torch.save(raw, crop_ckpt)
    out = tmp_path / "seg_crop.pt"
    assert main(["export", "--ckpt_path", str(crop_ckpt), "--out", str(out), "--size", str(SIZE)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["any_frame_size"] is False and summary["preprocessing"]["resize_mode"] == "crop"
    model = torch.jit.load(str(out))
    module, prep = load_segmentation_checkpoint(crop_ckpt)
    eager = JTMLAppModel(module.model, **prep).eval()
    frame = 255.0 - torch.from_numpy(read_image(list_images(tmp / "synth")[0])).float()[None, None]
    assert frame.shape[-1] == SIZE
    with torch.no_grad():
        _assert_parity([model(frame)], [eager(frame)])
        big = F.pad(frame, (16, 16, 16, 16))  # 96²: the eager wrapper takes it, the export must not guess
        assert eager(big).shape == (1, 2, 96, 96)
        with pytest.raises(torch.jit.Error, match=r"frame 96x96: .*longer side is 64 px"):
            model(big)


def _onnx_runner(path: Path):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed: cannot run the ONNX model")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(None, {"image": x.numpy()})[0])


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_parity_on_real_frames(trained, kneel1, tmp_path, fmt):
    _, ckpt = trained
    out = tmp_path / f"seg1024.{'pt' if fmt == 'torchscript' else 'onnx'}"
    if fmt == "onnx":
        pytest.importorskip("onnx", reason="onnx is not installed: ONNX export cannot run")
    export_segmentation(ckpt, fmt, out, size=1024)
    model = torch.jit.load(str(out)) if fmt == "torchscript" else _onnx_runner(out)
    module, _ = load_segmentation_checkpoint(ckpt)
    dm = FluoroSegDataModule(
        studies=[str(kneel1)], image_size=SIZE, num_workers=0, predict_split="all", train_transforms="none"
    )
    frames = [r.image for r in dm.split_rows("all")]
    assert len(frames) == 3 and read_image(frames[0]).shape == (1024, 1024)
    _assert_parity(_app_logits(model, frames), _module_logits(module, dm, size=1024))


def test_predict_on_real_study(trained, kneel1, capsys):
    """The issue's short form: `jtml predict --config X --ckpt_path C --data.studies [DIR]`; the
    YAML's writer puts 3 masks per part and 3 overlays into the predict run's directory."""
    tmp, ckpt = trained
    args = ["predict", "--config", str(DEMO), "--ckpt_path", ckpt]
    args += ["--data.studies", json.dumps([str(kneel1)])]
    args += ["--trainer.default_root_dir", str(tmp / "runs_kneel1"), "--trainer.logger", "false"]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "not the experiment's synthetic" in captured.err  # the demo's own data is left out
    run_dir = Path(json.loads(captured.out.strip().splitlines()[-1])["run_dir"])
    _check_outputs(run_dir / "predictions", list_images(kneel1))


def test_export_of_other_checkpoints_is_one_error(trained, tmp_path, capsys):
    _, ckpt = trained
    pose = tmp_path / "pose.ckpt"
    torch.save(
        {
            "state_dict": {"head.weight": torch.zeros(2, 2)},
            "hyper_parameters": {"_class_path": "jtml.models.pose.PoseModule", "parts": ["fem"]},
        },
        pose,
    )
    neither = tmp_path / "neither.ckpt"
    torch.save(
        {"state_dict": {}, "hyper_parameters": {"_class_path": "torch.nn.Linear", "parts": ["fem"]}}, neither
    )
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint\n")
    for bad in (pose, neither, text, tmp_path / "missing.ckpt"):
        assert main(["export", "--ckpt_path", str(bad), "--out", str(tmp_path / "x.pt")]) == 2
        err = _errors(capsys)
        assert len(err) == 1 and str(bad) in err[0]
        with pytest.raises(JTMLError) as e:  # not a segmentation model, whatever else it is
            load_segmentation_checkpoint(bad)
        assert e.value.path == str(bad)
    assert not (tmp_path / "x.pt").exists()


def test_export_onnx_without_onnx_is_a_clear_error(trained, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # an environment without the onnx extra
    _, ckpt = trained
    out = tmp_path / "seg.onnx"
    assert main(["export", "--ckpt_path", ckpt, "--format", "onnx", "--out", str(out)]) == 2
    err = _errors(capsys)
    assert len(err) == 1 and "onnx" in err[0] and "not installed" in err[0]
    assert not out.exists()


def test_export_onnx(trained, tmp_path):
    pytest.importorskip("onnx", reason="onnx is not installed: ONNX export cannot run")
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed: cannot run the ONNX model")
    _, ckpt = trained
    out = tmp_path / "seg.onnx"
    export_segmentation(ckpt, "onnx", out, size=SIZE)
    frame = read_image(sorted((Path(ckpt).parents[4] / "synth").glob("*.tif"))[0])
    x = (255.0 - frame.astype(np.float32))[None, None]
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (onnx_logits,) = session.run(None, {"image": x})
    module, prep = load_segmentation_checkpoint(ckpt)
    from jtml.deploy.segmentation import JTMLAppModel

    with torch.no_grad():
        eager = JTMLAppModel(module.model, **prep)(torch.from_numpy(x)).numpy()
    assert np.abs(onnx_logits - eager).max() <= 1e-4
    # the ONNX graph is fixed to --size frames: another size is refused, never answered at the wrong size
    bigger = np.pad(x, ((0, 0), (0, 0), (16, 16), (16, 16)))
    with pytest.raises(Exception, match="invalid dimensions for input: image"):
        session.run(None, {"image": bigger})
