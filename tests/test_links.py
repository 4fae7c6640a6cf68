"""The model's data settings (parts, input, roi_size, roi_margin) come from ``data`` by parse-time links
(jtml.cli.links), for every experiment; and the GPU experiments run on a machine without one."""

from __future__ import annotations

import importlib
import inspect
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from jtml.cli import main
from jtml.cli.lightning import JTMLCLI
from jtml.cli.links import LINKED_KEYS

EXPERIMENTS = sorted((Path(__file__).resolve().parents[1] / "experiments").glob("*.yaml"))
DEMO_POSE = EXPERIMENTS[0].with_name("demo_pose.yaml")
DEMO_SEG = EXPERIMENTS[0].with_name("demo_seg.yaml")
pytestmark = pytest.mark.filterwarnings("ignore:.*(does not have many workers|log_every_n_steps).*")


class _Parsed(Exception):
    def __init__(self, config: Any) -> None:
        self.config = config


@pytest.fixture
def parsed(monkeypatch: pytest.MonkeyPatch):
    """``jtml <args>`` parsed as the CLI parses it (links applied), stopped before anything is built."""

    def stop(self: JTMLCLI) -> None:
        raise _Parsed(self.config[self.subcommand])

    monkeypatch.setattr(JTMLCLI, "before_instantiate_classes", stop)

    def parse(args: list[str]) -> Any:
        with pytest.raises(_Parsed) as info:
            main(args)
        return info.value.config

    return parse


