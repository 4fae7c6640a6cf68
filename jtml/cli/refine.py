"""``jtml refine``: register the implant models to a study's masks, from any existing pose file.

::

    jtml refine --study DIR --calibration FILE --model fem=STL [--model tib=STL] \\
        --masks DIR --init fem=JTS [--init tib=JTS] --out DIR

The starting poses (``--init``: NFD output, a network's, a colleague's; one row per frame) are
refined so that each part's rendered silhouette matches its mask (``--masks`` holds
``<part>/<frame>_label_<part>.tif``, the ``jtml labels`` layout; the frames are the study's images
in file-name order). Writes ``OUT/<part>.jts``, ``OUT/report.csv`` and overlays of flagged frames
(:mod:`jtml.callbacks.refine`). The registration settings — cost, stages and their ranges, twin,
priors, review thresholds — are the ``model`` of ``--config`` (an experiment YAML such as
``experiments/refine.yaml``, whose values are also the defaults without it); ``--no-twin``,
``--no-priors``, ``--tibia-rule`` and ``--image`` (a segmentation network's masks: refine their edges
by the frame's, :meth:`~jtml.registration.costs.SilhouetteTarget.from_frame`) override them.

This is a thin driver of Lightning's ``trainer.predict`` over
:class:`~jtml.data.registration.RegistrationDataModule` and
:class:`~jtml.models.registration.RegistrationModule` with a progress bar, so ``--accelerator
gpu --devices 4`` or ``--devices 2 --strategy ddp`` (and SLURM's ``srun``) spread the frames over
processes with the same results. Everything is checked before any frame is registered; bad input is
one ``error:`` line and exit code 2, and ``OUT`` receives nothing unless the whole run succeeds.
stdout is one JSON summary line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from jtml.cli.labels import parse_part_paths
from jtml.errors import JTMLError

__all__ = ["add_arguments", "load_settings", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--study", required=True, help="study folder: its images are the frames (file-name order)"
    )
    parser.add_argument("--calibration", required=True, help="JT_INTCALIB calibration of the study's frames")
    parser.add_argument("--model", action="append", required=True, metavar="PART=STL", help="repeatable")
    parser.add_argument("--masks", required=True, help="folder of <part>/<frame>_label_<part>.tif masks")
    parser.add_argument(
        "--init", action="append", required=True, metavar="PART=JTS", help="start poses, repeatable"
    )
    parser.add_argument(
        "--out", required=True, help="output folder (must be new or empty, unless --overwrite)"
    )
    parser.add_argument("--config", help="experiment YAML whose model holds the registration settings")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    parser.add_argument("--no-twin", action="store_true", help="do not also refine the symmetric twin")
    parser.add_argument("--no-priors", action="store_true", help="register femur and tibia independently")
    parser.add_argument(
        "--tibia-rule", choices=("cost", "varus_valgus"), help="how the tibia's twin is chosen"
    )
    parser.add_argument(
        "--image", action="store_true", help="refine each mask's edge by the frame's (segmentation masks)"
    )
    parser.add_argument(
        "--overlays",
        choices=("flagged", "all", "none"),
        default="flagged",
        help="frames to draw (default flagged)",
    )
    parser.add_argument(
        "--accelerator", default="cpu", help="Lightning accelerator: cpu (default), gpu, auto"
    )
    parser.add_argument("--devices", default="1", help="Lightning devices (default 1)")
    parser.add_argument("--strategy", default="auto", help="Lightning strategy, e.g. ddp (default auto)")
    parser.add_argument("--num-nodes", type=int, default=1, help="Lightning num_nodes (default 1)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers per process (default 0)")


def load_settings(config: str | None) -> dict[str, Any]:
    """The registration settings of an experiment YAML (its ``model.init_args``); {} without one."""
    if not config:
        return {}
    path = Path(config)
    if not path.is_file():
        raise JTMLError("config file not found", path)
    try:
        spec = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise JTMLError(f"cannot parse YAML: {e}", path) from None
    model = spec.get("model") if isinstance(spec, dict) else None
    if isinstance(model, dict) and ("class_path" in model or "init_args" in model):
        if not str(model.get("class_path", "RegistrationModule")).endswith("RegistrationModule"):
            raise JTMLError(f"the config's model is {model['class_path']}, not a RegistrationModule", path)
        model = model.get("init_args") or {}
    if not isinstance(model, dict):
        raise JTMLError("the config has no model: {class_path: ...RegistrationModule, init_args: ...}", path)
    return dict(model)


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise JTMLError("output path exists and is not a folder", out)
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise JTMLError(
            "output folder exists and is not empty; choose another --out or pass --overwrite", out
        )


def _devices(value: str) -> int | str:
    try:
        return int(value)
    except ValueError:
        return value


def run(args: argparse.Namespace) -> int:
    import pytorch_lightning as pl

    from jtml.callbacks.refine import RefineWriter
    from jtml.data.registration import RegistrationDataModule
    from jtml.models.registration import RegistrationModule

    models = {p: str(v) for p, v in parse_part_paths(args.model, "--model").items()}
    init = {p: str(v) for p, v in parse_part_paths(args.init, "--init").items()}
    if set(models) != set(init):
        raise JTMLError(f"--model parts {sorted(models)} and --init parts {sorted(init)} differ")
    settings = load_settings(args.config)
    if args.no_twin:
        settings["twin"] = False
    if args.no_priors:
        settings["priors"] = False
    if args.tibia_rule:
        settings["tibia_rule"] = args.tibia_rule
    if args.image:
        settings["image"] = True
    try:  # every setting checked before anything runs
        module = RegistrationModule(**settings)
    except TypeError as e:
        raise JTMLError(f"unknown registration setting: {e}", args.config) from None
    out = Path(args.out)
    _check_out(out, args.overwrite)
    data = RegistrationDataModule(
        study=args.study,
        init=init,
        models=models,
        calibration=args.calibration,
        masks=args.masks,
        num_workers=args.workers,
    )
    data.setup("predict")
    writer = RefineWriter(out_dir=str(out), overwrite=args.overwrite, overlays=args.overlays)
    devices = _devices(args.devices)
    trainer = pl.Trainer(
        accelerator=args.accelerator,
        devices=devices,
        strategy=args.strategy,
        num_nodes=args.num_nodes,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[writer],
        default_root_dir=str(out.parent if out.parent != Path("") else Path(".")),
    )
    t0 = time.perf_counter()
    stdout = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):  # the progress bar and notes go to stderr
        trainer.predict(module, datamodule=data, return_predictions=False)
    if not trainer.is_global_zero:
        return 0
    results = [r for f in writer.rows.values() for r in f["results"].values()]
    n = len(results)
    summary = {
        "out": str(out),
        "frames": len(writer.rows),
        "parts": sorted(init),
        "refined": sum(bool(r["refined"]) for r in results),
        "not_refined": sum(not r["refined"] for r in results),
        "review": sum(bool(r["review"]) for r in results if r["refined"]),
        "seconds": round(time.perf_counter() - t0, 1),
        "seconds_per_part_frame": round(sum(r["seconds"] for r in results) / n, 2) if n else None,
    }
    print(json.dumps(summary), file=stdout, flush=True)
    return 0
