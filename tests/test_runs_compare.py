"""`jtml runs` over two experiments, on hand-made run directories (run.json, config.yaml and a CSV
logger's metrics.csv, as `jtml fit`/`jtml test` leave them): no training needed."""

from __future__ import annotations

import contextlib
import csv
import io
import json
from pathlib import Path

import pytest
import yaml

from jtml.cli import main
from jtml.cli.runs import collect, figure

LR = "model.init_args.optimizer.init_args.lr"
BS = "data.init_args.batch_size"
SEG, POSE = "seg_unet", "pose_head"


def _config(run_dir: Path, model: str, lr: float, batch_size: int, command: str) -> dict:
    """A LightningCLI-shaped config: the run's own paths and job type differ in every run."""
    return {
        "seed_everything": 1,
        "trainer": {
            "max_epochs": 3,
            "default_root_dir": str(run_dir),
            "logger": [
                {
                    "class_path": "jtml.runs.loggers.WandbLogger",
                    "init_args": {"save_dir": str(run_dir), "job_type": command},
                }
            ],
            "callbacks": [
                {
                    "class_path": "pytorch_lightning.callbacks.ModelCheckpoint",
                    "init_args": {"dirpath": str(run_dir)},
                }
            ],
        },
        "model": {
            "class_path": model,
            "init_args": {"optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": lr}}},
        },
        "data": {"class_path": "jtml.data.SegmentationDataModule", "init_args": {"batch_size": batch_size}},
        "ckpt_path": None if command == "fit" else str(run_dir.parent / "some" / "last.ckpt"),
    }


