"""`jtml predict` with SegmentationPredictionWriter and `jtml export` (TorchScript/ONNX) end to end:
one tiny demo model is trained once; its masks, overlays and exported model are read back from disk."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from jtml.cli import main
from jtml.data.datamodule import FluoroSegDataModule
from jtml.data.synth import generate_study
from jtml.export import export_segmentation, load_segmentation_checkpoint
from jtml.io import list_images, read_image

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
    assert main(_predict_args(tmp, ckpt, study, out)) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert Path(summary["run_dir"]).is_dir()
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
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint\n")
    for bad in (pose, text, tmp_path / "missing.ckpt"):
        assert main(["export", "--ckpt_path", str(bad), "--out", str(tmp_path / "x.pt")]) == 2
        err = _errors(capsys)
        assert len(err) == 1 and str(bad) in err[0]
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
    from jtml.export import JTMLAppModel

    with torch.no_grad():
        eager = JTMLAppModel(module.model, **prep)(torch.from_numpy(x)).numpy()
    assert np.abs(onnx_logits - eager).max() <= 1e-4
