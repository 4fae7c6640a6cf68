"""Run directories after the fact: list and read them, resume the latest one, fingerprint data.

A run directory ``<root>/<experiment>/<stamp>-<id>/`` (see :mod:`jtml.lightning_cli`) holds
``run.json``, ``config.yaml``, ``checkpoints/`` and ``wandb/offline-run-<stamp>-<wandb id>/``
(one per start: a resumed run adds a folder with the same W&B id).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import yaml
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import Checkpoint, ModelCheckpoint

from jtml.errors import JTMLError
from jtml.io import atomic_write

RUN_RECORD = "run.json"
CONFIG = "config.yaml"
# config keys that differ between any two runs without saying anything about the experiment
VOLATILE_SUFFIXES = ("default_root_dir", "save_dir", "dirpath", "ckpt_path", "init_args.id", "job_type")


# -- reading runs ---------------------------------------------------------------------------------
@dataclass
class RunInfo:
    run_dir: Path
    record: dict[str, Any]
    config: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)  # one row per logged step

    @property
    def status(self) -> str:
        return str(self.record.get("status", "unknown"))

    @property
    def experiment(self) -> str:
        """The experiment's name: ``<root>/<experiment>/<run>`` (the last ``--config``'s stem)."""
        return self.run_dir.parent.name

    @property
    def command(self) -> str:
        """``fit``, ``validate``, ``test`` or ``predict``: from run.json, else its recorded argv."""
        command = self.record.get("command")
        argv = self.record.get("argv") or []
        if not command and len(argv) > 1 and argv[1] in ("fit", "validate", "test", "predict"):
            command = argv[1]
        return str(command or "unknown")

    def series(self, key: str) -> list[tuple[int, float]]:
        out = []
        for i, row in enumerate(self.history):
            value = row.get(key)
            if isinstance(value, (int, float)) and value == value:
                out.append((int(row.get("_step", i)), float(value)))
        return out


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}, "c": [{"d": 2}]}`` → ``{"a.b": 1, "c.0.d": 2}``."""
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(node, list) and any(isinstance(v, (dict, list)) for v in node):
        out = {}
        for i, v in enumerate(node):
            out.update(flatten(v, f"{prefix}.{i}" if prefix else str(i)))
        return out
    return {prefix: node}


