"""Deployment: trained checkpoints as TorchScript/ONNX models for the JTML app, run outside Lightning.

:func:`export_checkpoint` exports whichever kind of model wrote a checkpoint:
:mod:`jtml.deploy.segmentation` (frame in, logits out) or :mod:`jtml.deploy.pose` (ROI in, pose out).
"""

from __future__ import annotations

import os
from typing import Any

from jtml.deploy.files import FORMATS, checkpoint_class, read_checkpoint
from jtml.deploy.pose import export_pose
from jtml.deploy.segmentation import export_segmentation
from jtml.models.pose import PoseModule

__all__ = ["FORMATS", "export_checkpoint"]


def export_checkpoint(
    ckpt_path: str | os.PathLike, fmt: str, out: str | os.PathLike, size: int = 1024
) -> dict[str, Any]:
    """Export a segmentation or pose checkpoint, whichever it is, and return its summary
    (``size``: the segmentation export's frame side; pose exports take ROIs of the trained size)."""
    kind = checkpoint_class(read_checkpoint(ckpt_path), ckpt_path)
    if issubclass(kind, PoseModule):
        return export_pose(ckpt_path, fmt, out)
    return export_segmentation(ckpt_path, fmt, out, size)
