"""Learning-rate schedule lengths follow the trainer (jtml.models.schedules): OneCycleLR's
``total_steps`` is the run's optimizer steps and it steps per batch, CosineAnnealingLR's ``T_max`` is
``max_epochs``, and a length the config gives that is shorter than the run is refused before training."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from jsonargparse import ArgumentParser
from torch.utils.data import DataLoader

from jtml.cli import main
from jtml.errors import JTMLError
from jtml.models.schedules import scheduler_config
from jtml.models.segmentation import SegmentationModule

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
pytestmark = pytest.mark.filterwarnings("ignore:.*(does not have many workers|log_every_n_steps).*")


# -- a real fit, with the scheduler callable built the way LightningCLI builds it -------------------------


def _module(lr_scheduler: str) -> SegmentationModule:
    """A tiny SegmentationModule whose ``lr_scheduler`` comes from a YAML snippet through jsonargparse
    (a ``partial`` of every init arg, defaults included: what ``jtml fit`` hands the module)."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(SegmentationModule, "model")
    cfg = parser.parse_string(
        f"""
model:
  parts: [fem, tib]
  encoder_name: resnet18
  encoder_depth: 3
  model_kwargs: {{decoder_channels: [16, 8, 4]}}
  optimizer: {{class_path: torch.optim.SGD, init_args: {{lr: 0.01}}}}
  lr_scheduler: {lr_scheduler}
"""
    )
    return parser.instantiate_classes(cfg).model


def _loader(n: int = 12, batch_size: int = 4) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    masks = (torch.rand(n, 2, 32, 32, generator=g) > 0.5).float()
    samples = [
        {"image": masks[i, :1] + 0.1 * torch.randn(1, 32, 32, generator=g), "mask": masks[i]}
        for i in range(n)
    ]
    return DataLoader(samples, batch_size=batch_size)


class LearningRates(pl.Callback):
    """The learning rate each training step uses (read before the step, as the optimizer sees it)."""

    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_batch_start(self, trainer: pl.Trainer, *args: object) -> None:
        self.values.append(trainer.optimizers[0].param_groups[0]["lr"])


def _fit(
    model: SegmentationModule, tmp_path: Path, **trainer_kwargs: object
) -> tuple[pl.Trainer, list[float]]:
    lrs = LearningRates()
    trainer = pl.Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path, callbacks=[lrs],
        **trainer_kwargs,
    )  # fmt: skip
    trainer.fit(model, _loader())
    return trainer, lrs.values


def test_one_cycle_total_steps_are_the_trainers_stepping_batches(tmp_path):
    max_lr = 0.01
    model = _module(f"{{class_path: torch.optim.lr_scheduler.OneCycleLR, init_args: {{max_lr: {max_lr}}}}}")
    trainer, lrs = _fit(model, tmp_path, max_epochs=2)
    (config,) = trainer.lr_scheduler_configs
    scheduler = config.scheduler
    assert isinstance(scheduler, torch.optim.lr_scheduler.OneCycleLR) and config.interval == "step"
    assert scheduler.total_steps == trainer.estimated_stepping_batches == 2 * 3  # 12 samples, batches of 4
    assert scheduler.last_epoch == scheduler.total_steps  # the whole schedule ran, once per batch
    assert len(lrs) == 6 and lrs[0] == pytest.approx(max_lr / 25)  # div_factor 25
    assert max(lrs) > 0.5 * max_lr  # through the peak ...
    assert lrs[-1] == pytest.approx(max_lr / 25 / 1e4, rel=1e-6)  # ... to the final LR (final_div_factor 1e4)


def test_cosine_t_max_follows_max_epochs(tmp_path):
    model = _module("{class_path: jtml.models.schedules.CosineAnnealingLR}")
    trainer, lrs = _fit(model, tmp_path, max_epochs=3)
    (config,) = trainer.lr_scheduler_configs
    assert config.interval == "epoch" and config.scheduler.T_max == 3
    assert lrs[::3] == pytest.approx([0.01, 0.01 * 0.75, 0.01 * 0.25])  # cos over 3 epochs: 1, 3/4, 1/4
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # eta_min at the end


def test_scheduler_config_without_a_fit():
    """Outside a fit there is no run to follow: a given length is kept, a missing one is an error."""
    from jtml.models.schedules import CosineAnnealingLR

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    cosine = functools.partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=7)
    kept = scheduler_config(cosine, opt, None)
    assert kept["scheduler"].T_max == 7 and kept["interval"] == "epoch"
    with pytest.raises(JTMLError, match=r"T_max.*no trainer is attached"):
        scheduler_config(CosineAnnealingLR, opt, None)
    plateau = scheduler_config(torch.optim.lr_scheduler.ReduceLROnPlateau, opt, None, monitor="val/loss")
    assert plateau["monitor"] == "val/loss" and plateau["interval"] == "epoch"
    one_cycle = functools.partial(
        torch.optim.lr_scheduler.OneCycleLR, max_lr=0.1, total_steps=10, pct_start=0.1
    )
    with pytest.raises(JTMLError, match="phase of zero steps"):  # torch divides by zero there
        scheduler_config(one_cycle, opt, None)


