"""``jtml export``: a trained segmentation checkpoint → TorchScript (or ONNX) for the JTML app.

The exported model takes one ``1×1×H×W`` float32 frame of raw 0–255 intensities with implants
WHITE and returns ``1×P×H×W`` logits at that same ``H×W``; the training preprocessing is inside (see
:mod:`jtml.export`). A TorchScript export takes any ``H×W``; ``--size`` is the one frame size an ONNX
export (or a ``resize_mode: crop`` network) accepts, and the example the summary's shapes are for.
Prints one JSON line: the file, format, shapes, ``any_frame_size``, parts and the preprocessing.

    jtml export --ckpt_path runs/demo_seg/<run>/checkpoints/last.ckpt --format torchscript --out seg.pt
"""

from __future__ import annotations

import argparse
import json

from jtml.export import FORMATS, export_segmentation


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt_path", "--ckpt-path", required=True, help="SegmentationModule checkpoint")
    parser.add_argument("--format", choices=FORMATS, default="torchscript", help="default: torchscript")
    parser.add_argument("--out", required=True, help="file to write (e.g. seg.pt or seg.onnx)")
    parser.add_argument(
        "--size",
        type=int,
        default=1024,
        metavar="PX",
        help="side of the square frames the app feeds (1024); the only size an ONNX export (or a "
        "resize_mode crop network) accepts, a TorchScript export takes any H x W",
    )


def run(args: argparse.Namespace) -> int:
    summary = export_segmentation(args.ckpt_path, args.format, args.out, args.size)
    print(json.dumps(summary), flush=True)
    return 0
