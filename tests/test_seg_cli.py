"""The segmentation experiment end to end through `jtml fit|validate|test`, W&B offline files
read back from disk (no mocked wandb), and the CLI's bad-input behaviour."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from jtml.cli import main
from jtml.data.segmentation import FluoroSegDataModule
from jtml.runs.wandb_offline import read_offline_run

DEMO = Path(__file__).resolve().parents[1] / "experiments" / "demo_seg.yaml"


def _tiny(tmp: Path, study: str = "synth", seed: int = 0) -> list[str]:
    synth = {"out": str(tmp / study), "frames": 8, "seed": seed, "size": 64}
    return [
        "--trainer.default_root_dir", str(tmp / "runs"), "--trainer.max_epochs", "2",
        "--data.init_args.synthetic", json.dumps(synth), "--data.init_args.image_size", "64",
        "--data.init_args.batch_size", "4", "--data.init_args.num_workers", "0",
        "--data.init_args.val_fraction", "0.25", "--data.init_args.test_fraction", "0.25",
    ]  # fmt: skip


def _hd95_px(a: np.ndarray, b: np.ndarray) -> float:
    """HD95 between two non-empty masks the MONAI way (boundary = pixels a 4-neighbour erosion
    removes, outside the frame is background), with scipy instead of jtml's OpenCV code."""
    edge_a, edge_b = (m & ~ndimage.binary_erosion(m, border_value=0) for m in (a, b))
    a_to_b = ndimage.distance_transform_edt(~edge_b)[edge_a]
    b_to_a = ndimage.distance_transform_edt(~edge_a)[edge_b]
    return max(np.percentile(a_to_b, 95), np.percentile(b_to_a, 95))


