"""``jtml reproduce RUN_DIR``: run a recorded run again, into a new run directory.

The recorded ``config.yaml`` (the fully resolved config, command-line overrides included) is
the ``--config``, and the sub-command comes from ``run.json``'s ``argv``. Run-specific paths
(the run directory, checkpoint folder, logger folders, W&B id) are cleared so the new run gets
its own; a ``fit`` starts from scratch (no ``ckpt_path``), a ``validate``/``test`` uses the
recorded checkpoint. The reproduction writes only inside its own run directory (the original
stays byte-identical), records ``jtml reproduce RUN_DIR`` as its command line and ``reproduces``,
and ends by saying whether the data still match the original's: ``data fingerprint: same`` or
``DIFFERENT (n files changed)`` (per-file digests from each run's ``data_files.sha256``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from jtml.errors import JTMLError
from jtml.runs.digests import compare_data
from jtml.runs.records import CONFIG, RUN_RECORD

LIGHTNING = ("fit", "validate", "test", "predict")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="a run directory (with run.json and config.yaml)")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="-- then extra overrides (e.g. a new root)")


def _scrub(config: dict[str, Any], run_dir: Path, subcommand: str) -> dict[str, Any]:
    trainer = config.setdefault("trainer", {})
    trainer["default_root_dir"] = str(run_dir.parent.parent)
    loggers = trainer.get("logger")
    for node in loggers if isinstance(loggers, list) else [loggers]:
        if isinstance(node, dict) and isinstance(node.get("init_args"), dict):
            init = node["init_args"]
            for key in ("save_dir", "id", "version", "resume"):
                if key in init:
                    init[key] = None
    for node in trainer.get("callbacks") or []:
        init = node.get("init_args") if isinstance(node, dict) else None
        for key in ("dirpath", "out_dir", "output_dir"):  # checkpoints, predictions: the new run's own
            value = init.get(key) if isinstance(init, dict) else None
            if value and _inside(Path(str(value)), run_dir):
                init[key] = None
    if subcommand == "fit":
        config["ckpt_path"] = None
    return config


def _inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` (relative: to the working directory, as the run saw it) lies in ``folder``."""
    return path.resolve() == folder or folder in path.resolve().parents


def command_line(run_dir: Path, config_file: Path) -> list[str]:
    """The jtml argv that re-runs ``run_dir`` with ``config_file`` (written by the caller)."""
    record = json.loads((run_dir / RUN_RECORD).read_text())
    argv = [a for a in record.get("argv") or [] if a != "jtml"]
    subcommand = argv[0] if argv and argv[0] in LIGHTNING else record.get("command")
    if subcommand not in LIGHTNING:
        raise JTMLError("run.json records no Lightning sub-command (argv / command)", run_dir / RUN_RECORD)
    return [subcommand, "--config", str(config_file)]


def run(args: argparse.Namespace) -> int:
    run_dir: Path = args.run_dir.resolve()
    for name in (RUN_RECORD, CONFIG):
        if not (run_dir / name).is_file():
            raise JTMLError(f"cannot reproduce: no {name}", run_dir / name)
    try:
        json.loads((run_dir / RUN_RECORD).read_text())  # readable, or one error
        config = yaml.safe_load((run_dir / CONFIG).read_text()) or {}
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise JTMLError(f"unreadable: {e}", run_dir) from None
    extra = list(args.extra or [])
    if extra and extra[0] == "--":
        extra = extra[1:]
    with tempfile.TemporaryDirectory(prefix="jtml-reproduce-") as tmp:
        # named after the experiment, so the new run lands next to the original
        config_file = Path(tmp) / f"{run_dir.parent.name}.yaml"
        argv = command_line(run_dir, config_file)
        config_file.write_text(yaml.safe_dump(_scrub(config, run_dir, argv[0]), sort_keys=False))
        from jtml.cli.lightning import JTMLCLI, run_lightning

        code = run_lightning(
            argv[0],
            [*argv[1:], *extra],
            record_argv=["reproduce", str(run_dir), *extra],
            reproduces=str(run_dir),
        )
    new = JTMLCLI.last_run_dir
    if new is not None and new.is_dir():
        print(f"data fingerprint: {compare_data(run_dir, new)}", file=sys.stderr)
    return code
