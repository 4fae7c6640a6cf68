"""`jtml export` of PoseModule checkpoints (TorchScript/ONNX): the exported model's poses equal the eager
module's on kneel1's real masks, its metadata says how to build its inputs, and bad input is one error."""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from jtml.cli import main
from jtml.data.pose import FluoroPoseDataModule
from jtml.deploy.pose import INPUT_NAMES, METADATA_KEY, export_pose, load_pose_checkpoint
from jtml.errors import JTMLError
from jtml.geometry import Camera
from jtml.geometry.roi import make_sample
from jtml.io import read_calibration, read_image

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*(does not have many workers|LeafSpec|log_every_n_steps).*"),
    pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning"),
]
ROOT = Path(__file__).resolve().parents[1]
ROI = 64
PARTS = ("fem", "tib")
FRAMES = ("AT_K1_V1_0160", "AT_K1_V1_0170", "AT_K1_V1_0180")


@pytest.fixture(scope="module")
def mask_ckpt(tmp_path_factory) -> str:
    """A one-step `jtml fit` of experiments/pose_from_mask.yaml (channels-last resnet10t, two parts)
    at 64² ROIs: a LightningCLI checkpoint, which names its class."""
    tmp = tmp_path_factory.mktemp("pose_export")
    args = ["fit", "--config", str(ROOT / "experiments" / "pose_from_mask.yaml")]
    args += ["--trainer.default_root_dir", str(tmp / "runs"), "--trainer.logger", "false"]
    args += ["--trainer.fast_dev_run", "1", "--trainer.precision", "32-true"]
    args += ["--trainer.enable_progress_bar", "false", "--data.init_args.roi_size", str(ROI)]
    args += ["--data.init_args.train_samples", "8", "--data.init_args.val_samples", "4"]
    args += ["--data.init_args.batch_size", "4", "--data.init_args.num_workers", "0"]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(args) == 0
    ckpt = json.loads(buf.getvalue().strip().splitlines()[-1])["checkpoint"]
    assert torch.load(ckpt, weights_only=True)["hyper_parameters"]["_class_path"].endswith("PoseModule")
    return ckpt


@pytest.fixture(scope="module")
def both_ckpt(kneel1, tmp_path_factory) -> Path:
    """A frame-and-mask model fitted two steps on kneel1 by a plain Trainer: no ``_class_path``."""
    from jtml.models.pose import PoseModule

    pl.seed_everything(0)
    dm = FluoroPoseDataModule(
        parts=list(PARTS), input="both", studies=[str(kneel1)], roi_size=ROI, val_fraction=0.34,
        test_fraction=0.0, split_by="frame", batch_size=2, num_workers=0,
    )  # fmt: skip
    model = PoseModule(parts=list(PARTS), input="both", backbone="resnet18", roi_size=ROI, head_hidden=32)
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(model, dm)
    ckpt = tmp_path_factory.mktemp("pose_both") / "both.ckpt"
    trainer.save_checkpoint(ckpt)
    assert "_class_path" not in torch.load(ckpt, weights_only=True)["hyper_parameters"]
    return ckpt


def _runner(path: Path, fmt: str, names: tuple[str, ...]):
    if fmt == "torchscript":
        model = torch.jit.load(str(path))
        return lambda inputs: model(*inputs)
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed: cannot run the ONNX model")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda inputs: torch.from_numpy(
        session.run(None, {n: t.numpy() for n, t in zip(names, inputs, strict=True)})[0]
    )


def _metadata(path: Path, fmt: str) -> dict:
    if fmt == "torchscript":
        files = {METADATA_KEY: ""}
        torch.jit.load(str(path), _extra_files=files)
        return json.loads(files[METADATA_KEY])
    import onnx

    return json.loads({p.key: p.value for p in onnx.load(str(path)).metadata_props}[METADATA_KEY])


