"""``jtml`` console entry point: thin dispatch to one module per sub-command.

Lightning sub-commands (fit, validate, test, predict) go through ``LightningCLI`` in
:mod:`jtml.cli.lightning`; every other sub-command is a module of :mod:`jtml.cli` with
``add_arguments(parser)`` and ``run(args) -> int``. Bad input raises :class:`JTMLError`,
reported here as one line ``error: <file>: <problem>`` with exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from jtml.errors import JTMLError

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
# name -> (module, one-line help). Modules are imported lazily so `jtml --help` stays fast.
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("jtml.cli.synth", "generate a synthetic study in the JointTrack on-disk layout"),
    "import": ("jtml.cli.importer", "DICOM cine or video -> a study folder (8-bit frames, import.json)"),
    "labels": ("jtml.cli.labels", "render label masks from tracked poses and STL models"),
    "index": ("jtml.cli.index", "index studies into a CSV with a train/val/test split"),
    "score-poses": ("jtml.cli.score_poses", "score a pose file against ground truth (PoseError)"),
    "refine": ("jtml.cli.refine", "register the implant models to a study's masks from any pose file"),
    "kinematics": ("jtml.cli.kinematics", "knee kinematics from femur/tibia pose files (CSV + plots)"),
    "track": ("jtml.cli.track", "a sequence to poses and kinematics: segment, estimate, register frames"),
    "slurm": ("jtml.cli.slurm", "print an sbatch script for multi-node DDP `jtml fit` (auto-requeue)"),
    "runs": ("jtml.cli.runs", "compare finished runs: config differences, final/best metric, curves"),
    "reproduce": ("jtml.cli.reproduce", "re-run a recorded run from its run.json and config.yaml"),
    "export": ("jtml.cli.export", "export a trained checkpoint to TorchScript or ONNX for the JTML app"),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jtml",
        description="Lightning experiments for fluoroscopic tracking of knee-replacement implants.",
        epilog="Lightning sub-commands: "
        + ", ".join(LIGHTNING_COMMANDS)
        + " (run `jtml fit --help`; each takes --config experiments/X.yaml).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in LIGHTNING_COMMANDS:
        sub.add_parser(name, help=f"Lightning {name} (see `jtml {name} --help`)", add_help=False)
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in (*LIGHTNING_COMMANDS, *COMMANDS):
        parser = _parser()
        if argv and argv[0] not in ("-h", "--help"):
            parser.error(f"unknown command {argv[0]!r}")
        parser.print_help()
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    try:
        if name in LIGHTNING_COMMANDS:
            from jtml.cli.lightning import run_lightning

            return run_lightning(name, rest)
        module = importlib.import_module(COMMANDS[name][0])
        parser = argparse.ArgumentParser(prog=f"jtml {name}", description=COMMANDS[name][1])
        module.add_arguments(parser)
        return int(module.run(parser.parse_args(rest)) or 0)
    except JTMLError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