def _dice_plus_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The demo's ``loss: dice+bce``, built from smp and torch directly rather than by jtml's parser."""
    import segmentation_models_pytorch as smp

    dice = smp.losses.DiceLoss("multilabel", from_logits=True)(logits, target)
    return dice + torch.nn.functional.binary_cross_entropy_with_logits(logits, target)


def _reference_metrics(checkpoint: str, dm: FluoroSegDataModule, split: str) -> dict[str, float]:
    """The checkpoint's Dice and IoU (torchmetrics) and HD95 (scipy) on every frame of ``split``,
    computed here from the dataset's samples: none of jtml's metrics, steps or loaders, so a logged
    value that disagrees was computed on other frames or weights, or computed wrongly."""
    from torchmetrics.functional.segmentation import dice_score, mean_iou

    from jtml.models.segmentation import SegmentationModule

    dm.setup("validate" if split == "val" else split)
    dataset = getattr(dm, f"{split}_dataset")
    samples = [dataset[i] for i in range(len(dataset))]
    model = SegmentationModule.load_from_checkpoint(checkpoint, map_location="cpu").eval()
    with torch.no_grad():
        logits = model(torch.stack([s["image"] for s in samples]))
    target = torch.stack([s["mask"] for s in samples])
    loss = _dice_plus_bce(logits, target)
    pred = (logits.sigmoid() > model.threshold).long()
    n = len(model.parts)
    dice = dice_score(pred, target.long(), num_classes=n, average="none", input_format="one-hot")
    iou = mean_iou(pred, target.long(), num_classes=n, per_class=True, input_format="one-hot")
    dice, iou = dice.nan_to_num(1.0).mean(0), torch.where(iou < 0, 1.0, iou).mean(0)  # both empty: 1
    out = {f"{split}/dice_mean": dice.mean().item(), f"{split}/iou_mean": iou.mean().item()}
    if len(samples) <= dm.batch_size:  # one batch: smp's Dice loss pools a batch, so only then equal
        out[f"{split}/loss"] = loss.item()
    for j, part in enumerate(model.parts):
        out[f"{split}/dice_{part}"], out[f"{split}/iou_{part}"] = dice[j].item(), iou[j].item()
        hd95 = []  # (px, mm) per frame; a part present in only one of prediction and label has none
        for s, p, t in zip(samples, pred[:, j].bool().numpy(), target[:, j].bool().numpy(), strict=True):
            if p.any() and t.any():
                px = _hd95_px(p, t)
                hd95.append((px, px * s["pixel_size"].item()))
            elif not p.any() and not t.any():
                hd95.append((0.0, 0.0))
        if hd95:
            out[f"{split}/hd95_{part}_px"], out[f"{split}/hd95_{part}_mm"] = np.mean(hd95, axis=0).tolist()
    return out


def _summary(capsys) -> dict:
    out = capsys.readouterr().out.strip().splitlines()
    return json.loads(out[-1])


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("demo")
    buf = io.StringIO()  # a module-scoped fixture cannot use capsys
    with contextlib.redirect_stdout(buf):
        code = main(["fit", "--config", str(DEMO), *_tiny(tmp)])
    assert code == 0
    return tmp, json.loads(buf.getvalue().strip().splitlines()[-1])


def test_fit_summary_and_run_directory(fitted):
    tmp, summary = fitted
    run_dir = Path(summary["run_dir"])
    assert run_dir.parent == tmp / "runs" / "demo_seg"
    assert Path(summary["checkpoint"]).name == "last.ckpt" and Path(summary["checkpoint"]).is_file()
    assert Path(summary["best_checkpoint"]).is_file()
    # The printed metrics are last.ckpt's on the validation frames, recomputed here independently.
    dm = FluoroSegDataModule.load_from_checkpoint(summary["checkpoint"])  # the fit's own data settings
    reference = _reference_metrics(summary["checkpoint"], dm, "val")
    scores = [k for k in reference if k.startswith(("val/dice_", "val/iou_"))]
    assert len(scores) == 6  # fem, tib and mean of each
    for key in scores:
        assert summary["metrics"][key] == pytest.approx(reference[key], abs=1e-6), key
    assert summary["metrics"]["val/loss"] == pytest.approx(reference["val/loss"], rel=1e-5)
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "finished" and record["git"]["sha"] and record["versions"]["torch"]
    assert "SegmentationModule" in (run_dir / "config.yaml").read_text()


def test_wandb_offline_run_holds_config_metrics_and_overlays(fitted):
    _, summary = fitted
    wandb_dir = Path(summary["wandb_run"])
    assert wandb_dir.name.startswith("offline-run-")
    run = read_offline_run(wandb_dir)
    # the full resolved config and provenance
    assert run.config["config"]["model"]["init_args"]["arch"] == "Unet"
    assert run.config["git"]["sha"] and run.config["encoder_name"] == "resnet18"
    assert (wandb_dir / "files" / "jtml-config.yaml").is_file()
    # per-epoch metrics, grouped and stable, equal to what the summary printed
    dice = run.series("val/dice_mean")
    assert len(dice) == 2
    assert dice[-1][1] == pytest.approx(summary["metrics"]["val/dice_mean"], abs=1e-7)
    assert run.series("train/loss_epoch")
    # the overlays of a fixed set of validation frames, each epoch
    overlays = [h for h in run.history if "val/overlays/filenames" in h]
    assert len(overlays) == 2
    assert overlays[0]["val/overlays/captions"] == overlays[1]["val/overlays/captions"]
    for name in overlays[-1]["val/overlays/filenames"]:
        assert (wandb_dir / "files" / name).is_file()


def test_validate_reproduces_final_fit_metrics(fitted, capsys):
    tmp, summary = fitted
    args = ["validate", "--config", str(DEMO), *_tiny(tmp), "--ckpt_path", summary["checkpoint"]]
    assert main(args) == 0
    again = _summary(capsys)["metrics"]
    for key in ("val/dice_fem", "val/dice_tib", "val/dice_mean", "val/iou_mean"):
        assert again[key] == pytest.approx(summary["metrics"][key], abs=1e-6), key


def test_test_on_held_out_synthetic_study(fitted, capsys):
    tmp, summary = fitted
    args = [
        "test",
        "--config",
        str(DEMO),
        *_tiny(tmp, study="held_out", seed=5),
        "--ckpt_path",
        summary["checkpoint"],
    ]
    assert main(args) == 0
    metrics = _summary(capsys)["metrics"]
    held_out = {"out": str(tmp / "held_out"), "frames": 8, "seed": 5, "size": 64}
    dm = FluoroSegDataModule.load_from_checkpoint(summary["checkpoint"], synthetic=held_out)
    reference = _reference_metrics(summary["checkpoint"], dm, "test")
    assert {"test/hd95_fem_px", "test/hd95_tib_mm"} <= reference.keys()  # the comparison below is real
    for key, value in reference.items():
        assert metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_unknown_config_key_is_named(tmp_path, capsys):
    code = main(
        ["fit", "--config", str(DEMO), *_tiny(tmp_path), "--model.init_args.encoder_nmae", "resnet18"]
    )
    assert code == 2  # the CLI's exit code for bad input
    assert "encoder_nmae" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("run.json"))


def test_imagenet_weights_offline_is_one_clear_error(tmp_path, capsys):
    code = main(
        ["fit", "--config", str(DEMO), *_tiny(tmp_path), "--model.init_args.encoder_weights", "imagenet"]
    )
    assert code == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "offline" in err[0] and "encoder_weights: /path/to/encoder.pth" in err[0]
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # not even a folder


def test_seed_must_be_explicit(tmp_path, capsys):
    code = main(["fit", "--config", str(DEMO), *_tiny(tmp_path), "--seed_everything", "true"])
    assert code == 2
    assert "seed_everything" in capsys.readouterr().err


def test_fine_tune_demo_model_on_kneel1_logs_dice_against_real_labels(kneel1, tmp_path, capsys):
    """A few steps on the real study; the logged val Dice is recomputed here from the real TIFFs."""
    import numpy as np
    import torch

    from jtml.data.segmentation import FluoroSegDataModule
    from jtml.io import read_image, read_mask
    from jtml.models.segmentation import SegmentationModule

    args = [
        "fit", "--config", str(DEMO), "--trainer.default_root_dir", str(tmp_path / "runs"),
        "--trainer.max_epochs", "3", "--data.init_args.synthetic", "null",
        "--data.init_args.studies", json.dumps([str(kneel1)]), "--data.init_args.image_size", "128",
        "--data.init_args.batch_size", "1", "--data.init_args.num_workers", "0",
        "--data.init_args.val_fraction", "0.34", "--data.init_args.test_fraction", "0",
    ]  # fmt: skip
    assert main(args) == 0
    summary = _summary(capsys)
    dm = FluoroSegDataModule(studies=[str(kneel1)], image_size=128, val_fraction=0.34, test_fraction=0.0)
    (row,) = dm.split_rows("val")
    model = SegmentationModule.load_from_checkpoint(summary["checkpoint"], map_location="cpu").eval()
    frame = read_image(row.image).astype(np.float32)
    small = frame.reshape(128, 8, 128, 8).mean(axis=(1, 3))
    x = (small - small.min()) / (small.max() - small.min())
    with torch.no_grad():
        pred = torch.sigmoid(model(torch.from_numpy(x)[None, None].float()))[0].numpy() > 0.5
    for channel, part in enumerate(("fem", "tib")):
        label = read_mask(row.masks[part]).reshape(128, 8, 128, 8).mean(axis=(1, 3)) >= 0.5
        assert label.sum() > 100  # the real hand label, downsampled
        p = pred[channel]
        both_empty = not p.any() and not label.any()
        dice = 1.0 if both_empty else 2 * (p & label).sum() / (p.sum() + label.sum())
        assert summary["metrics"][f"val/dice_{part}"] == pytest.approx(dice, abs=2e-3), part


def test_jtml_test_reproduces_final_fit_metrics_on_the_same_frames(fitted, capsys):
    """`jtml test` on an index whose test rows are the fit's validation frames gives the val metrics."""
    from jtml.data.index import build_index, write_index

    tmp, summary = fitted
    rows = build_index([tmp / "synth"], val=0.25, test=0.25, seed=0, split_by="frame")  # as the fit split
    val = [r for r in rows if r.split == "val"]
    held = [type(r)(**{**r.__dict__, "split": "test"}) for r in val]
    write_index(tmp / "same_frames.csv", [r for r in rows if r.split != "test"] + held)
    args = [
        "test", "--config", str(DEMO), *_tiny(tmp), "--data.init_args.synthetic", "null",
        "--data.init_args.index", str(tmp / "same_frames.csv"), "--ckpt_path", summary["checkpoint"],
    ]  # fmt: skip
    assert main(args) == 0
    metrics = _summary(capsys)["metrics"]
    for part in ("fem", "tib", "mean"):
        assert metrics[f"test/dice_{part}"] == pytest.approx(summary["metrics"][f"val/dice_{part}"], abs=1e-6)


def test_more_devices_than_available_is_one_clear_error(tmp_path, capsys):
    args = [
        "fit",
        "--config",
        str(DEMO),
        *_tiny(tmp_path),
        "--trainer.accelerator",
        "gpu",
        "--trainer.devices",
        "3",
    ]
    if __import__("torch").cuda.device_count() >= 3:
        pytest.skip("this machine really has 3 GPUs")
    assert main(args) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "cannot run here" in err[0]
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.*"))
