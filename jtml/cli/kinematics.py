"""``jtml kinematics``: tibiofemoral kinematics from any pair of femur/tibia pose files.

Writes ``OUT/kinematics.csv`` (one row per frame; the column names carry their sign conventions)
and PNG plots of every curve, all at once, and prints a summary of the curves. ``NOT_OPTIMIZED``
rows (``.jtak``, or ``.jts`` from other tools) are gaps: empty CSV fields, breaks in the plots.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from jtml.errors import JTMLError
from jtml.io import read_poses, read_stl
from jtml.kinematics import check_side, knee_kinematics, log_kinematics, read_axes, summary, write_report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fem", required=True, type=Path, help="femoral component poses (.jts / .jtak)")
    parser.add_argument("--tib", required=True, type=Path, help="tibial component poses, same frames")
    parser.add_argument(
        "--side", help="left or right (required): the knee's side; left/right sign rules depend on it"
    )
    parser.add_argument(
        "--fem-axes",
        type=Path,
        help="4x4 text file: femoral STL -> anatomical frame (default: the STL's own axes)",
    )
    parser.add_argument("--tib-axes", type=Path, help="4x4 text file: tibial STL -> anatomical frame")
    parser.add_argument(
        "--fem-model", type=Path, help="femoral STL: adds the condyles' lowest points in the tibial frame"
    )
    parser.add_argument(
        "--tib-model",
        type=Path,
        help="tibial STL (with --fem-model): adds the condyles' heights above the tray",
    )
    parser.add_argument(
        "--out", required=True, type=Path, help="output folder (created; its report replaced)"
    )
    parser.add_argument(
        "--wandb", nargs="?", const="jtml", metavar="PROJECT",
        help="also log the curves to W&B project PROJECT (default jtml): a new run with its files in "
        "OUT/wandb, or with --run that run; offline unless an API key is set",
    )  # fmt: skip
    parser.add_argument(
        "--run", type=Path, metavar="RUN_DIR",
        help="a jtml run directory (e.g. the `jtml predict` run that wrote the poses): the curves go "
        "into its W&B run (resumed; implies --wandb)",
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    side = check_side(args.side)
    if args.tib_model is not None and args.fem_model is None:
        raise JTMLError("--tib-model needs --fem-model: the tray gaps are the femoral condyles' heights")
    fem = read_poses(args.fem, allow_missing=True)
    tib = read_poses(args.tib, allow_missing=True)
    if len(fem) != len(tib):
        raise JTMLError(
            f"has {len(tib)} pose row(s) but {args.fem} has {len(fem)}: "
            "the two files must cover the same frames",
            args.tib,
        )
    if len(fem) == 0:
        raise JTMLError("no pose rows", args.fem)
    table = knee_kinematics(
        fem,
        tib,
        side,
        fem_axes=None if args.fem_axes is None else read_axes(args.fem_axes),
        tib_axes=None if args.tib_axes is None else read_axes(args.tib_axes),
        fem_model=None if args.fem_model is None else read_stl(args.fem_model),
        tib_model=None if args.tib_model is None else read_stl(args.tib_model),
    )
    run_id = _run_id(args.run) if args.run is not None else None  # checked before anything is written
    written = write_report(args.out, table)
    print(summary(table))
    print(f"wrote {', '.join(p.name for p in written)} to {args.out} ({side} knee)")
    if args.wandb or args.run is not None:
        import wandb

        from jtml.runs.loggers import WandbLogger

        if args.run is None:
            logger = WandbLogger(
                project=args.wandb, job_type="kinematics", tags=["kinematics"], save_dir=str(args.out)
            )
        else:
            project = args.wandb or "jtml"
            logger = WandbLogger(project=project, id=run_id, resume="allow", save_dir=str(args.run))
        logger.log_hyperparams({"fem": str(args.fem), "tib": str(args.tib), "side": side})
        points = log_kinematics(logger, table, "kinematics", [p for p in written if p.suffix == ".png"])
        where = logger.experiment.dir
        wandb.finish()
        print(f"logged {points} point(s) and the plots to W&B ({Path(where).parent})")
    return 0


def _run_id(run_dir: Path) -> str:
    """``--run``: the run directory's W&B run id (the run the curves are added to)."""
    from jtml.runs.records import wandb_run_id

    if not run_dir.is_dir():
        raise JTMLError("--run: not a run directory", run_dir)
    run_id = wandb_run_id(run_dir)
    if run_id is None:
        raise JTMLError("--run: the folder holds no W&B run (run.json or wandb/offline-run-*)", run_dir)
    return run_id
