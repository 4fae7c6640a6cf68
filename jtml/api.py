"""A small Python API for notebooks: the same code as the ``jtml`` commands, on arrays.

::

    from jtml import api

    summary = api.run("fit", "experiments/demo_seg.yaml", "--trainer.max_epochs", "3")
    seg = api.Segmenter.from_checkpoint(summary["checkpoint"])
    masks = seg(frames)                          # {part: (N, H, W) uint8 {0, 1}}
    poser = api.PoseEstimator.from_checkpoint("pose.ckpt")
    poses = poser(masks["fem"], "calibration.txt", part="fem")   # (N, 6) JointTrack pose rows
    api.show_overlay(frames[0], [masks["fem"][0], masks["tib"][0]])
    api.score_poses(poses, truth, vertices)      # PoseError: mean |z|, geodesic, mTRE, success rates

:func:`run` is ``jtml <command> ...`` in-process (its JSON summary returned); :class:`Segmenter`
preprocesses exactly as ``jtml predict`` does (:meth:`FluoroSegDataset.prepare`) and maps the
probabilities back with the writer's :func:`~jtml.callbacks.predict.masks_to_frame`;
:class:`PoseEstimator` is :meth:`PoseModule.estimate`, frame by frame.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from jtml.callbacks.predict import masks_to_frame, overlay
from jtml.cli.main import main
from jtml.data.segmentation import FluoroSegDataset
from jtml.deploy.pose import load_pose_checkpoint
from jtml.deploy.segmentation import load_segmentation_checkpoint
from jtml.errors import JTMLError
from jtml.geometry import Camera
from jtml.io import Calibration, read_calibration, read_image
from jtml.metrics.pose import PoseError

__all__ = ["PoseEstimator", "Segmenter", "overlay", "run", "score_poses", "show_overlay"]

Frames = np.ndarray | str | os.PathLike | Sequence[np.ndarray | str | os.PathLike]


def run(command: str, config: str | os.PathLike | None = None, *args: str) -> dict[str, Any]:
    """``jtml <command> [--config CONFIG] ARGS…`` in this process; returns its JSON summary.

    A failure raises :class:`JTMLError` with the command's error (as the CLI prints it)."""
    argv = [command, *(["--config", str(config)] if config is not None else []), *map(str, args)]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    lines = [ln for ln in out.getvalue().strip().splitlines() if ln.startswith("{")]
    if code != 0 or not lines:
        raise JTMLError(f"`jtml {' '.join(argv)}` failed (exit {code}): {err.getvalue().strip()[-2000:]}")
    return json.loads(lines[-1])


def _frames(frames: Frames) -> list[np.ndarray]:
    """One frame (array or path) or a sequence of them, or an (N, H, W) stack → 2-D arrays."""
    if isinstance(frames, np.ndarray):
        stack = frames[None] if frames.ndim == 2 else frames
        if stack.ndim != 3:
            raise JTMLError(f"frames must be (H, W) or (N, H, W), got shape {frames.shape}")
        return list(stack)
    items = [frames] if isinstance(frames, (str, os.PathLike)) else list(frames)
    return [read_image(f) if isinstance(f, (str, os.PathLike)) else np.asarray(f) for f in items]


