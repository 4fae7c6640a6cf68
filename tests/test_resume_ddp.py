"""Multi-process DDP (gloo, CPU) through `python -m jtml.cli` in a subprocess: one JSON summary,
a loadable checkpoint whose printed val Dice is the one recomputed here in a single process, and
the same val Dice from 1 and 2 validating processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from jtml.runs.wandb_offline import read_offline_run

pytestmark = pytest.mark.slow  # multi-process DDP runs in subprocesses

DEMO = Path(__file__).resolve().parents[1] / "experiments" / "demo_seg.yaml"
# 12 frames, split by frame: 6 train, 3 val (odd: DistributedSampler would pad it to 4), 3 test
FRAMES, VAL = 12, 3
CHECKPOINT = {
    "class_path": "pytorch_lightning.callbacks.ModelCheckpoint",
    "init_args": {"monitor": "val/dice_mean", "mode": "max", "save_last": True, "save_top_k": 1},
}


def _tiny(tmp: Path, wandb: bool = False, frames: int = FRAMES) -> list[str]:
    synth = {"out": str(tmp / "synth"), "frames": frames, "seed": 0, "size": 64}
    quiet = [] if wandb else ["--trainer.logger", "false", "--trainer.callbacks", json.dumps([CHECKPOINT])]
    return [*quiet,
        "--trainer.default_root_dir", str(tmp / "runs"), "--trainer.deterministic", "true",
        "--data.init_args.synthetic", json.dumps(synth), "--data.init_args.image_size", "64",
        "--data.init_args.batch_size", "2", "--data.init_args.num_workers", "0",
        "--data.init_args.val_fraction", "0.25", "--data.init_args.test_fraction", "0.25",
    ]  # fmt: skip


def _ddp(devices: int) -> list[str]:
    if devices == 1:
        return ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.strategy", "auto"]
    # smp's ResNet encoder at encoder_depth 3 keeps layer4 unused: DDP must be told so
    strategy = "ddp_find_unused_parameters_true"
    return ["--trainer.accelerator", "cpu", "--trainer.devices", str(devices), "--trainer.strategy", strategy]


def _jtml(*args: str, timeout: int = 420) -> tuple[dict, str]:
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("JTML_RUN_DIR", None)
    proc = subprocess.run(
        [sys.executable, "-m", "jtml.cli", *args], capture_output=True, text=True, timeout=timeout, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summaries = [ln for ln in proc.stdout.splitlines() if ln.startswith("{") and '"run_dir"' in ln]
    assert len(summaries) == 1, proc.stdout[-3000:]  # rank zero only
    return json.loads(summaries[0]), proc.stderr


def _val_dice_here(checkpoint: str) -> tuple[dict[str, float], dict[str, float]]:
    """``val/dice_*`` of ``checkpoint`` on every validation frame of its fit's data (the DataModule
    rebuilt from the checkpoint), computed in this one process by torchmetrics: no DDP, sampler or
    jtml metric. Also, per key, the tolerance for comparing it with a value from other processes:
    what one flipped pixel in every frame can change, since there a probability within float noise
    of the threshold may fall on the other side (a frame's Dice 2I/(P+T) moves by <= 2/(P+T-1))."""
    from torchmetrics.functional.segmentation import dice_score

    from jtml.data.segmentation import FluoroSegDataModule
    from jtml.models.segmentation import SegmentationModule

    dm = FluoroSegDataModule.load_from_checkpoint(checkpoint)
    dm.setup("validate")
    samples = [dm.val_dataset[i] for i in range(len(dm.val_dataset))]
    model = SegmentationModule.load_from_checkpoint(checkpoint, map_location="cpu").eval()
    with torch.no_grad():
        pred = (model(torch.stack([s["image"] for s in samples])).sigmoid() > model.threshold).long()
    target = torch.stack([s["mask"] for s in samples]).long()
    n = len(model.parts)
    dice = dice_score(pred, target, num_classes=n, average="none", input_format="one-hot").nan_to_num(1.0)
    area = (pred.sum(dim=(2, 3)) + target.sum(dim=(2, 3))).double()  # (frames, parts): P + T
    flip = torch.where(area > 1, 2 / (area - 1).clamp(min=1), 1.0).mean(dim=0)  # both empty: 1 -> 0
    value = {f"val/dice_{p}": dice[:, j].mean().item() for j, p in enumerate(model.parts)}
    tol = {f"val/dice_{p}": flip[j].item() for j, p in enumerate(model.parts)}
    value["val/dice_mean"], tol["val/dice_mean"] = dice.mean().item(), flip.mean().item()
    return value, tol


@pytest.fixture(scope="module")
def ddp_fit(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    summary, _ = _jtml(
        "fit", "--config", str(DEMO), *_tiny(tmp, wandb=True), *_ddp(2), "--trainer.max_epochs", "2"
    )
    return tmp, summary


def test_ddp_fit_completes_with_one_summary_and_a_loadable_checkpoint(ddp_fit):
    from jtml.models.segmentation import SegmentationModule

    tmp, summary = ddp_fit
    run_dirs = list((tmp / "runs" / "demo_seg").iterdir())
    assert [str(p) for p in run_dirs] == [summary["run_dir"]]  # both ranks shared one run directory
    model = SegmentationModule.load_from_checkpoint(summary["checkpoint"], map_location="cpu")
    assert model.parts == ["fem", "tib"]
    # The printed val Dice is last.ckpt's over all 3 val frames (both ranks' shares, each once).
    reference, tol = _val_dice_here(summary["checkpoint"])
    for key, value in reference.items():
        assert summary["metrics"][key] == pytest.approx(value, abs=tol[key]), key
    record = json.loads((Path(summary["run_dir"]) / "run.json").read_text())
    assert record["status"] == "finished"
    # rank zero alone logs: one W&B run, with both epochs' metrics and overlays
    (wandb_run,) = (Path(summary["run_dir"]) / "wandb").glob("offline-run-*")
    run = read_offline_run(wandb_run)
    assert len(run.series("val/dice_mean")) == 2
    assert any("val/overlays/filenames" in h for h in run.history)


def test_validate_with_one_and_two_processes_agree_on_odd_val_size(ddp_fit):
    tmp, summary = ddp_fit
    ckpt = ["--ckpt_path", summary["checkpoint"]]
    one, _ = _jtml("validate", "--config", str(DEMO), *_tiny(tmp), *_ddp(1), *ckpt)
    two, _ = _jtml("validate", "--config", str(DEMO), *_tiny(tmp), *_ddp(2), *ckpt)
    reference, tol = _val_dice_here(summary["checkpoint"])
    for key, value in reference.items():  # one flipped pixel per frame apart at most, not bit-equal
        assert one["metrics"][key] == pytest.approx(value, abs=tol[key]), key
        assert two["metrics"][key] == pytest.approx(one["metrics"][key], abs=tol[key]), key
