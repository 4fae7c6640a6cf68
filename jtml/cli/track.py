"""``jtml track``: a whole sequence to poses and knee kinematics — segmentation → pose network →
registration for every frame, through Lightning's predict loop (:mod:`jtml.track`).

::

    jtml track --study DIR --seg SEG.ckpt --pose POSE.ckpt --model fem=FEM.stl --model tib=TIB.stl \\
        [--calibration FILE] [--side left|right] --out OUT

Every input is checked before anything is tracked or written; bad input is one
``error: <file>: <problem>`` line and exit code 2. A killed run, run again with the same arguments,
resumes at its first unfinished frame (``OUT/.partial/``). stdout holds one JSON line: the output
folder and each study's ``track.json`` record; progress and messages go to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import jtml
from jtml.cli.labels import parse_part_paths
from jtml.cli.lightning import _failed_children
from jtml.deploy.files import checkpoint_class, read_checkpoint
from jtml.deploy.pose import load_pose_checkpoint
from jtml.deploy.segmentation import load_segmentation_checkpoint
from jtml.errors import JTMLError
from jtml.io.hashing import file_sha256
from jtml.kinematics import check_side
from jtml.models.pose import PoseModule
from jtml.models.segmentation import SegmentationModule
from jtml.registration.search import DEFAULT_STAGES
from jtml.track.data import TrackDataModule, study_out
from jtml.track.module import FEMUR, TIBIA, TrackModule
from jtml.track.settings import FAST_STAGES, TrackSettings, load_stages
from jtml.track.writer import SUMMARY_NAME, TrackWriter

_KIND = {SegmentationModule: "segmentation (SegmentationModule)", PoseModule: "pose (PoseModule)"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--study", action="append", required=True, type=Path, metavar="DIR",
        help="study folder (frames in file-name order); repeatable: several studies go over the devices",
    )  # fmt: skip
    parser.add_argument("--seg", type=Path, metavar="CKPT", help="segmentation checkpoint (not with --masks)")
    parser.add_argument("--pose", required=True, type=Path, metavar="CKPT", help="pose network checkpoint")
    parser.add_argument(
        "--model",
        action="append",
        required=True,
        metavar="PART=STL",
        help="a tracked part's model; repeatable",
    )
    parser.add_argument(
        "--calibration", type=Path, help="JT_INTCALIB file (default: each study's calibration.txt)"
    )
    parser.add_argument(
        "--masks", type=Path, metavar="DIR",
        help="masks instead of segmentation: DIR/<part>/<frame>_label_<part>.tif (one study)",
    )  # fmt: skip
    parser.add_argument(
        "--init", action="append", metavar="PART=JTS",
        help="start poses (.jts/.jtak, one row per frame; NOT_OPTIMIZED: none) tried besides the network's",
    )  # fmt: skip
    parser.add_argument(
        "--side",
        help="left or right: the knee for the kinematics (default: the pose checkpoint's data side)",
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder (one study) or parent folder")
    parser.add_argument(
        "--overwrite", action="store_true", help="write into an output folder holding other results"
    )
    stages = parser.add_mutually_exclusive_group()
    stages.add_argument("--stages", type=Path, metavar="FILE", help="registration stages (YAML/JSON list)")
    stages.add_argument(
        "--fast", action="store_true", help="fewer, smaller registration stages (a quick look)"
    )
    parser.add_argument("--backward", action="store_true", help="a second pass, last frame to first")
    image = parser.add_mutually_exclusive_group()
    image.add_argument(
        "--image", dest="image", action="store_true", default=None,
        help="refine each mask near its edge by the frame's intensities (default with --seg)",
    )  # fmt: skip
    image.add_argument(
        "--no-image", dest="image", action="store_false", help="register to the masks as they are"
    )
    parser.add_argument(
        "--no-priors", action="store_true",
        help="register the tibia alone (default: with the knee prior relative to the frame's femur)",
    )  # fmt: skip
    parser.add_argument(
        "--smooth", type=int, default=0, metavar="W",
        help="SE(3) moving average over W frames (odd; default 0: off) of the written poses",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="registration seed (frame i: seed + i)")
    parser.add_argument(
        "--min-iou", type=float, default=TrackSettings.min_iou,
        help=f"review below this IoU ({TrackSettings.min_iou}, as jtml refine)",
    )  # fmt: skip
    parser.add_argument(
        "--ambiguous", type=float, default=TrackSettings.ambiguous,
        help="pose and twin cost ratio above which the silhouette cannot tell them apart "
        f"({TrackSettings.ambiguous})",
    )  # fmt: skip
    parser.add_argument(
        "--wandb", nargs="?", const="jtml", metavar="PROJECT",
        help="log the curves (kinematics, IoU per frame) to W&B project PROJECT (default jtml), run "
        "files in OUT/wandb; offline unless an API key is set (`wandb sync` uploads later)",
    )  # fmt: skip
    parser.add_argument("--accelerator", default="auto", help="Lightning accelerator (auto, cpu, gpu)")
    parser.add_argument("--devices", default="1", help="Lightning devices (1; e.g. 4, or auto)")
    parser.add_argument("--num-nodes", type=int, default=1, help="Lightning num_nodes")
    parser.add_argument("--strategy", default="auto", help="Lightning strategy (auto, ddp, ...)")
    progress = parser.add_mutually_exclusive_group()
    progress.add_argument(
        "--progress", dest="progress", action="store_true", default=None, help="progress bar"
    )
    progress.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def _checkpoint(path: Path, flag: str, want: type) -> dict[str, Any]:
    """The checkpoint at ``path``, refused when it was written by another kind of module."""
    ckpt = read_checkpoint(path)
    kind = checkpoint_class(ckpt, path)
    if not issubclass(kind, want):
        raise JTMLError(f"{flag} takes a {_KIND[want]} checkpoint, but this is a {_KIND[kind]} one", path)
    return ckpt


def _side(args: argparse.Namespace, pose_ckpt: dict[str, Any], parts: list[str]) -> str | None:
    """``--side``, else the pose checkpoint's data ``side``; needed for kinematics (fem and tib)."""
    data = pose_ckpt.get("datamodule_hyper_parameters") or {}
    recorded = data.get("side") if isinstance(data, dict) else None
    if args.side is not None:
        side = check_side(args.side)
        if recorded in ("left", "right") and recorded != side:
            print(
                f"jtml track: warning: --side {side}, but the pose network was trained on {recorded} knees "
                f"({args.pose})",
                file=sys.stderr,
            )
        return side
    if not {FEMUR, TIBIA} <= set(parts):
        return None
    if recorded in ("left", "right"):
        print(f"jtml track: side {recorded} (the pose checkpoint's data side)", file=sys.stderr)
        return recorded
    why = f"records side {recorded!r}" if recorded else "records no side"
    raise JTMLError(f"--side left|right is required for the kinematics: the pose checkpoint {why}", args.pose)