def _kneel1_samples(kneel1: Path, module) -> list[dict]:
    """make_sample of every kneel1 frame's femur and tibia mask, with the eager module's pose."""
    calib = read_calibration(kneel1 / "calibration.txt")
    samples = []
    for frame in FRAMES:
        image = read_image(kneel1 / f"{frame}.tif")
        camera = Camera.from_calibration(calib, image.shape[1], image.shape[0])
        for part in PARTS:
            mask = read_image(kneel1 / "Labels" / part / f"{frame}_label_{part}.tif")
            s = make_sample(
                (mask > 0).astype(np.float32), camera, module.roi_size, module.roi_margin, module.input,
                image, invert=False,
            )  # fmt: skip
            assert s["valid"]
            s["part"] = torch.tensor(module.parts.index(part))
            s["eager"] = module.estimate(mask, calib, part, frame=None if module.input == "mask" else image)
            samples.append(s)
    return samples


def _assert_pose_parity(got: torch.Tensor, want: np.ndarray) -> None:
    got = got.numpy()
    assert got.dtype == np.float64 and got.shape == want.shape
    assert np.isfinite(want).all()
    d = got - want
    d[:, 3:] = (d[:, 3:] + 180.0) % 360.0 - 180.0
    assert np.abs(d[:, :3]).max() <= 1e-4, np.abs(d[:, :3]).max()  # mm
    assert np.abs(d[:, 3:]).max() <= 1e-4, np.abs(d[:, 3:]).max()  # degrees


def _check_export(ckpt, fmt: str, out: Path, kneel1: Path, inputs: str) -> None:
    if fmt == "onnx":
        pytest.importorskip("onnx", reason="onnx is not installed: ONNX export cannot run")
    summary = export_pose(ckpt, fmt, out)
    names = INPUT_NAMES[inputs]
    assert list(summary["inputs"]) == list(names) and summary["output"] == [1, 6]
    assert summary["parts"] == list(PARTS)
    assert summary["preprocessing"] == {"input": inputs, "roi_size": ROI, "roi_margin": 0.15}
    meta = _metadata(out, fmt)
    assert meta["parts"] == list(PARTS) and meta["inputs"] == list(names)
    assert {k: meta[k] for k in ("input", "roi_size", "roi_margin")} == summary["preprocessing"]
    module = load_pose_checkpoint(ckpt)
    samples = _kneel1_samples(kneel1, module)
    run = _runner(out, fmt, names)
    want = np.stack([s["eager"] for s in samples])
    with torch.no_grad():
        # one sample at a time (the app), and all six in one batch
        single = torch.cat([run([s[n][None] for n in names]) for s in samples])
        batched = run([torch.stack([s[n] for s in samples]) for n in names])
    _assert_pose_parity(single, want)
    _assert_pose_parity(batched, want)


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_mask_model_export_matches_eager_on_kneel1(mask_ckpt, kneel1, tmp_path, fmt):
    _check_export(
        mask_ckpt, fmt, tmp_path / f"pose.{'pt' if fmt == 'torchscript' else 'onnx'}", kneel1, "mask"
    )


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_frame_and_mask_model_export_matches_eager_on_kneel1(both_ckpt, kneel1, tmp_path, fmt):
    _check_export(
        both_ckpt, fmt, tmp_path / f"pose.{'pt' if fmt == 'torchscript' else 'onnx'}", kneel1, "both"
    )


