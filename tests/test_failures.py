"""No silent wrong results from the Lightning commands: a typo in an index path, a checkpoint's data
settings, a reproduction, Ctrl-C, inputs refused before W&B starts, abbreviated keys, and DDP runs
that would not train or that fail on a rank other than zero (issue "No silent wrong results")."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from jtml.cli import main

DEMO = Path(__file__).resolve().parents[1] / "experiments" / "demo_seg.yaml"


def _tiny(tmp: Path, frames: int = 8, size: int = 64, root: str | None = None) -> list[str]:
    synth = {"out": str(tmp / f"synth{frames}"), "frames": frames, "seed": 0, "size": size}
    return [
        "--trainer.default_root_dir", root or str(tmp / "runs"), "--trainer.max_epochs", "1",
        "--trainer.deterministic", "true",
        "--data.init_args.synthetic", json.dumps(synth), "--data.init_args.image_size", str(size),
        "--data.init_args.batch_size", "2", "--data.init_args.num_workers", "0",
        "--data.init_args.val_fraction", "0.25", "--data.init_args.test_fraction", "0.25",
    ]  # fmt: skip


def _run(argv: list[str]) -> tuple[int, str]:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(argv)
    return code, buf.getvalue()


def _summary(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def _env(threads: int = 1) -> dict[str, str]:
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(threads)}
    env["PYTHONPATH"] = str(Path(__file__).parent)
    for key in ("JTML_RUN_DIR", "WANDB_SERVICE"):
        env.pop(key, None)
    return env


def _jtml(*args: str, cwd: Path | None = None, timeout: int = 420) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "jtml.cli", *args]
    return subprocess.run(cmd, env=_env(), cwd=cwd, capture_output=True, text=True, timeout=timeout)


def _tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (not W&B's link to its service's shared log)."""
    files = [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()]
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture(scope="module")
def fitted64(tmp_path_factory) -> tuple[Path, dict]:
    """One tiny fit at 64 px (the YAML says 128): a checkpoint whose data settings differ from the YAML's."""
    tmp = tmp_path_factory.mktemp("fit64")
    code, out = _run(["fit", "--config", str(DEMO), *_tiny(tmp)])
    assert code == 0, out
    return tmp, _summary(out)


# -- item 3: an index the user names ---------------------------------------------------------------
def test_missing_index_is_an_error_and_nothing_is_written(tmp_path, capsys):
    nope = tmp_path / "data" / "nope.csv"
    args = ["fit", "--config", str(DEMO), *_tiny(tmp_path), "--data.init_args.index", str(nope)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error:") and str(nope) in err[-1] and "not found" in err[-1]
    assert not nope.exists() and not nope.parent.exists()  # 829f297 wrote it and trained on it
    assert not (tmp_path / "runs").exists() and not (tmp_path / "synth8").exists()


def test_generating_the_synthetic_study_is_announced(fitted64, capsys):
    tmp, _ = fitted64
    args = _tiny(tmp)
    args[args.index("--data.init_args.synthetic") + 1] = json.dumps(
        {"out": str(tmp / "fresh"), "frames": 4, "seed": 3, "size": 32}
    )
    split = ["--data.init_args.val_fraction", "0.5", "--data.init_args.test_fraction", "0.0"]
    code, _ = _run(["validate", "--config", str(DEMO), *args, "--data.init_args.image_size", "32", *split])
    assert code == 0
    assert f"jtml: generating the synthetic study {tmp / 'fresh'} (first use)" in capsys.readouterr().err


# -- item 4: data settings follow the checkpoint ---------------------------------------------------
def test_test_takes_the_checkpoints_image_size_and_refuses_a_contradiction(fitted64, capsys):
    tmp, fit = fitted64
    base = ["test", "--config", str(DEMO), *_tiny(tmp), "--ckpt_path", fit["checkpoint"]]
    explicit = [a for a in base]  # the tiny args set image_size 64 on the command line: agrees
    code, out = _run(explicit)
    assert code == 0
    at64 = _summary(out)["metrics"]
    # without it on the command line the YAML says 128; the checkpoint's 64 must win, with a note
    i = base.index("--data.init_args.image_size")
    follow = base[:i] + base[i + 2 :]
    capsys.readouterr()
    code, out = _run(follow)
    assert code == 0
    assert "jtml: data image_size 64 from the checkpoint (the config says 128)" in capsys.readouterr().err
    assert _summary(out)["metrics"] == pytest.approx(at64, abs=1e-6)  # 829f297: evaluated at 128
    contradiction = [*follow, "--data.init_args.image_size", "128"]
    assert main(contradiction) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        err[-1].startswith("error:")
        and "image_size 128 contradicts the checkpoint's image_size 64" in err[-1]
    )
    assert fit["checkpoint"] in err[-1]


