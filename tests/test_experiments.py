"""Every experiment YAML runs for one fast step (tiny size, one batch), so no config can rot."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import yaml

from jtml.cli import main

EXPERIMENTS = sorted((Path(__file__).resolve().parents[1] / "experiments").glob("*.yaml"))
CPU_ONE_STEP = [
    "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.precision", "32-true",
    "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1",
    "--trainer.num_sanity_val_steps", "0",
]  # fmt: skip


def _seg_data(tmp: Path) -> list[str]:
    synth = {"out": str(tmp / "synth"), "frames": 5, "seed": 0, "size": 64}
    return [
        "--data.init_args.index", "null", "--data.init_args.studies", "null",
        "--data.init_args.synthetic", json.dumps(synth), "--data.init_args.image_size", "64",
        "--data.init_args.batch_size", "2", "--data.init_args.num_workers", "0",
    ]  # fmt: skip


def _pose_data(tmp: Path) -> list[str]:
    synth = {"out": str(tmp / "synth"), "frames": 2, "seed": 0, "size": 256}
    return [
        "--data.init_args.synthetic", json.dumps(synth), "--data.init_args.train_samples", "4",
        "--data.init_args.val_samples", "2", "--data.init_args.batch_size", "2",
        "--data.init_args.num_workers", "0",
    ]  # fmt: skip


def _registration_data(tmp: Path) -> list[str]:
    synth = {"out": str(tmp / "synth"), "frames": 2, "seed": 0, "size": 128}
    stages = [{"range": [2, 2, 10, 4, 4, 4], "scale": 0.5, "population": 6, "generations": 2}]
    return ["--data.init_args.synthetic", json.dumps(synth), "--model.init_args.stages", json.dumps(stages)]


TINY_DATA = {
    "jtml.data.segmentation.FluoroSegDataModule": _seg_data,
    "jtml.data.pose.FluoroPoseDataModule": _pose_data,
    "jtml.data.registration.RegistrationDataModule": _registration_data,
}


def _registration_runs_one_fast_predict(config: Path, tmp_path: Path, capsys) -> None:
    """A registration experiment has nothing to fit: `jtml predict` registers its (tiny) study."""
    args = ["predict", "--config", str(config), "--trainer.default_root_dir", str(tmp_path / "runs")]
    code = main([*args, *_registration_data(tmp_path)])
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 0, out[-20:]
    run_dir = Path(json.loads(out[-1])["run_dir"])
    assert run_dir.parent == tmp_path / "runs" / config.stem
    assert json.loads((run_dir / "run.json").read_text())["status"] == "finished"
    predictions = run_dir / "predictions"
    rows = (predictions / "report.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * 2  # a header, then 2 frames x 2 parts
    assert {p.name for p in predictions.glob("*.jt*")} <= {"fem.jts", "tib.jts", "fem.jtak", "tib.jtak"}


def test_readme_documents_exactly_the_experiments():
    """Every experiment YAML (sweeps included) is named in the README, and every one it or the
    Makefile names exists: adding, renaming or removing one without the docs fails here."""
    root = Path(__file__).resolve().parents[1]

    def named(doc: str) -> set[str]:
        return set(re.findall(r"experiments/[a-z0-9_/]+\.yaml", (root / doc).read_text()))

    on_disk = {p.relative_to(root).as_posix() for p in (root / "experiments").rglob("*.yaml")}
    readme = named("README.md")
    assert readme == on_disk, {"undocumented": on_disk - readme, "missing": readme - on_disk}
    makefile = named("Makefile")
    assert "experiments/demo_seg.yaml" in makefile and makefile <= on_disk  # README: `make demo` runs it


@pytest.mark.parametrize("config", EXPERIMENTS, ids=[p.stem for p in EXPERIMENTS])
def test_experiment_runs_one_fast_step(config, tmp_path, capsys):
    spec = yaml.safe_load(config.read_text())
    assert isinstance(spec.get("seed_everything"), int) and not isinstance(spec["seed_everything"], bool)
    if spec["model"]["class_path"].endswith(".RegistrationModule"):
        _registration_runs_one_fast_predict(config, tmp_path, capsys)
        return
    data_class = spec["data"]["class_path"]
    assert data_class in TINY_DATA, f"{config.name}: add tiny-data overrides for {data_class} to this test"
    args = [
        "fit",
        "--config",
        str(config),
        *CPU_ONE_STEP,
        "--trainer.default_root_dir",
        str(tmp_path / "runs"),
    ]
    code = main([*args, *TINY_DATA[data_class](tmp_path)])
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 0, out[-20:]
    summary = json.loads(out[-1])
    run_dir = Path(summary["run_dir"])
    assert run_dir.parent == tmp_path / "runs" / config.stem
    assert Path(summary["checkpoint"]).is_file()
    assert (run_dir / "config.yaml").is_file()
    assert json.loads((run_dir / "run.json").read_text())["status"] == "finished"
    monitors = [
        cb["init_args"]["monitor"]
        for cb in spec["trainer"].get("callbacks") or []
        if cb["class_path"].endswith(".ModelCheckpoint") and cb.get("init_args", {}).get("monitor")
    ]
    assert monitors, f"{config.name}: no ModelCheckpoint monitor"
    for key in monitors:  # what the checkpoint watches was logged, as a number
        assert key in summary["metrics"] and math.isfinite(summary["metrics"][key]), (key, summary["metrics"])
