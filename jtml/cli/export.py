"""``jtml export``: a trained segmentation or pose checkpoint → TorchScript (or ONNX) for the JTML app.

Which one is exported follows the class that wrote the checkpoint.

- Segmentation: the exported model takes one ``1×1×H×W`` float32 frame of raw 0–255 intensities
  with implants WHITE and returns ``1×P×H×W`` logits at that same ``H×W``; the training
  preprocessing is inside (see :mod:`jtml.deploy.segmentation`). A TorchScript export takes any ``H×W``;
  ``--size`` is the one frame size an ONNX export (or a ``resize_mode: crop`` network) accepts, and
  the example the summary's shapes are for.
- Pose: the exported model takes one part's ROI tensors, ``roi``, ``camera``, ``roi_bbox`` and
  ``part`` (what :func:`jtml.geometry.roi.make_sample` builds) and returns the JointTrack pose rows
  (see :mod:`jtml.deploy.pose`); ``--size`` does not apply.

Prints one JSON line: the file, format, shapes, parts and the preprocessing (for segmentation also
``any_frame_size``).

    jtml export --ckpt_path runs/demo_seg/<run>/checkpoints/last.ckpt --format torchscript --out seg.pt
    jtml export --ckpt_path runs/demo_pose/<run>/checkpoints/last.ckpt --format onnx --out pose.onnx
"""

from __future__ import annotations

import argparse
import json

from jtml.deploy import FORMATS, export_checkpoint


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--ckpt_path", "--ckpt-path", required=True, help="SegmentationModule or PoseModule checkpoint"
    )
    parser.add_argument("--format", choices=FORMATS, default="torchscript", help="default: torchscript")
    parser.add_argument("--out", required=True, help="file to write (e.g. seg.pt or pose.onnx)")
    parser.add_argument(
        "--size",
        type=int,
        default=1024,
        metavar="PX",
        help="segmentation only: side of the square frames the app feeds (1024); the only size an ONNX "
        "export (or a resize_mode crop network) accepts, a TorchScript export takes any H x W",
    )


def run(args: argparse.Namespace) -> int:
    summary = export_checkpoint(args.ckpt_path, args.format, args.out, args.size)
    print(json.dumps(summary), flush=True)
    return 0