def test_jtml_export_of_a_pose_checkpoint(mask_ckpt, tmp_path, capsys):
    out = tmp_path / "pose.pt"
    assert main(["export", "--ckpt_path", mask_ckpt, "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["out"] == str(out) and summary["format"] == "torchscript" and out.is_file()
    assert summary["inputs"]["roi_mask"] == [1, 1, ROI, ROI] and summary["inputs"]["camera"] == [1, 6]


def test_onnx_atan2_and_asin_keep_float64(tmp_path):
    """ONNX Runtime has no float64 Atan/Asin: the exported float32 seed plus a Newton step must match
    torch to float64 rounding, quadrants and edge cases (0/0, ±π, ±π/2, ±1) included."""
    pytest.importorskip("onnx", reason="onnx is not installed: ONNX export cannot run")
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed: cannot run the ONNX model")
    from jtml.deploy.pose import _onnx_symbolics

    class Angles(torch.nn.Module):
        def forward(self, y, x, s):
            return torch.atan2(y, x), torch.rad2deg(torch.asin(s))

    g = torch.Generator().manual_seed(0)
    y, x = torch.randn(2, 4096, dtype=torch.float64, generator=g)
    s = torch.rand(4096, dtype=torch.float64, generator=g) * 2 - 1
    y[:6] = torch.tensor([0.0, 0.0, 1.0, -1.0, 1e-300, -2.0], dtype=torch.float64)
    x[:6] = torch.tensor([0.0, -1.0, 0.0, 0.0, -1.0, -1e-9], dtype=torch.float64)
    s[:3] = torch.tensor([1.0, -1.0, 0.0], dtype=torch.float64)
    with _onnx_symbolics():
        torch.onnx.export(Angles(), (y, x, s), str(tmp_path / "a.onnx"), opset_version=17, dynamo=False)
    session = ort.InferenceSession(str(tmp_path / "a.onnx"), providers=["CPUExecutionProvider"])
    a, d = session.run(
        None, {i.name: t.numpy() for i, t in zip(session.get_inputs(), (y, x, s), strict=True)}
    )
    assert np.abs(a - torch.atan2(y, x).numpy()).max() <= 1e-15
    assert np.abs(d - torch.rad2deg(torch.asin(s)).numpy()).max() <= 1e-12


def test_pose_export_of_bad_input_is_one_error(tmp_path, capsys):
    neither = tmp_path / "neither.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"_class_path": "torch.nn.Linear"}}, neither)
    unknown = tmp_path / "unknown.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"lr": 0.1}}, unknown)
    broken = tmp_path / "broken.ckpt"  # a PoseModule's class, but weights that are no PoseModule's
    torch.save(
        {
            "state_dict": {"net.head.weight": torch.zeros(2, 2)},
            "hyper_parameters": {"_class_path": "jtml.models.pose.PoseModule", "parts": ["fem"]},
        },
        broken,
    )
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint\n")
    for bad, needle in (
        (neither, "not a segmentation or pose checkpoint"),
        (unknown, "not a segmentation or pose checkpoint"),
        (broken, "cannot load the pose model"),
        (text, "not a readable Lightning checkpoint"),
        (tmp_path / "missing.ckpt", "checkpoint not found"),
    ):
        with pytest.raises(JTMLError, match=needle) as e:
            export_pose(bad, "torchscript", tmp_path / "x.pt")
        assert e.value.path == str(bad)
        assert main(["export", "--ckpt_path", str(bad), "--out", str(tmp_path / "x.pt")]) == 2
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
        assert len(err) == 1 and str(bad) in err[0] and needle in err[0], err
    assert not (tmp_path / "x.pt").exists()
    with pytest.raises(JTMLError, match="unknown export format 'tflite'"):
        export_pose(broken, "tflite", tmp_path / "x.tflite")


def test_segmentation_checkpoint_is_no_pose_checkpoint(tmp_path):
    seg = tmp_path / "seg.ckpt"
    hp = {"_class_path": "jtml.models.segmentation.SegmentationModule", "parts": ["fem"]}
    torch.save({"state_dict": {}, "hyper_parameters": hp}, seg)
    with pytest.raises(JTMLError, match="a segmentation checkpoint, not a pose one") as e:
        export_pose(seg, "onnx", tmp_path / "x.onnx")
    assert e.value.path == str(seg)


def test_pose_onnx_export_without_onnx_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # an environment without the onnx extra
    with pytest.raises(JTMLError, match="'onnx' package, which is not installed"):
        export_pose(tmp_path / "any.ckpt", "onnx", tmp_path / "pose.onnx")
