"""``jtml synth``: generate a synthetic study in the JointTrack on-disk layout.

Frames, label masks, ``.jts`` poses, the STL models and ``calibration.txt``, exactly like a real
study, so every other command runs on it (demos, tests, smoke runs). ``--sequence``: the frames
are one knee's smooth motion (a tracking ground truth). Same seed, same bytes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from jtml.cli.labels import parse_part_paths
from jtml.sim.synth import PARTS, REFERENCE_SIZE, generate_study


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=Path, help="output study folder (must be empty or new)")
    parser.add_argument("--frames", required=True, type=int, help="number of frames (>= 1)")
    parser.add_argument("--seed", required=True, type=int, help="random seed (>= 0); same seed, same study")
    parser.add_argument("--size", type=int, default=REFERENCE_SIZE, help="frame width = height in pixels")
    parser.add_argument(
        "--model",
        action="append",
        metavar="PART=STL",
        help=f"implant model for a part ({', '.join(PARTS)}), repeatable; default: built-in implants",
    )
    parser.add_argument(
        "--calibration",
        type=Path,
        help=f"JT_INTCALIB file for {REFERENCE_SIZE}x{REFERENCE_SIZE} frames (scaled to --size); "
        "default: pd 1198 mm, no offsets, 0.373 mm pixels",
    )
    parser.add_argument(
        "--sequence",
        action="store_true",
        help="one smooth knee motion (flexion 0->90->0 deg, coupled internal rotation and rollback, "
        "a slowly drifting view) instead of independent random knees",
    )
    parser.add_argument(
        "--side",
        default="right",
        help="with --sequence: right (default) or left; a left knee mirrors the built-in implants x -> -x "
        "(--model STLs are used as given: left implants)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the study in a non-empty --out (its frames, Labels/, poses and calibration)",
    )


def run(args: argparse.Namespace) -> int:
    models = parse_part_paths(args.model, "--model")
    out = generate_study(
        args.out,
        frames=args.frames,
        seed=args.seed,
        size=args.size,
        models=models or None,
        calibration=args.calibration,
        overwrite=args.overwrite,
        sequence=args.sequence,
        side=args.side,
    )
    kind = f", a {args.side} knee's motion" if args.sequence else ""
    print(
        f"wrote a synthetic study to {out} ({args.frames} frames, {args.size}x{args.size}, seed {args.seed}"
        f"{kind})"
    )
    return 0
