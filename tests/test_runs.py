"""`jtml runs`, `jtml reproduce`, `fit --ckpt_path last` and the data fingerprint, on tiny
demo_seg runs (64 px, 2 epochs); metrics are checked against W&B offline files read from disk."""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from jtml.cli import main
from jtml.runs.checkpoints import AtomicCheckpointIO
from jtml.runs.wandb_offline import read_offline_run

DEMO = Path(__file__).resolve().parents[1] / "experiments" / "demo_seg.yaml"
LR = "model.init_args.optimizer.init_args.lr"
LRS = (0.003, 0.01, 0.03)


def _tiny(root: Path, study: Path, epochs: int = 2) -> list[str]:
    synth = {"out": str(study), "frames": 8, "seed": 0, "size": 64}
    return [
        "--trainer.default_root_dir", str(root), "--trainer.max_epochs", str(epochs),
        "--trainer.deterministic", "true",
        "--data.init_args.synthetic", json.dumps(synth), "--data.init_args.image_size", "64",
        "--data.init_args.batch_size", "2", "--data.init_args.num_workers", "0",
        "--data.init_args.val_fraction", "0.25", "--data.init_args.test_fraction", "0.25",
    ]  # fmt: skip


def _run(argv: list[str]) -> tuple[int, str]:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(argv)
    return code, buf.getvalue()


def _fit(root: Path, study: Path, *extra: str, epochs: int = 2) -> dict:
    code, out = _run(["fit", "--config", str(DEMO), *_tiny(root, study, epochs), *extra])
    assert code == 0, out
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def three_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runs")
    summaries = [_fit(tmp / "runs", tmp / "synth", f"--{LR}", str(lr)) for lr in LRS]
    return tmp, summaries


def test_runs_json_lists_config_differences_and_logged_metrics(three_runs):
    tmp, summaries = three_runs
    code, out = _run(["runs", str(tmp / "runs"), "--json"])
    assert code == 0
    rows = json.loads(out)
    assert len(rows) == 3
    by_dir = {row["run_dir"]: row for row in rows}
    for lr, summary in zip(LRS, summaries, strict=True):
        row = by_dir[summary["run_dir"]]
        assert row["status"] == "finished" and row["command"] == "fit" and row["experiment"] == "demo_seg"
        assert row["config_diff"] == {LR: lr}
        # final: what run.json recorded; best: the max of the W&B history, read independently
        recorded = json.loads((Path(summary["run_dir"]) / "run.json").read_text())["metrics"]
        for key in ("val/dice_mean", "val/dice_fem", "val/iou_mean", "val/loss"):
            assert row["final"][key] == pytest.approx(recorded[key], abs=1e-7), key
        history = [v for _, v in read_offline_run(summary["wandb_run"]).series("val/dice_mean")]
        assert len(history) == 2
        assert row["final"]["val/dice_mean"] == pytest.approx(history[-1], abs=1e-7)
        assert row["best"]["val/dice_mean"] == pytest.approx(max(history), abs=1e-7)


def test_runs_table_and_plot(three_runs):
    tmp, summaries = three_runs
    png = tmp / "dice.png"
    code, out = _run(["runs", str(tmp / "runs"), "--metric", "val/loss", "--mode", "min", "--plot", str(png)])
    assert code == 0
    lines = [ln.strip() for ln in out.strip().splitlines()]
    assert lines[0] == "demo_seg: 3 fit"  # one section per experiment, its runs counted by command
    assert lines[1].split()[:3] == ["fit", "status", "lr"]  # lr: the only key that differs
    assert "final val/loss" in lines[1] and "best val/loss" in lines[1]
    assert f"lr = {LR}" in lines  # the abbreviated column, spelled out
    body = [ln for ln in lines if ln.split()[1:2] == ["finished"]]
    assert len(body) == 3
    for lr, summary in zip(LRS, summaries, strict=True):
        (line,) = [ln for ln in body if ln.startswith(Path(summary["run_dir"]).name)]
        assert line.split()[2] == f"{lr:.4g}"
    assert lines[-1] == f"plot: {png}"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000


