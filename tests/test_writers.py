"""The prediction writers' shared contract (PredictionFolderWriter): ``out_dir`` (default: the run's
``predictions/``), ``overwrite``, a non-empty folder refused with one error before anything is
predicted, messages on stderr and the JSON summary alone on stdout. End to end through ``jtml
predict`` of a tiny pose experiment (the YAML users run), plus the base class on its own."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl

from jtml.callbacks.pose import PosePredictionWriter
from jtml.callbacks.predict import SegmentationPredictionWriter
from jtml.cli import main
from jtml.errors import JTMLError
from jtml.io import read_poses
from jtml.sim.synth import generate_study

pytestmark = pytest.mark.filterwarnings("ignore:.*(does not have many workers|LeafSpec|log_every_n_steps).*")
EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
FLAG = "--trainer.callbacks.init_args.overwrite true"


def _tiny(root: Path, study: Path) -> list[str]:
    return [
        "--trainer.default_root_dir", str(root), "--trainer.logger", "false",
        "--trainer.enable_progress_bar", "false",  # Lightning's bar writes to stdout: not the writers'
        "--model.init_args.backbone", "resnet10t", "--data.init_args.roi_size", "32",
        "--data.init_args.train_samples", "8", "--data.init_args.val_samples", "4",
        "--data.init_args.batch_size", "4", "--data.init_args.num_workers", "0",
        "--data.init_args.synthetic", "null", "--data.init_args.studies", f"[{study}]",
    ]  # fmt: skip


@pytest.fixture(scope="module", params=["demo_pose.yaml", "pose_from_mask.yaml"])
def pose_run(request, tmp_path_factory) -> tuple[str, Path, str]:
    """A pose experiment YAML, a one-step checkpoint of it and a 4-frame 128² study to predict on."""
    config = str(EXPERIMENTS / request.param)
    tmp = tmp_path_factory.mktemp("writers")
    study = generate_study(tmp / "s1", frames=4, seed=3, size=128, progress=False)
    buf = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(buf):
        mp.chdir(tmp)
        code = main(["fit", "--config", config, "--trainer.fast_dev_run", "1", *_tiny(tmp / "runs", study)])
    assert code == 0
    return config, study, json.loads(buf.getvalue().strip().splitlines()[-1])["checkpoint"]


def _predict(pose_run: tuple[str, Path, str], root: Path, *extra: str) -> int:
    config, study, ckpt = pose_run
    return main(["predict", "--config", config, "--ckpt_path", ckpt, *_tiny(root, study), *extra])


def test_pose_writer_refuses_a_non_empty_out_dir(pose_run, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "poses"
    out.mkdir()
    (out / "keep.txt").write_text("an earlier run's file\n")
    capsys.readouterr()
    assert _predict(pose_run, tmp_path / "runs", "--trainer.callbacks.init_args.out_dir", str(out)) == 2
    captured = capsys.readouterr()
    err = [ln for ln in captured.err.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and err[0].startswith(f"error: {out}: ") and "not empty" in err[0], err
    assert FLAG in err[0]
    assert captured.out == ""  # no summary: nothing ran
    assert [p.name for p in out.iterdir()] == ["keep.txt"]  # nothing written
    assert not (tmp_path / "runs").exists()  # and no run directory left behind


def test_pose_writer_refuses_a_file_as_out_dir(pose_run, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "poses.txt"
    out.write_text("not a folder\n")
    capsys.readouterr()
    assert _predict(pose_run, tmp_path / "runs", "--trainer.callbacks.init_args.out_dir", str(out)) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and err[0].startswith(f"error: {out}: ") and "not a folder" in err[0], err
    assert out.read_text() == "not a folder\n" and not (tmp_path / "runs").exists()


def test_pose_writer_overwrites_when_told_and_stdout_is_the_summary_alone(
    pose_run, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    _, study, _ = pose_run
    out = tmp_path / "poses"
    (out / study.name).mkdir(parents=True)
    (out / study.name / "fem.jts").write_text("stale\n")
    (out / "keep.txt").write_text("an earlier run's file\n")
    capsys.readouterr()
    args = [
        "--trainer.callbacks.init_args.out_dir",
        str(out),
        "--trainer.callbacks.init_args.overwrite",
        "true",
    ]
    assert _predict(pose_run, tmp_path / "runs", *args) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert len(lines) == 1, lines  # the JSON summary and nothing else
    summary = json.loads(lines[0])
    assert Path(summary["run_dir"]).is_dir()
    for part in ("fem", "tib"):
        written = out / study.name / f"{part}.jts"
        poses = read_poses(written, n_frames=4)  # the stale file replaced: one row per frame
        assert np.isfinite(poses).all() and (poses[:, 2] < 0).all()
        assert f"wrote {written} (4 {part} pose(s) of {study.name})" in captured.err
    assert (out / study.name / "report.csv").is_file()
    assert (out / "keep.txt").read_text() == "an earlier run's file\n"  # other files are left alone


@pytest.mark.parametrize("writer", [PosePredictionWriter, SegmentationPredictionWriter])
def test_both_writers_share_the_folder_contract(writer, tmp_path):
    """Default ``<default_root_dir>/predictions``; refused when non-empty unless ``overwrite``."""
    trainer = pl.Trainer(default_root_dir=tmp_path, logger=False, enable_progress_bar=False)
    default = tmp_path / "predictions"
    w = writer()
    w.setup(trainer, None, "fit")  # other stages: nothing checked, nothing set
    assert w.root is None
    w.setup(trainer, None, "predict")
    assert w.root == default
    (default / "x").mkdir(parents=True)
    with pytest.raises(JTMLError) as info:
        writer().setup(trainer, None, "predict")
    assert info.value.path == str(default) and FLAG in str(info.value)
    w = writer(out_dir=str(default), overwrite=True)
    w.setup(trainer, None, "predict")
    assert w.root == default
