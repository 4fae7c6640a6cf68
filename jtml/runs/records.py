"""Run directories after the fact: list and read them, compare their configs and histories.

A run directory ``<root>/<experiment>/<stamp>-<id>/`` (see :mod:`jtml.cli.lightning`) holds
``run.json``, ``config.yaml``, ``checkpoints/`` and ``wandb/offline-run-<stamp>-<wandb id>/``
(one per start: a resumed run adds a folder with the same W&B id).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from jtml.errors import JTMLError

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
    from jtml.runs.wandb_offline import read_offline_run

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