def _fake_run(
    root: Path,
    experiment: str,
    name: str,
    command: str,
    config: dict,
    rows: list[dict],
    record_command: bool = True,
) -> Path:
    """``<root>/<experiment>/<name>/`` with run.json, config.yaml and csv/version_0/metrics.csv."""
    run_dir = root / experiment / name
    (run_dir / "csv" / "version_0").mkdir(parents=True)
    columns = sorted({k for r in rows for k in r})
    with (run_dir / "csv" / "version_0" / "metrics.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    final = {k: v for r in rows for k, v in r.items() if k not in ("epoch", "step")}
    record = {"status": "finished", "run_dir": str(run_dir), "metrics": final, "argv": ["jtml", command]}
    if record_command:
        record["command"] = command
    (run_dir / "run.json").write_text(json.dumps(record))
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    return run_dir


def _curve(values: list[float], prefix: str = "val") -> list[dict]:
    return [
        {"epoch": i, "step": 10 * (i + 1), f"{prefix}/dice_mean": v, f"{prefix}/loss": 1 - v}
        for i, v in enumerate(values)
    ]


SEG_FITS = {  # lr -> val/dice_mean per epoch
    0.001: [0.2, 0.5, 0.4],
    0.01: [0.3, 0.6, 0.7],
    0.1: [0.1, 0.15, 0.05],
}
POSE_FITS = {4: [0.4, 0.45, 0.5], 8: [0.35, 0.55, 0.52]}  # batch_size -> val/dice_mean


@pytest.fixture
def logdir(tmp_path: Path) -> Path:
    """Two experiments: 3 seg fits (lr differs) and a test of the first; 2 pose fits (batch size
    differs, another model and lr than the seg ones: those keys differ only across experiments)."""
    root = tmp_path / "runs"
    for i, (lr, values) in enumerate(SEG_FITS.items()):
        d = root / SEG / f"20250101-00000{i}-aaaa0{i}"
        _fake_run(
            root,
            SEG,
            d.name,
            "fit",
            _config(d, "jtml.models.SegmentationModule", lr, 2, "fit"),
            _curve(values),
        )
    d = root / SEG / "20250101-000009-test01"
    test_rows = [{"epoch": 0, "step": 30, "test/dice_mean": 0.42, "test/loss": 0.58}]
    _fake_run(
        root, SEG, d.name, "test", _config(d, "jtml.models.SegmentationModule", 0.001, 2, "test"), test_rows
    )
    for i, (bs, values) in enumerate(POSE_FITS.items()):
        d = root / POSE / f"20250102-00000{i}-bbbb0{i}"
        _fake_run(
            root, POSE, d.name, "fit", _config(d, "jtml.models.PoseModule", 0.0003, bs, "fit"), _curve(values)
        )
    return root


def _run(argv: list[str]) -> tuple[int, str]:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(argv)
    return code, buf.getvalue()


def test_runs_json_config_differences_within_each_experiment_and_commands(logdir):
    code, out = _run(["runs", str(logdir), "--json"])
    assert code == 0
    rows = {Path(r["run_dir"]).name: r for r in json.loads(out)}
    assert len(rows) == 6
    seg = {n: r for n, r in rows.items() if r["experiment"] == SEG}
    pose = {n: r for n, r in rows.items() if r["experiment"] == POSE}
    assert len(seg) == 4 and len(pose) == 2
    # only what differs inside the experiment: lr for seg, batch size for pose (not the model class,
    # nor lr, which differ only between the experiments; nor paths, job type and ckpt_path)
    assert sorted(r["config_diff"][LR] for r in seg.values()) == [0.001, 0.001, 0.01, 0.1]
    assert all(list(r["config_diff"]) == [LR] for r in seg.values())
    assert {r["config_diff"][BS] for r in pose.values()} == {4, 8}
    assert all(list(r["config_diff"]) == [BS] for r in pose.values())
    fits = [r for r in rows.values() if r["command"] == "fit"]
    assert len(fits) == 5 and all(r["metric"] == "val/dice_mean" for r in fits)
    for r in seg.values():
        if r["command"] == "fit":
            values = SEG_FITS[r["config_diff"][LR]]
            assert r["final"]["val/dice_mean"] == pytest.approx(values[-1])
            assert r["final"]["val/loss"] == pytest.approx(1 - values[-1])
            assert r["best"] == {"val/dice_mean": pytest.approx(max(values))}
    # the test run: compared on what it logged (test/...), never read as a fit's val/ metric
    (test,) = [r for r in rows.values() if r["command"] == "test"]
    assert test["experiment"] == SEG and test["status"] == "finished" and test["metric"] == "test/dice_mean"
    assert test["final"] == {"test/dice_mean": pytest.approx(0.42), "test/loss": pytest.approx(0.58)}
    assert test["best"] == {"test/dice_mean": pytest.approx(0.42)}


def test_runs_table_one_section_per_experiment_and_evaluations_apart(logdir):
    code, out = _run(["runs", str(logdir), "--metric", "val/dice_mean"])
    assert code == 0
    sections = out.strip().split("\n\n")
    assert [s.splitlines()[0] for s in sections] == [f"{POSE}: 2 fit", f"{SEG}: 3 fit, 1 test"]
    pose, seg = (s.splitlines() for s in sections)
    # pose: batch size is the only key column; lr and the model class are not shown
    assert pose[1].split() == [
        "fit",
        "status",
        "batch_size",
        "final",
        "val/dice_mean",
        "best",
        "val/dice_mean",
    ]
    assert pose[-1].strip() == f"batch_size = {BS}"
    for bs, values in POSE_FITS.items():
        (line,) = [ln for ln in pose if ln.split()[2:3] == [str(bs)]]
        assert line.split()[1:] == ["finished", str(bs), f"{values[-1]:.4g}", f"{max(values):.4g}"]
    # seg: the fits' table, then the test run's own table with its own metric
    assert seg[1].split() == ["fit", "status", "lr", "final", "val/dice_mean", "best", "val/dice_mean"]
    fit_lines = seg[2:5]
    for lr, values in SEG_FITS.items():
        (line,) = [ln for ln in fit_lines if ln.split()[2] == f"{lr:.4g}"]
        assert line.split()[3:] == [f"{values[-1]:.4g}", f"{max(values):.4g}"]
    assert seg[5].split() == ["test", "status", "lr", "test/dice_mean"]
    assert seg[6].split() == ["20250101-000009-test01", "finished", "0.001", "0.42"]
    assert seg[7].strip() == f"lr = {LR}"
    assert max(len(ln) for ln in out.splitlines()) < 100  # no column per key of every experiment (was 184)


def test_runs_command_of_a_record_without_one_comes_from_its_argv(tmp_path):
    d = tmp_path / "runs" / SEG / "old"
    _fake_run(
        tmp_path / "runs", SEG, "old", "validate", _config(d, "m.M", 0.1, 2, "validate"), _curve([0.3]), False
    )
    code, out = _run(["runs", str(tmp_path / "runs"), "--json"])
    (row,) = json.loads(out)
    assert code == 0 and row["command"] == "validate" and row["final"]["val/dice_mean"] == pytest.approx(0.3)


def test_runs_plot_one_subplot_per_experiment_legend_outside_readable_with_12_runs(logdir, tmp_path):
    lrs = [round(0.001 * (i + 1), 3) for i in range(9)]  # 9 more seg fits: 12 in all
    for i, lr in enumerate(lrs):
        d = logdir / SEG / f"20250103-00000{i}-cccc0{i}"
        config = _config(d, "jtml.models.SegmentationModule", lr, 2, "fit")
        _fake_run(logdir, SEG, d.name, "fit", config, _curve([0.1 * i, 0.05 * i + 0.2]))
    fig = figure(collect(logdir, "val/dice_mean", "max"), "val/dice_mean")
    fig.canvas.draw()
    axes = fig.get_axes()
    assert [ax.get_title(loc="left") for ax in axes] == [POSE, SEG]
    for ax, fits in zip(axes, (2, 12), strict=True):
        legend = ax.get_legend()
        labels = [t.get_text() for t in legend.get_texts()]
        assert len(labels) == len(ax.get_lines()) == fits  # the test run has no val/ curve
        box, frame = legend.get_window_extent(), ax.get_window_extent()
        assert box.x0 >= frame.x1 and box.x1 <= fig.bbox.x1 + 1  # right of the axes, inside the figure
        assert len({tuple(line.get_color()) if not isinstance(line.get_color(), str) else line.get_color()
                    for line in ax.get_lines()}) == fits  # fmt: skip
    seg_labels = [t.get_text() for t in axes[1].get_legend().get_texts()]
    assert "20250103-000004-cccc04 lr=0.005" in seg_labels  # run directory + abbreviated differing key
    assert all(len(label) < 40 for label in seg_labels)
    pose_labels = [t.get_text() for t in axes[0].get_legend().get_texts()]
    assert sorted(pose_labels) == [
        "20250102-000000-bbbb00 batch_size=4",
        "20250102-000001-bbbb01 batch_size=8",
    ]
    # the CLI writes it, and says where
    png = tmp_path / "plots" / "dice.png"
    code, out = _run(["runs", str(logdir), "--plot", str(png)])
    assert code == 0 and out.strip().endswith(f"plot: {png}")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_runs_plot_of_only_evaluation_runs_is_one_error(tmp_path, capsys):
    d = tmp_path / "runs" / SEG / "t"
    rows = [{"epoch": 0, "step": 3, "test/dice_mean": 0.4}]
    _fake_run(tmp_path / "runs", SEG, "t", "test", _config(d, "m.M", 0.1, 2, "test"), rows)
    png = tmp_path / "t.png"
    assert main(["runs", str(tmp_path / "runs"), "--metric", "test/dice_mean", "--plot", str(png)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "no fit run logged 'test/dice_mean'" in err[0]
    assert not png.exists()


def test_runs_same_experiment_name_under_two_roots_are_two_sections(tmp_path):
    for root, lrs in (("old", (0.1, 0.2)), ("new", (0.3, 0.3))):
        for i, lr in enumerate(lrs):
            d = tmp_path / root / SEG / f"r{i}"
            _fake_run(tmp_path / root, SEG, d.name, "fit", _config(d, "m.M", lr, 2 + i, "fit"), _curve([0.5]))
    code, out = _run(["runs", str(tmp_path), "--json"])
    rows = json.loads(out)
    assert code == 0 and sorted({r["experiment"] for r in rows}) == [f"new/{SEG}", f"old/{SEG}"]
    # compared within each: in new/ only the batch size differs, in old/ also the lr
    assert [sorted(r["config_diff"]) for r in rows if r["experiment"] == f"new/{SEG}"] == [[BS], [BS]]
    assert [sorted(r["config_diff"]) for r in rows if r["experiment"] == f"old/{SEG}"] == [[BS, LR], [BS, LR]]