class Segmenter:
    """A trained segmentation checkpoint: frames (arrays or paths, as stored: implants dark) → masks."""

    def __init__(
        self, module: torch.nn.Module, preprocessing: Mapping[str, Any], device: str = "cpu"
    ) -> None:
        self.module = module.to(device).eval()
        self.device = device
        self.parts = list(module.parts)
        self.dataset = FluoroSegDataset([], self.parts, **preprocessing)

    @classmethod
    def from_checkpoint(cls, ckpt_path: str | os.PathLike, device: str = "cpu") -> Segmenter:
        """Load a ``SegmentationModule`` checkpoint with the preprocessing it was trained with."""
        module, preprocessing = load_segmentation_checkpoint(ckpt_path)
        return cls(module, preprocessing, device)

    @torch.no_grad()
    def probabilities(self, frame: np.ndarray) -> torch.Tensor:
        """``(P, S, S)`` probabilities at the network's size for one frame."""
        x, _, _ = self.dataset.prepare(np.asarray(frame))
        return self.module(x[None].to(self.device)).sigmoid()[0]

    def __call__(self, frames: Frames, threshold: float = 0.5) -> dict[str, np.ndarray]:
        """``{part: (N, H, W) uint8 {0, 1}}``, each mask the size of its frame (frames of one size)."""
        arrays = _frames(frames)
        out = [
            masks_to_frame(
                self.probabilities(f), f.shape, self.dataset.image_size, self.dataset.resize_mode, threshold
            )
            for f in arrays
        ]
        shapes = {m.shape for m in out}
        if len(shapes) != 1:
            raise JTMLError(f"frames of different sizes {sorted(shapes)}: segment them one size at a time")
        stack = np.stack(out)
        return {part: stack[:, i] for i, part in enumerate(self.parts)}


class PoseEstimator:
    """A trained pose checkpoint: each frame's part mask (and calibration) → its JointTrack pose.

    Runs in float32: a ``jtml predict`` with ``precision: bf16-mixed`` (the pose YAMLs' setting on
    the CPU) differs from it by its bf16 rounding (~1e-3 mm)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module.eval()
        self.parts = list(module.parts)

    @classmethod
    def from_checkpoint(cls, ckpt_path: str | os.PathLike) -> PoseEstimator:
        return cls(load_pose_checkpoint(ckpt_path))

    def __call__(
        self,
        masks: np.ndarray | Sequence[np.ndarray],
        calibration: str | os.PathLike | Calibration | Camera,
        part: str | None = None,
        frames: Frames | None = None,
    ) -> np.ndarray:
        """``(N, 6)`` poses (NaN rows where a mask is empty) of ``part`` from its ``(N, H, W)`` masks;
        ``calibration``: the study's ``calibration.txt`` (or a Calibration/Camera) for that frame size.
        ``frames`` only for frame/both models."""
        stack = np.asarray(masks)
        stack = stack[None] if stack.ndim == 2 else stack
        calib = read_calibration(calibration) if isinstance(calibration, (str, os.PathLike)) else calibration
        images = _frames(frames) if frames is not None else [None] * len(stack)
        if len(images) != len(stack):
            raise JTMLError(f"{len(stack)} masks but {len(images)} frames")
        return np.stack([self.module.estimate(m, calib, part, f) for m, f in zip(stack, images, strict=True)])


def score_poses(pred: np.ndarray, truth: np.ndarray, vertices: np.ndarray | None = None) -> dict[str, Any]:
    """:class:`~jtml.metrics.pose.PoseError` of ``(N, 6)`` poses against the truth (rows with a NaN
    in either are left out); ``vertices`` (the part's model, mm) adds mTRE."""
    pred, truth = np.asarray(pred, dtype=np.float64), np.asarray(truth, dtype=np.float64)
    keep = np.isfinite(pred).all(axis=1) & np.isfinite(truth).all(axis=1)
    if not keep.any():
        raise JTMLError(f"no frame has a pose in both ({len(pred)} rows)")
    metric = PoseError(vertices)
    metric.update(pred[keep], truth[keep])
    return metric.nested()


def show_overlay(
    frame: np.ndarray | str | Path, masks: Sequence[np.ndarray], ax: Any = None, title: str = ""
):
    """Draw :func:`overlay` (each part tinted and outlined) with matplotlib; returns the axes."""
    import matplotlib.pyplot as plt

    image = _frames(frame)[0]
    ax = ax if ax is not None else plt.subplots(figsize=(4, 4))[1]
    ax.imshow(overlay(image, np.asarray(masks))[..., ::-1])  # BGR -> RGB
    ax.set_axis_off()
    if title:
        ax.set_title(title)
    return ax
