"""Module paths of the first layout still work: YAMLs, run records and checkpoints name classes by them."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

from jtml._moved import MOVED, is_subclass, resolve_class, same_class
from jtml.callbacks.system import CPUThreads
from jtml.cli import main
from jtml.data.segmentation import FluoroSegDataModule

ROOT = Path(__file__).resolve().parents[1]
OLD_PATHS = {  # what experiments/demo_seg.yaml said before the reshape
    "jtml.runs.loggers.WandbLogger": "jtml.loggers.WandbLogger",
    "jtml.callbacks.images.WandbSegmentationImages": "jtml.callbacks.WandbSegmentationImages",
    "jtml.callbacks.predict.SegmentationPredictionWriter": (
        "jtml.callbacks_predict.SegmentationPredictionWriter"
    ),
    "jtml.data.segmentation.FluoroSegDataModule": "jtml.data.datamodule.FluoroSegDataModule",
}


def test_every_old_module_imports_and_names_its_new_home():
    for old, new in MOVED.items():
        sys.modules.pop(old, None)
        with pytest.warns(FutureWarning, match=new[0]):
            module = importlib.import_module(old)
        for target in new:
            importlib.import_module(target)  # every listed home exists
        assert module.__name__ == old


def test_old_class_paths_resolve_to_the_same_classes():
    assert resolve_class("jtml.data.datamodule.FluoroSegDataModule") is FluoroSegDataModule
    assert resolve_class("jtml.callbacks_pose.CPUThreads") is CPUThreads
    assert is_subclass("jtml.data.datamodule.FluoroSegDataModule", FluoroSegDataModule)
    seg, pose = "jtml.data.segmentation.FluoroSegDataModule", "jtml.data.pose.FluoroPoseDataModule"
    assert same_class("jtml.data.datamodule.FluoroSegDataModule", seg) and not same_class(pose, seg)
    assert resolve_class("jtml.nowhere.Thing") is None and resolve_class("") is None
    with pytest.raises(AttributeError, match="has no 'Nothing'"):
        importlib.import_module("jtml.callbacks_pose").Nothing  # noqa: B018


def test_a_yaml_with_the_old_class_paths_still_runs(tmp_path, capsys):
    text = (ROOT / "experiments" / "demo_seg.yaml").read_text()
    for new, old in OLD_PATHS.items():
        assert new in text
        text = text.replace(new, old)
    config = tmp_path / "old_layout.yaml"
    config.write_text(text)
    synth = {"out": str(tmp_path / "synth"), "frames": 5, "seed": 0, "size": 64}
    code = main(
        ["fit", "--config", str(config), "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1",
         "--trainer.limit_val_batches", "1", "--trainer.default_root_dir", str(tmp_path / "runs"),
         "--data.init_args.synthetic", json.dumps(synth), "--data.init_args.image_size", "64",
         "--data.init_args.batch_size", "2", "--data.init_args.num_workers", "0"]
    )  # fmt: skip
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 0, out[-20:]
    summary = json.loads(out[-1])
    assert Path(summary["run_dir"]).parent == tmp_path / "runs" / "old_layout"
    assert "val/dice_mean" in summary["metrics"]