# -- item 7: inputs refused before W&B starts ------------------------------------------------------
def test_bad_index_header_is_refused_before_wandb_and_leaves_nothing(tmp_path, capsys):
    bad = tmp_path / "index.csv"
    bad.write_text("frame,image\nf0,x.tif\n")
    args = [*_tiny(tmp_path), "--data.init_args.synthetic", "null", "--data.init_args.index", str(bad)]
    assert main(["fit", "--config", str(DEMO), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: {bad}")  # the error is the last line printed
    assert not any("wandb" in line.lower() for line in err)
    assert not (tmp_path / "runs").exists()


def test_non_empty_predict_folder_is_refused_before_wandb_and_leaves_nothing(fitted64, tmp_path, capsys):
    src, fit = fitted64
    out_dir = tmp_path / "preds"
    out_dir.mkdir()
    (out_dir / "keep.txt").write_text("not yours")
    root = tmp_path / "runs"
    args = ["predict", "--config", str(DEMO), *_tiny(src, root=str(root)), "--ckpt_path", fit["checkpoint"],
            "--trainer.callbacks.init_args.out_dir", str(out_dir)]  # fmt: skip
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: {out_dir}") and "not empty" in err[-1]
    assert not any("wandb" in line.lower() for line in err)
    assert not root.exists() and [p.name for p in out_dir.iterdir()] == ["keep.txt"]


# -- item 11: no abbreviations ---------------------------------------------------------------------
def test_abbreviated_key_is_an_unknown_key(tmp_path, capsys):
    assert main(["fit", "--config", str(DEMO), *_tiny(tmp_path), "--trainer.max_epoch", "2"]) == 2
    assert "max_epoch" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


# -- item 5: a reproduction writes only inside its own run directory -------------------------------
@pytest.mark.slow
def test_reproduce_a_full_length_run_leaves_the_original_byte_identical(tmp_path, monkeypatch, capsys):
    """The YAML's own schedule (30 epochs, best and last checkpoints) and its relative
    ``runs/`` root, as `make demo` runs it (4 tiny frames): 829f297 wrote the reproduction's
    checkpoints into the original's ``checkpoints/`` and pointed its summary at them."""
    monkeypatch.chdir(tmp_path)
    synth = {"out": "data/synth", "frames": 4, "seed": 0, "size": 32}
    args = ["--data.init_args.synthetic", json.dumps(synth), "--data.init_args.image_size", "32",
            "--data.init_args.batch_size", "2", "--data.init_args.num_workers", "0",
            "--data.init_args.val_fraction", "0.25", "--data.init_args.test_fraction", "0.25"]  # fmt: skip
    code, out = _run(["fit", "--config", str(DEMO), *args])
    assert code == 0
    original = Path(_summary(out)["run_dir"])
    assert original.parent == (tmp_path / "runs" / "demo_seg").resolve()
    assert torch.load(original / "checkpoints" / "last.ckpt", weights_only=False)["epoch"] == 29
    before = _tree_digest(original)
    capsys.readouterr()
    code, out = _run(["reproduce", str(original)])
    assert code == 0
    reproduced = _summary(out)
    assert _tree_digest(original) == before
    new = Path(reproduced["run_dir"])
    assert new != original and new.parent == original.parent
    assert Path(reproduced["checkpoint"]).parent == new / "checkpoints"
    assert Path(reproduced["best_checkpoint"]).parent == new / "checkpoints"
    assert "data fingerprint: same" in capsys.readouterr().err.splitlines()
    record = json.loads((new / "run.json").read_text())
    assert record["argv"] == ["jtml", "reproduce", str(original)] and record["reproduces"] == str(original)


def test_reproduce_says_how_many_data_files_changed(fitted64, tmp_path, capsys):
    src, fit = fitted64
    study = tmp_path / "study"
    shutil.copytree(src / "synth8", study)
    args = _tiny(tmp_path)
    args[args.index("--data.init_args.synthetic") + 1] = "null"
    args += ["--data.init_args.studies", json.dumps([str(study)]), "--ckpt_path", fit["checkpoint"]]
    code, out = _run(["test", "--config", str(DEMO), *args])
    assert code == 0
    tested = Path(_summary(out)["run_dir"])
    assert (tested / "data_files.sha256").read_text().count("\n") == 8 * 4  # frame, calibration, 2 masks
    for mask in sorted((study / "Labels" / "fem").iterdir())[:2]:  # two label files edited on disk
        data = bytearray(mask.read_bytes())
        data[-1] ^= 1
        mask.write_bytes(bytes(data))
    capsys.readouterr()
    assert _run(["reproduce", str(tested)])[0] == 0
    assert "data fingerprint: DIFFERENT (2 files changed)" in capsys.readouterr().err.splitlines()


# -- item 6: Ctrl-C --------------------------------------------------------------------------------
@pytest.mark.slow
def test_sigint_marks_the_run_interrupted_with_its_checkpoint_and_how_to_resume(tmp_path):
    args = ["fit", "--config", str(DEMO), *_tiny(tmp_path), "--trainer.max_epochs", "500"]
    started = time.time()
    # a shell's background job (e.g. `make test &`) inherits SIGINT ignored: give the child the default
    restore = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
    proc = subprocess.Popen([sys.executable, "-m", "jtml.cli", *args], env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=restore)  # fmt: skip
    last = None
    while time.time() - started < 300 and proc.poll() is None:
        found = list((tmp_path / "runs").glob("demo_seg/*/checkpoints/last.ckpt"))
        if found:
            last, seen = found[0], time.time()
            break
        time.sleep(0.2)
    assert last is not None, proc.communicate()[1][-3000:]
    time.sleep(4)  # training goes on
    sent = time.time()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=240)
    elapsed = time.time() - started
    assert proc.returncode == 130, err[-3000:]
    record = json.loads((last.parent.parent / "run.json").read_text())
    assert record["status"] == "interrupted"
    assert record["checkpoint"] == str(last) and torch.load(last, weights_only=False)["optimizer_states"]
    # the run started before its first checkpoint: 829f297 kept the start-up record's 1.7 s
    assert sent - seen < record["seconds"] <= elapsed
    hint = err.strip().splitlines()[-1]
    assert hint.startswith("resume with: jtml fit --config") and hint.endswith("--ckpt_path last")


# -- item 2: DDP (subprocesses: Lightning re-launches sys.argv) -------------------------------------
def _ddp(devices: int) -> list[str]:
    return ["--trainer.accelerator", "cpu", "--trainer.devices", str(devices), "--trainer.strategy",
            "ddp" if devices > 1 else "auto"]  # fmt: skip


@pytest.mark.slow
def test_ddp_fit_without_a_full_batch_per_process_is_refused_before_training(tmp_path):
    """23 frames split 0.2/0.1 by frame: 16 or 17 to train, 8 or 9 per process with 2 processes,
    batch 16. 829f297: "No training batches", a crash on rank 1 and exit 0."""
    args = [*_tiny(tmp_path, frames=23, size=32), "--data.init_args.batch_size", "16",
            "--data.init_args.val_fraction", "0.2", "--data.init_args.test_fraction", "0.1"]  # fmt: skip
    proc = _jtml("fit", "--config", str(DEMO), *args, *_ddp(2))
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    found = re.search(r"the train split has (\d+) samples: (\d+) per process with 2 process\(es\)", last)
    assert last.startswith("error:") and found, last
    n, share = map(int, found.groups())
    assert n < 2 * 16 and share == -(-n // 2) and "fewer than batch_size 16" in last
    assert not (tmp_path / "runs").exists() and proc.stdout.strip() == ""


@pytest.fixture(scope="module")
def ddp47(tmp_path_factory) -> tuple[Path, list[str], dict]:
    tmp = tmp_path_factory.mktemp("ddp47")
    args = [*_tiny(tmp, frames=47, size=32), "--data.init_args.batch_size", "16",
            "--data.init_args.val_fraction", "0.2", "--data.init_args.test_fraction", "0.1"]  # fmt: skip
    proc = _jtml("fit", "--config", str(DEMO), *args, *_ddp(2))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summaries = proc.stdout.strip().splitlines()
    assert len(summaries) == 1 and summaries[0].startswith("{")  # rank zero alone; stdout: the summary
    return tmp, args, json.loads(summaries[0])


@pytest.mark.slow
def test_ddp_fit_on_47_frames_with_plain_ddp_trains_and_validates_alike_on_1_and_2_processes(ddp47):
    tmp, args, fit = ddp47
    ckpt = torch.load(fit["checkpoint"], map_location="cpu", weights_only=False)
    assert ckpt["epoch"] == 0 and ckpt["global_step"] == 1  # 33 or 34 train frames: 17 per process, batch 16
    assert json.loads((Path(fit["run_dir"]) / "run.json").read_text())["status"] == "finished"
    (wandb_run,) = (Path(fit["run_dir"]) / "wandb").glob("offline-run-*")  # rank zero alone logs
    metrics = {}
    for devices in (1, 2):
        # one frame per batch, one thread: each frame's logits do not depend on the process count
        one = ["--data.init_args.batch_size", "1", "--ckpt_path", fit["checkpoint"]]
        proc = _jtml("validate", "--config", str(DEMO), *args, *_ddp(devices), *one)
        assert proc.returncode == 0, proc.stderr[-3000:]
        metrics[devices] = json.loads(proc.stdout.strip().splitlines()[-1])["metrics"]
    # the torchmetrics metrics (val/loss is a mean of per-batch Dice losses: it depends on how the
    # frames fall into batches, so it is not one of them)
    for key in ("val/dice_fem", "val/dice_tib", "val/dice_mean", "val/iou_mean"):
        assert metrics[2][key] == pytest.approx(metrics[1][key], abs=1e-6), key
    assert metrics[1]["val/dice_mean"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("epoch", [1, None], ids=["in-training", "after-training"])
def test_a_failure_on_rank_1_fails_the_command_and_the_run(ddp47, epoch):
    """find_unused_parameters, so that only the injected failure can fail these runs."""
    tmp, args, _ = ddp47
    failing = json.dumps({"class_path": "_sigkill.RaiseOnRank", "init_args": {"rank": 1, "epoch": epoch}})
    root = tmp / f"failing-{epoch}"
    args = [*args, "--trainer.default_root_dir", str(root), "--trainer.max_epochs", "2"]
    ddp = [*_ddp(2)[:-1], "ddp_find_unused_parameters_true"]
    proc = _jtml("fit", "--config", str(DEMO), *args, *ddp, f"--trainer.callbacks+={failing}")
    assert proc.returncode != 0
    assert "injected failure on rank 1" in proc.stderr
    (run_dir,) = (root / "demo_seg").iterdir()
    assert json.loads((run_dir / "run.json").read_text())["status"] == "failed"
    assert not [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]  # no summary of success