# -- the experiments, through `jtml fit` ---------------------------------------------------------------------


def _pose_args(tmp: Path) -> list[str]:
    """demo_pose.yaml (OneCycleLR) on 8 rendered samples in batches of 4: 2 optimizer steps an epoch."""
    synth = {"out": str(tmp / "synth"), "frames": 2, "seed": 0, "size": 256}
    return [
        "fit", "--config", str(EXPERIMENTS / "demo_pose.yaml"),
        "--trainer.default_root_dir", str(tmp / "runs"), "--trainer.logger", "false",
        "--trainer.enable_progress_bar", "false", "--trainer.precision", "32-true",
        "--trainer.limit_val_batches", "1", "--data.init_args.synthetic", json.dumps(synth),
        "--data.init_args.train_samples", "8", "--data.init_args.val_samples", "2",
        "--data.init_args.batch_size", "4", "--data.init_args.num_workers", "0",
    ]  # fmt: skip


def _seg_args(tmp: Path) -> list[str]:
    """demo_seg.yaml (cosine annealing) on a 64-px synthetic study, one batch an epoch."""
    synth = {"out": str(tmp / "synth"), "frames": 5, "seed": 0, "size": 64}
    return [
        "fit", "--config", str(EXPERIMENTS / "demo_seg.yaml"),
        "--trainer.default_root_dir", str(tmp / "runs"), "--trainer.logger", "false",
        "--trainer.enable_progress_bar", "false",
        "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1",
        "--data.init_args.synthetic", json.dumps(synth), "--data.init_args.image_size", "64",
        "--data.init_args.batch_size", "2", "--data.init_args.num_workers", "0",
    ]  # fmt: skip


def _fit_cli(args: list[str], capsys: pytest.CaptureFixture) -> tuple[dict, dict]:
    """Run ``jtml fit``; the summary line and the last checkpoint's saved scheduler state."""
    assert main(args) == 0, capsys.readouterr().err[-3000:]
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    ckpt = torch.load(summary["checkpoint"], map_location="cpu", weights_only=True)
    (scheduler,) = ckpt["lr_schedulers"]
    return summary, scheduler


def test_demo_pose_one_cycle_follows_max_epochs(tmp_path, capsys):
    """The issue's case: `--trainer.max_epochs 2` used to stop at a third of the YAML's 768 steps."""
    _, scheduler = _fit_cli([*_pose_args(tmp_path), "--trainer.max_epochs", "2"], capsys)
    assert scheduler["total_steps"] == 2 * 2  # 2 epochs of 2 optimizer steps
    assert scheduler["last_epoch"] == scheduler["total_steps"]  # stepped per batch, to the end


def test_demo_seg_cosine_t_max_follows_max_epochs(tmp_path, capsys):
    _, scheduler = _fit_cli([*_seg_args(tmp_path), "--trainer.max_epochs", "3"], capsys)
    assert scheduler["T_max"] == 3


@pytest.mark.parametrize(
    ("experiment", "override", "key"),
    [
        ("pose", ["--model.init_args.lr_scheduler.init_args.total_steps", "3"], "total_steps"),  # run: 4
        ("seg", ["--model.init_args.lr_scheduler.init_args.T_max", "1"], "T_max"),  # run: 2 epochs
        (
            "seg",
            ["--model.init_args.lr_scheduler", '{"class_path": "torch.optim.lr_scheduler.CosineAnnealingLR", '
             '"init_args": {"T_max": 1}}'],
            "T_max",
        ),
    ],
    ids=["one_cycle_total_steps", "jtml_cosine_t_max", "torch_cosine_t_max"],
)  # fmt: skip
def test_a_given_length_shorter_than_the_run_is_refused_before_training(
    experiment, override, key, tmp_path, capsys
):
    args = (_pose_args if experiment == "pose" else _seg_args)(tmp_path)
    assert main([*args, "--trainer.max_epochs", "2", *override]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(err) == 1, err
    assert f"model.init_args.lr_scheduler.init_args.{key}" in err[0] and "shorter than this run" in err[0]
    assert not list((tmp_path / "runs").rglob("*.ckpt"))  # refused before any training step
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_resuming_into_a_longer_run_than_the_checkpoints_schedule_is_refused(tmp_path, capsys):
    """The checkpoint's scheduler state (T_max 1, made for a 1-epoch run) is restored on resume: a
    2-epoch resume would restart the cosine (a OneCycleLR would crash when it ran out of steps)."""
    first, scheduler = _fit_cli([*_seg_args(tmp_path), "--trainer.max_epochs", "1"], capsys)
    assert scheduler["T_max"] == 1
    assert main([*_seg_args(tmp_path), "--trainer.max_epochs", "2", "--ckpt_path", "last"]) == 2
    line = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error: ")]
    assert len(line) == 1 and "has T_max 1 (the run it was made for) but this run takes 2 epochs" in line[0]
    ckpt = torch.load(first["checkpoint"], map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 0  # refused before a training step: the checkpoint is the first run's