def test_runs_of_missing_or_empty_logdir_is_one_error(tmp_path, capsys):
    assert main(["runs", str(tmp_path / "nope")]) == 2
    (tmp_path / "empty").mkdir()
    assert main(["runs", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "nope" in err[0] and "empty" in err[1]


def test_data_fingerprint_recorded_in_run_json_and_wandb(three_runs):
    _, summaries = three_runs
    prints = []
    for summary in summaries:
        record = json.loads((Path(summary["run_dir"]) / "run.json").read_text())
        fingerprint = record["data_fingerprint"]
        assert len(fingerprint["sha256"]) == 64 and fingerprint["frames"] == 8
        assert fingerprint["files"] == 8 * 4  # frame, calibration, fem and tib masks
        assert read_offline_run(summary["wandb_run"]).config["data_fingerprint"] == fingerprint
        prints.append(fingerprint["sha256"])
    assert len(set(prints)) == 1  # same data, same fingerprint


def test_same_seed_deterministic_runs_and_reproduce_give_identical_metrics(three_runs):
    tmp, summaries = three_runs
    first = summaries[0]
    again = _fit(tmp / "runs_again", tmp / "synth", f"--{LR}", str(LRS[0]))
    code, out = _run(["reproduce", first["run_dir"]])
    assert code == 0
    reproduced = json.loads(out.strip().splitlines()[-1])
    assert Path(reproduced["run_dir"]).parent == Path(first["run_dir"]).parent
    assert reproduced["run_dir"] != first["run_dir"]
    for other in (again, reproduced):
        for key, value in first["metrics"].items():
            if key.startswith("val/"):
                assert other["metrics"][key] == pytest.approx(value, abs=1e-6), key
    record = json.loads((Path(reproduced["run_dir"]) / "run.json").read_text())
    assert (
        record["data_fingerprint"]
        == json.loads((Path(first["run_dir"]) / "run.json").read_text())["data_fingerprint"]
    )
    # the reproduction's checkpoints are its own: the original run directory is untouched
    assert Path(reproduced["checkpoint"]).parent == Path(reproduced["run_dir"]) / "checkpoints"


def test_reproduce_names_missing_files(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    assert main(["reproduce", str(tmp_path / "run")]) == 2
    assert "run.json" in capsys.readouterr().err
    (tmp_path / "run" / "run.json").write_text('{"argv": ["jtml", "fit"]}')
    assert main(["reproduce", str(tmp_path / "run")]) == 2
    assert "config.yaml" in capsys.readouterr().err


@pytest.mark.slow
def test_resume_last_continues_the_run_directory_and_wandb_run(three_runs):
    tmp, summaries = three_runs
    root = tmp / "resume"
    # stopped after its first epoch (of 2: the cosine schedule's length is the uninterrupted run's)
    one = _fit(root, tmp / "synth", "--trainer.max_steps", "2", epochs=2)
    resumed = _fit(root, tmp / "synth", "--ckpt_path", "last", epochs=2)
    assert resumed["run_dir"] == one["run_dir"]
    assert len(list((root / "demo_seg").iterdir())) == 1
    first_id = Path(one["wandb_run"]).name.rsplit("-", 1)[-1]
    assert Path(resumed["wandb_run"]).name.rsplit("-", 1)[-1] == first_id
    assert Path(resumed["wandb_run"]) != Path(one["wandb_run"])  # one offline folder per start
    ckpt = torch.load(resumed["checkpoint"], map_location="cpu", weights_only=False)
    assert ckpt["epoch"] == 1 and ckpt["global_step"] == 4  # 4 train frames, batch 2: 1 + 1 resumed epoch
    # deterministic, the same seed: the resumed run ends where the uninterrupted one did
    for key, value in summaries[0]["metrics"].items():
        if key.startswith("val/"):
            assert resumed["metrics"][key] == pytest.approx(value, abs=1e-6), key
    record = json.loads((Path(resumed["run_dir"]) / "run.json").read_text())
    assert record["status"] == "finished" and "last" in record["argv"]


def _subprocess_env() -> dict[str, str]:
    """One process set-up for every run a test compares bit for bit: a fresh interpreter with one
    torch CPU thread (the thread count changes the float summation order, see the README)."""
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(Path(__file__).parent)}
    env["OMP_NUM_THREADS"] = "1"
    for key in ("JTML_RUN_DIR", "WANDB_SERVICE"):  # not this pytest process's run dir or W&B service
        env.pop(key, None)
    return env


def _state_dict(ckpt: str | Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]


@pytest.mark.slow
def test_kill_9_in_epoch_2_then_resume_last_equals_the_uninterrupted_run(three_runs):
    """A real SIGKILL of a `jtml fit` process in the middle of its 2nd epoch (test callback
    ``_sigkill.SigkillAt``), then `--ckpt_path last`: every checkpoint left behind loads, and the
    resumed run ends **bit-identical** to the uninterrupted run of the same process set-up (the
    README's promise: same seed, deterministic, same machine, threads and devices). Against the
    same run in another set-up (this pytest process's thread count) only the stated tolerance holds."""
    tmp, summaries = three_runs
    env = _subprocess_env()
    args = [sys.executable, "-m", "jtml.cli", "fit", "--config", str(DEMO)]
    straight = subprocess.run(
        [*args, *_tiny(tmp / "straight", tmp / "synth")], env=env, capture_output=True, text=True
    )
    assert straight.returncode == 0, straight.stderr[-3000:]
    baseline = json.loads(straight.stdout.strip().splitlines()[-1])

    root = tmp / "killed"
    args = [*args, *_tiny(root, tmp / "synth")]
    killer = json.dumps({"class_path": "_sigkill.SigkillAt", "init_args": {"epoch": 1, "batch": 1}})
    proc = subprocess.run([*args, f"--trainer.callbacks+={killer}"], env=env, capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    (run_dir,) = (root / "demo_seg").iterdir()
    assert json.loads((run_dir / "run.json").read_text())["status"] == "running"  # died, no clean-up
    ckpts = sorted((run_dir / "checkpoints").iterdir())
    assert {p.name for p in ckpts} == {"last.ckpt", "best-epoch00.ckpt"}  # no torn or temporary files
    for path in ckpts:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        assert ckpt["epoch"] == 0 and ckpt["global_step"] == 2 and ckpt["optimizer_states"]
    proc = subprocess.run([*args, "--ckpt_path", "last"], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(resumed["run_dir"]) == run_dir
    assert torch.load(resumed["checkpoint"], map_location="cpu", weights_only=False)["epoch"] == 1
    assert resumed["metrics"] == baseline["metrics"]  # every logged value, bit for bit
    weights, expected = _state_dict(resumed["checkpoint"]), _state_dict(baseline["checkpoint"])
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[k], expected[k]) for k in expected)
    assert json.loads((run_dir / "run.json").read_text())["status"] == "finished"
    # another process set-up (threads, interpreter state): equal within the README's tolerance only
    for key, value in summaries[0]["metrics"].items():
        if key.startswith(("val/", "train/")):
            assert baseline["metrics"][key] == pytest.approx(value, rel=1e-3, abs=1e-4), key


@pytest.mark.slow
def test_checkpoint_write_killed_midway_leaves_the_previous_checkpoint_intact(tmp_path):
    """SIGKILL while AtomicCheckpointIO pickles a checkpoint (a value whose pickling kills the
    process): the old file is untouched. Written in place with torch.save, it would be torn."""
    target = tmp_path / "last.ckpt"
    torch.save({"epoch": 0, "w": torch.arange(4.0)}, target)
    before = target.read_bytes()
    script = """
import os, signal, sys, torch
from jtml.runs import AtomicCheckpointIO

class Boom:
    def __reduce__(self):
        os.kill(os.getpid(), signal.SIGKILL)

ckpt = {"epoch": 1, "w": torch.zeros(1 << 20), "z": Boom()}
mode, target = sys.argv[1:]
if mode == "atomic":
    AtomicCheckpointIO().save_checkpoint(ckpt, target)
else:
    torch.save(ckpt, target)
"""
    for mode in ("atomic", "in place"):
        proc = subprocess.run([sys.executable, "-c", script, mode, str(target)], capture_output=True)
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
        if mode == "atomic":
            assert target.read_bytes() == before
            assert torch.load(target, weights_only=True)["epoch"] == 0
            (torn,) = tmp_path.glob(".last.ckpt.tmp-*")  # the killed write's temporary file...
            AtomicCheckpointIO().save_checkpoint({"epoch": 2}, target)
            assert torch.load(target, weights_only=True)["epoch"] == 2 and not torn.exists()  # ...is cleared
            target.write_bytes(before)
        else:  # the control: the same kill tears a checkpoint written in place
            assert target.read_bytes() != before
            with pytest.raises((RuntimeError, EOFError)):  # an empty or a truncated zip
                torch.load(target, weights_only=True)


@pytest.mark.slow
def test_ctrl_c_during_a_checkpoint_write_takes_effect_once_the_checkpoint_is_complete(tmp_path):
    """SIGINT delivered while the checkpoint is being pickled (a value whose pickling sends it): the
    write completes and loads, then KeyboardInterrupt is raised (a run stopped while checkpointing
    is ``interrupted``). Without the deferral the write is torn, or (as seen in CI, when the
    interrupt lands in the zip writer's end) torch.save raises a RuntimeError instead."""
    script = """
import os, signal, sys, torch
from jtml.runs import AtomicCheckpointIO

# Ctrl-C as in a terminal: a child started in the background inherits SIGINT ignored
signal.signal(signal.SIGINT, signal.default_int_handler)

class CtrlC:
    def __reduce__(self):
        os.kill(os.getpid(), signal.SIGINT)
        return (int, (7,))

mode, target = sys.argv[1:]
ckpt = {"epoch": 3, "w": torch.zeros(1 << 16), "z": CtrlC()}
try:
    if mode == "atomic":
        AtomicCheckpointIO().save_checkpoint(ckpt, target)
    else:  # what AtomicCheckpointIO does, without holding the interrupt
        with open(target, "wb") as f:
            torch.save(ckpt, f)
except KeyboardInterrupt:
    sys.exit(130)
"""
    for mode in ("atomic", "plain"):
        target = tmp_path / f"{mode}.ckpt"
        cmd = [sys.executable, "-c", script, mode, str(target)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        assert proc.returncode == 130, proc.stderr[-2000:]  # KeyboardInterrupt reached the caller
        if mode == "atomic":
            ckpt = torch.load(target, weights_only=False)  # CtrlC pickles as a call of int
            assert ckpt["epoch"] == 3 and ckpt["z"] == 7 and not list(tmp_path.glob(".atomic.ckpt.tmp-*"))
        else:  # the control: interrupted mid-pickle, the file is torn
            with pytest.raises((RuntimeError, EOFError, pickle.UnpicklingError)):
                torch.load(target, weights_only=False)


def test_bad_ckpt_path_is_one_error_naming_it(tmp_path, capsys):
    missing = tmp_path / "missing.ckpt"
    args = ["fit", "--config", str(DEMO), *_tiny(tmp_path / "runs", tmp_path / "synth")]
    assert main([*args, "--ckpt_path", str(missing)]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and str(missing) in err[0]
    other = tmp_path / "pose.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"_class_path": "jtml.models.pose.PoseModule"}}, other)
    assert main([*args, "--ckpt_path", str(other)]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and str(other) in err[0] and "PoseModule" in err[0]
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("run.json"))