def _logger(args: argparse.Namespace, settings: TrackSettings, side: str | None) -> Any:
    """The W&B logger of ``--wandb``: the run's files in OUT/wandb, the settings as its config."""
    from jtml.runs.loggers import WandbLogger

    args.out.mkdir(parents=True, exist_ok=True)
    logger = WandbLogger(
        project=args.wandb, group="track", job_type="track", tags=["track"], save_dir=str(args.out)
    )
    logger.log_hyperparams(
        {"studies": [str(s) for s in args.study], "pose": str(args.pose), "seg": str(args.seg),
         "side": side, "smooth": args.smooth, "settings": settings.to_dict()}
    )  # fmt: skip
    return logger


def _finish_wandb() -> None:
    """Close this process's W&B run (a failed command's with exit code 1), so that its files are
    complete when the command returns."""
    import wandb

    if wandb.run is not None:
        wandb.finish(exit_code=0 if sys.exc_info()[0] is None else 1)


def _devices(value: str) -> int | str:
    return int(value) if value.isdigit() else value


def run(args: argparse.Namespace) -> int:
    import pytorch_lightning as pl
    from lightning_fabric.utilities.exceptions import MisconfigurationException

    if args.side is not None:
        check_side(args.side)  # before any file is read
    models = parse_part_paths(args.model, "--model")
    init = parse_part_paths(args.init, "--init")
    if args.masks is None and args.seg is None:
        raise JTMLError("give --seg CKPT (a segmentation checkpoint), or --masks DIR to use given masks")
    if args.masks is not None and args.seg is not None:
        raise JTMLError("give --seg or --masks, not both: --masks replaces the segmentation")
    if args.smooth < 0 or (args.smooth > 1 and args.smooth % 2 == 0):
        raise JTMLError(f"--smooth takes an odd number of frames (or 0: off), got {args.smooth}")
    stages = load_stages(args.stages) if args.stages else FAST_STAGES if args.fast else DEFAULT_STAGES
    image = args.seg is not None if args.image is None else bool(args.image)
    settings = TrackSettings(
        stages, args.seed, args.min_iou, args.ambiguous, args.backward, not args.no_priors, image
    )
    pose_ckpt = _checkpoint(args.pose, "--pose", PoseModule)
    seg_ckpt = _checkpoint(args.seg, "--seg", SegmentationModule) if args.seg is not None else None
    side = _side(args, pose_ckpt, list(models))
    del seg_ckpt  # the loaders read the files again; kept only long enough to check their kind
    pose = load_pose_checkpoint(args.pose)
    seg, prep = load_segmentation_checkpoint(args.seg) if args.seg is not None else (None, None)
    checkpoints = {
        "pose": {"path": str(args.pose), "sha256": file_sha256(args.pose)},
        "seg": None if args.seg is None else {"path": str(args.seg), "sha256": file_sha256(args.seg)},
    }
    digests = {
        "jtml_version": jtml.__version__,
        "checkpoints": {k: None if v is None else v["sha256"] for k, v in checkpoints.items()},
        "settings": settings.to_dict(),
    }
    module = TrackModule(pose, list(models), seg, prep, settings, args.progress)  # checks the parts
    data = TrackDataModule(
        args.study, models, args.out, args.calibration, args.masks, init, digests, args.overwrite
    )
    data.setup("predict")  # every input checked before anything is written
    writer = TrackWriter(side, args.smooth, {"checkpoints": checkpoints, "settings": settings.to_dict()})
    logger = _logger(args, settings, side) if args.wandb else False
    try:
        trainer = pl.Trainer(
            accelerator=args.accelerator,
            devices=_devices(str(args.devices)),
            num_nodes=args.num_nodes,
            strategy=args.strategy,
            logger=logger,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[writer],
        )
        trainer.predict(module, datamodule=data, return_predictions=False)
    except MisconfigurationException as e:
        raise JTMLError(f"trainer configuration cannot run here: {e}") from None
    finally:
        if logger:
            _finish_wandb()
    if trainer.world_size > 1:
        trainer.strategy.barrier("jtml-track-finish")  # every process has written its studies
    if not trainer.is_global_zero:
        return 0
    failed = _failed_children(trainer)
    if failed:
        raise JTMLError(f"{failed}; the studies it tracked are not written (run again to resume)", args.out)
    studies = []
    for root in args.study:
        path = study_out(args.out, root.name, len(args.study)) / SUMMARY_NAME
        studies.append(json.loads(path.read_text()))
    print(json.dumps({"out": str(args.out), "studies": studies}), flush=True)
    return 0