def config_differences(configs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per config, only the dotted keys whose values differ across ``configs`` (volatile paths left out)."""
    flat = [flatten(c) for c in configs]
    keys = sorted({k for f in flat for k in f})
    missing = object()
    differing = [
        k
        for k in keys
        if not k.endswith(VOLATILE_SUFFIXES)
        and len({json.dumps(f.get(k, missing), sort_keys=True, default=str) for f in flat}) > 1
    ]
    return [{k: f.get(k) for k in differing} for f in flat]


def wandb_run_folders(run_dir: Path) -> list[Path]:
    """The run's W&B offline folders, oldest first (a resumed run has one per start)."""
    return sorted(p for p in (run_dir / "wandb").glob("offline-run-*") if p.is_dir())


def wandb_run_id(run_dir: Path) -> str | None:
    """The W&B run id of a run directory: from run.json, else its offline folder's name."""
    record_file = run_dir / RUN_RECORD
    candidates = []
    if record_file.is_file():
        try:
            candidates.append(json.loads(record_file.read_text()).get("wandb_run"))
        except json.JSONDecodeError:
            pass
    candidates += [str(p) for p in reversed(wandb_run_folders(run_dir))]
    for folder in candidates:
        if folder and Path(folder).name.startswith(("offline-run-", "run-")):
            return Path(folder).name.rsplit("-", 1)[-1]
    return None


def _csv_history(run_dir: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for path in sorted(run_dir.rglob("metrics.csv")):
        with path.open(newline="") as f:
            for row in csv.DictReader(f):
                parsed: dict[str, Any] = {}
                for k, v in row.items():
                    if v in ("", None):
                        continue
                    try:
                        parsed["_step" if k == "step" else k] = float(v)
                    except ValueError:
                        parsed[k] = v
                rows.append(parsed)
    return rows


def read_history(run_dir: Path) -> list[dict[str, Any]]:
    """Every logged row of the run: its W&B offline folders in order, else CSV logger files."""
    from jtml.wandb_offline import read_offline_run

    rows: list[dict[str, Any]] = []
    for folder in wandb_run_folders(run_dir):
        try:
            rows += read_offline_run(folder).history
        except JTMLError:
            continue
    return rows or _csv_history(run_dir)


def read_run(run_dir: str | Path) -> RunInfo:
    run_dir = Path(run_dir)
    for name in (RUN_RECORD, CONFIG):
        if not (run_dir / name).is_file():
            raise JTMLError(f"not a jtml run directory: no {name}", run_dir / name)
    try:
        record = json.loads((run_dir / RUN_RECORD).read_text())
        config = yaml.safe_load((run_dir / CONFIG).read_text()) or {}
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise JTMLError(f"unreadable: {e}", run_dir) from None
    return RunInfo(run_dir=run_dir, record=record, config=config, history=read_history(run_dir))


def find_run_dirs(logdir: str | Path) -> list[Path]:
    """Run directories (with run.json and config.yaml) under ``logdir``, in name (= time) order."""
    logdir = Path(logdir)
    if not logdir.is_dir():
        raise JTMLError("no such log directory", logdir)
    found = {p.parent for p in logdir.rglob(RUN_RECORD) if (p.parent / CONFIG).is_file()}
    found = {p for p in found if not any(q != p and q in p.parents for q in found)}
    if not found:
        raise JTMLError("no runs (directories with run.json and config.yaml) here", logdir)
    return sorted(found, key=lambda p: (p.parent.name, p.name))


# -- resuming -------------------------------------------------------------------------------------
def resume_checkpoint(run_dir: Path) -> Path | None:
    """The newest resumable checkpoint of a run: ``checkpoints/last.ckpt`` or a SLURM ``hpc_ckpt_*``."""
    candidates = [run_dir / "checkpoints" / "last.ckpt", *run_dir.glob("hpc_ckpt_*.ckpt")]
    existing = [p for p in candidates if p.is_file()]
    return max(existing, key=lambda p: p.stat().st_mtime) if existing else None


def latest_resumable_run(experiment_dir: Path) -> tuple[Path, Path] | None:
    """``(run_dir, checkpoint)`` of the experiment's most recently written checkpoint, if any."""
    best: tuple[float, Path, Path] | None = None
    if not experiment_dir.is_dir():
        return None
    for run_dir in experiment_dir.iterdir():
        ckpt = resume_checkpoint(run_dir) if run_dir.is_dir() else None
        if ckpt is not None and (best is None or ckpt.stat().st_mtime > best[0]):
            best = (ckpt.stat().st_mtime, run_dir, ckpt)
    return None if best is None else (best[1], best[2])


def checkpoint_class_path(ckpt: Path) -> str | None:
    """The LightningModule class a checkpoint was written by (LightningCLI stores ``_class_path``)."""
    import torch

    try:
        data = torch.load(ckpt, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise JTMLError(f"not a readable checkpoint ({type(e).__name__}: {e})", ckpt) from None
    if not isinstance(data, dict) or "state_dict" not in data:
        raise JTMLError("not a Lightning checkpoint (no state_dict)", ckpt)
    hparams = data.get("hyper_parameters") or {}
    return hparams.get("_class_path") if isinstance(hparams, dict) else None


# -- data fingerprint -----------------------------------------------------------------------------
def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


DATA_FILES = "data_files.sha256"  # per-file digests of a run's data, in `sha256sum` format


def data_file_digests(datamodule: Any) -> list[tuple[str, str]] | None:
    """``(sha256, path)`` of the index CSV (if any) and of every frame, calibration and mask the
    datamodule lists (``datamodule.rows``), in row order (``"-"`` for a listed file that is gone).
    Cached on the datamodule."""
    cached = getattr(datamodule, "_jtml_digests", None)
    if cached is not None:
        return cached
    rows = getattr(datamodule, "rows", None)
    if rows is None and hasattr(datamodule, "_load_rows"):
        try:
            rows = datamodule._load_rows()
        except Exception:  # noqa: BLE001 - no fingerprint rather than a failed run
            rows = None
    if not rows:
        return None
    out: list[tuple[str, str]] = []
    index = getattr(datamodule, "index", None)
    if index and Path(index).is_file():
        out.append((_file_sha256(Path(index)), str(index)))
    for row in rows:
        for path in [row.image, row.calibration, *(row.masks[k] for k in sorted(row.masks))]:
            if path is not None:
                out.append((_file_sha256(Path(path)) if Path(path).is_file() else "-", str(path)))
    try:
        datamodule._jtml_digests = out
    except AttributeError:
        pass
    return out


def data_fingerprint(datamodule: Any) -> dict[str, Any] | None:
    """sha256 over the digests of :func:`data_file_digests`, in order. Paths are not hashed, so the
    same data in another folder has the same fingerprint."""
    digests = data_file_digests(datamodule)
    if not digests:
        return None
    index = getattr(datamodule, "index", None)
    index_sha = digests[0][0] if index and Path(index).is_file() else None
    files = digests[1:] if index_sha else digests
    total = hashlib.sha256((index_sha or "").encode())
    rows = datamodule.rows
    listed = iter(files)
    for row in rows:  # "-" for a file the row does not list, as before: old fingerprints stay comparable
        for path in [row.image, row.calibration, *(row.masks[k] for k in sorted(row.masks))]:
            total.update((next(listed)[0] if path is not None else "-").encode())
    return {"sha256": total.hexdigest(), "index_sha256": index_sha, "frames": len(rows), "files": len(files)}


def write_data_digests(digests: list[tuple[str, str]], path: Path) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text("".join(f"{d}  {p}\n" for d, p in digests))


def read_data_digests(path: Path) -> list[str] | None:
    """The digests of a ``data_files.sha256`` file, in order (None when it does not exist)."""
    if not path.is_file():
        return None
    return [ln.split("  ", 1)[0] for ln in path.read_text().splitlines() if ln.strip()]


def compare_data(original: Path, new: Path) -> str:
    """``same`` or ``DIFFERENT (n files changed)`` between two run directories' data."""
    a, b = read_data_digests(original / DATA_FILES), read_data_digests(new / DATA_FILES)
    if a is None or b is None:
        ra, rb = (_record_fingerprint(d) for d in (original, new))
        if ra is None or rb is None:
            return "unknown (not recorded)"
        return "same" if ra == rb else "DIFFERENT (per-file digests not recorded)"
    changed = sum(x != y for x, y in zip(a, b, strict=False)) + abs(len(a) - len(b))
    return "same" if changed == 0 else f"DIFFERENT ({changed} file{'s' * (changed != 1)} changed)"


def _record_fingerprint(run_dir: Path) -> str | None:
    try:
        return (json.loads((run_dir / RUN_RECORD).read_text()).get("data_fingerprint") or {}).get("sha256")
    except (OSError, ValueError):
        return None


# -- atomic checkpoints ---------------------------------------------------------------------------
@contextlib.contextmanager
def sigint_deferred() -> Iterator[None]:
    """Hold a Ctrl-C (SIGINT) that arrives inside the block until the block is done, then raise it.

    A KeyboardInterrupt raised inside ``torch.save`` surfaces as a RuntimeError from its zip writer
    ("unexpected pos"), so a run stopped while checkpointing was recorded ``failed``, not
    ``interrupted``. Main thread only (where Python delivers signals); elsewhere a no-op.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received and callable(previous):
            previous(signal.SIGINT, None)  # Python's default handler raises KeyboardInterrupt here


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes ``.<file>.tmp-<pid>`` next to the checkpoint, fsyncs, then ``os.replace``\\ s it (a
    temporary file left by a process killed mid-write is removed by the next save of that file).
    A Ctrl-C during the write takes effect once the checkpoint is complete.

    Lightning's own save writes through an fsspec transaction into a temp file in the system
    temp dir and ``shutil.move``\\ s it: atomic only when that dir is on the same filesystem as
    the run directory (rarely so on a cluster, where a kill mid-copy leaves a torn last.ckpt).
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        import torch

        target = Path(path)
        if "://" in str(path):  # remote storage: Lightning's fsspec path
            return super().save_checkpoint(checkpoint, path, storage_options)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        for stale in target.parent.glob(f".{target.name}.tmp-*"):  # left by a process killed mid-write
            stale.unlink(missing_ok=True)
        with sigint_deferred():
            try:
                with open(tmp, "wb") as f:
                    torch.save(checkpoint, f)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, target)
            finally:
                tmp.unlink(missing_ok=True)
        return None


class LastCheckpointEveryEpoch(Checkpoint):
    """Keeps every ``ModelCheckpoint(save_last=True)``'s ``last.ckpt`` current at each epoch end.

    Lightning 2.6's ModelCheckpoint writes ``last.ckpt`` only in a step where it also saved a
    top-k checkpoint, i.e. when the monitored metric improved: after an epoch without progress
    ``last.ckpt`` is stale, and a resumed run would redo (or lose) epochs. A ``Checkpoint`` so that
    Lightning orders it with (after) the ModelCheckpoints: it runs once they had their turn.
    """

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.fast_dev_run:
            return
        for cb in trainer.checkpoint_callbacks:
            stale = getattr(cb, "_last_global_step_saved", None) != trainer.global_step
            if isinstance(cb, ModelCheckpoint) and cb.save_last and stale:
                cb._save_last_checkpoint(trainer, cb._monitor_candidates(trainer))