def _class(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _error_line(capsys: pytest.CaptureFixture) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(err) == 1, err
    return err[0]


def _pose_args(tmp: Path) -> list[str]:
    synth = {"out": str(tmp / "synth"), "frames": 2, "seed": 0, "size": 256}
    return [
        "--config", str(DEMO_POSE), "--trainer.default_root_dir", str(tmp / "runs"),
        "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
        "--trainer.precision", "32-true", "--trainer.max_epochs", "1",
        "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1",
        "--data.init_args.synthetic", json.dumps(synth), "--data.init_args.train_samples", "4",
        "--data.init_args.val_samples", "2", "--data.init_args.batch_size", "2",
        "--data.init_args.num_workers", "0",
    ]  # fmt: skip


def _seg_args(tmp: Path) -> list[str]:
    synth = {"out": str(tmp / "synth"), "frames": 5, "seed": 0, "size": 64}
    return [
        "--config", str(DEMO_SEG), "--trainer.default_root_dir", str(tmp / "runs"),
        "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1",
        "--data.init_args.synthetic", json.dumps(synth), "--data.init_args.image_size", "64",
        "--data.init_args.batch_size", "2", "--data.init_args.num_workers", "0",
    ]  # fmt: skip


# registration experiments are predict-only (nothing to fit; test_experiments runs them through predict)
TRAINED = [p for p in EXPERIMENTS if "RegistrationDataModule" not in p.read_text()]


@pytest.mark.parametrize("config", TRAINED, ids=[p.stem for p in TRAINED])
def test_every_experiment_gives_the_model_the_datas_settings(config, parsed):
    cfg = parsed(["fit", "--config", str(config), "--data.init_args.parts", "[fem]"])
    model, data = cfg.model.init_args, cfg.data.init_args
    own = inspect.signature(_class(cfg.model.class_path)).parameters
    assert model.parts == ["fem"]  # the data's, from the command line
    for key in LINKED_KEYS:
        if key not in own:  # e.g. a segmentation model has no ROI: nothing is added to it
            assert key not in model
        elif key in data:
            assert model[key] == data[key], key
    # a model value that agrees with the data's (older configs repeated it) is accepted
    cfg = parsed(["fit", "--config", str(config), "--model.init_args.parts", "[fem, tib]"])
    assert cfg.model.init_args.parts == cfg.data.init_args.parts == ["fem", "tib"]


@pytest.mark.parametrize(
    ("experiment", "override", "key"),
    [
        ("pose", "--model.init_args.roi_size=64", "roi_size"),
        ("seg", "--model.init_args.parts=[fem]", "parts"),
    ],
)
def test_a_model_value_contradicting_the_data_is_refused(experiment, override, key, tmp_path, capsys):
    args = _pose_args(tmp_path) if experiment == "pose" else _seg_args(tmp_path)
    assert main(["fit", *args, override]) == 2
    line = _error_line(capsys)
    assert (
        f"model.init_args.{key}" in line and f"data.init_args.{key}" in line and "set it under data" in line
    )
    assert not (tmp_path / "runs").exists() and not (tmp_path / "synth").exists()  # refused while parsing


@pytest.mark.parametrize(("config", "keys"), [(DEMO_POSE, LINKED_KEYS), (DEMO_SEG, ("parts",))])
def test_print_config_shows_each_linked_setting_once(config, keys, capsys):
    extra = ["--data.init_args.roi_size", "96"] if "roi_size" in keys else ["--data.init_args.parts", "[fem]"]
    assert main(["fit", "--config", str(config), *extra, "--print_config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    model, data = printed["model"]["init_args"], printed["data"]["init_args"]
    assert not set(keys) & set(model) and set(keys) <= set(data)
    if "roi_size" in keys:
        assert data["roi_size"] == 96
    else:
        assert data["parts"] == ["fem"]


def test_data_roi_size_reaches_the_model_and_checkpoints_keep_theirs(tmp_path, capsys):
    args = _pose_args(tmp_path)
    assert main(["fit", *args, "--data.init_args.roi_size", "96"]) == 0, capsys.readouterr().err[-3000:]
    ckpt_path = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["checkpoint"]
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    hparams = ckpt["hyper_parameters"]
    assert hparams["roi_size"] == 96 and hparams["parts"] == ["fem", "tib"] and hparams["input"] == "mask"
    # `test --ckpt_path`: the model is the checkpoint's; the links do not stand in its way
    test = ["test", *args, "--ckpt_path", ckpt_path]
    assert main([*test, "--data.init_args.roi_size", "96"]) == 0, capsys.readouterr().err[-3000:]
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert any(k.startswith("test/") for k in summary["metrics"])
    # ... nor in the way of the data following the checkpoint's DataModule (the YAML's roi_size is 80)
    assert main(test) == 0, capsys.readouterr().err[-3000:]
    capsys.readouterr()
    # A checkpoint without its DataModule's settings (older ones): data unlike the trained model is one
    # clear error naming the checkpoint. The YAML's roi_size is 80; the model's input is the class
    # default ("mask"), which a frame DataModule must not silently replace.
    del ckpt["datamodule_hyper_parameters"]
    older = tmp_path / "older.ckpt"
    torch.save(ckpt, older)
    older_test = ["test", *args, "--ckpt_path", str(older)]
    frames = ["--data.init_args.roi_size", "96", "--data.init_args.input", "frame"]
    for extra, needle in [([], "roi_size 96 but data.init_args.roi_size is 80"), (frames, "input 'mask'")]:
        assert main([*older_test, *extra]) == 2
        line = _error_line(capsys)
        assert line.startswith(f"error: {older}: the checkpoint's model has {needle}"), line


@pytest.mark.parametrize("name", ["unet_r34_seg", "jtml_hrnet_seg"])
def test_gpu_experiments_run_without_a_gpu(name, tmp_path, capsys):
    """``accelerator: auto``: on a machine without a GPU the experiment runs on the CPU (it used to stop
    at "No supported gpu backend found!"); nothing here says ``--trainer.accelerator``."""
    synth = {"out": str(tmp_path / "synth"), "frames": 5, "seed": 0, "size": 64}
    args = [
        "fit", "--config", str(DEMO_SEG.with_name(f"{name}.yaml")),
        "--trainer.default_root_dir", str(tmp_path / "runs"), "--trainer.max_epochs", "1",
        "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1",
        "--data.init_args.index", "null", "--data.init_args.synthetic", json.dumps(synth),
        "--data.init_args.image_size", "64", "--data.init_args.batch_size", "2",
        "--data.init_args.num_workers", "0",
    ]  # fmt: skip
    assert main(args) == 0, capsys.readouterr().err[-3000:]
    assert Path(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["checkpoint"]).is_file()
