"""``jtml predict`` output: per-frame masks in the lab's label format plus overlays to look at.

:class:`SegmentationPredictionWriter` is a Lightning ``BasePredictionWriter`` (one write per
batch, so memory stays flat however many frames there are). The segmentation experiment YAMLs
list it under ``trainer.callbacks`` (it acts in ``predict`` only)::

    - class_path: jtml.callbacks.predict.SegmentationPredictionWriter

so that::

    jtml predict --config experiments/demo_seg.yaml --ckpt_path runs/demo_seg/<run>/checkpoints/last.ckpt \\
        --data.studies '[/path/to/study]' [--trainer.callbacks.init_args.out_dir /path/to/predictions]

writes every frame of those folders (``out_dir`` null: the predict run's ``predictions/``; add
``--trainer.callbacks.init_args.overwrite true`` to write into a non-empty folder). The data
settings — ``image_size``, ``normalize``, ``invert`` — must be those the checkpoint was trained
with, i.e. the same experiment YAML and overrides. For a YAML without it, append it on the
command line: ``--trainer.callbacks+=jtml.callbacks.predict.SegmentationPredictionWriter``.

Output, for every predicted frame (``<frame>`` is the frame file's stem):

- ``OUT/<part>/<frame>_label_<part>.tif``: uint8 {0, 255} LZW TIFF at the ORIGINAL frame size (the
  probabilities are resized back bilinearly, then thresholded at ``threshold``; the padding or the
  crop the dataset applied is undone), i.e. the layout of a study's ``Labels/<part>/`` folder.
- ``OUT/overlays/<frame>.png``: the frame in gray with each part tinted and outlined (fem red, tib
  green; further parts blue, yellow, ...).

When the predicted frames come from more than one study, each study gets its own sub-folder
(``OUT/<study>/<part>/...``) so equal frame names never collide. ``out_dir`` defaults to
``<run_dir>/predictions`` (the Trainer's ``default_root_dir``). An existing, non-empty ``out_dir``
is refused (one ``error:`` line naming it, exit 2) before anything is predicted, unless
``overwrite``. Non-image files in a study folder are ignored (see :func:`jtml.io.list_images`); an
unreadable frame stops the run with one ``error:`` line naming the file (the dataset's JTMLError).

:class:`PredictionFolderWriter` is the contract this writer shares with
:class:`jtml.callbacks.pose.PosePredictionWriter`: ``out_dir`` and ``overwrite`` as above, and its
messages go to stderr, so that ``jtml predict``'s stdout is the JSON summary alone.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import BasePredictionWriter
from pytorch_lightning.utilities import rank_zero_only

from jtml.errors import JTMLError
from jtml.io import read_image, write_image, write_mask

__all__ = [
    "PART_COLOURS",
    "PredictionFolderWriter",
    "SegmentationPredictionWriter",
    "gather_objects",
    "masks_to_frame",
    "overlay",
]

# BGR: fem red, tib green, then blue, yellow, magenta, cyan.
PART_COLOURS = ((40, 40, 230), (40, 200, 40), (230, 120, 30), (30, 220, 230), (200, 60, 200), (200, 200, 40))


def gather_objects(trainer: pl.Trainer, items: list[Any]) -> list[Any]:
    """Every rank's ``items``, concatenated in rank order, on every rank (one process: the list
    itself). A collective: under DDP every rank must call it."""
    if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        gathered: list[Any] = [None] * trainer.world_size
        torch.distributed.all_gather_object(gathered, items)
        return [x for part in gathered for x in part]
    return list(items)


def _to_gray8(frame: np.ndarray) -> np.ndarray:
    if frame.dtype == np.uint8:
        return frame
    lo, hi = float(frame.min()), float(frame.max())
    scaled = (frame.astype(np.float32) - lo) / (hi - lo) if hi > lo else np.zeros(frame.shape, np.float32)
    return np.round(scaled * 255).astype(np.uint8)


def overlay(frame: np.ndarray, masks: np.ndarray, alpha: float = 0.35) -> np.ndarray:
    """BGR uint8 picture: ``frame`` (H,W) in gray, each of ``masks`` (P,H,W) tinted and outlined."""
    out = cv2.cvtColor(_to_gray8(frame), cv2.COLOR_GRAY2BGR)
    thickness = max(1, round(max(frame.shape) / 400))
    for i, mask in enumerate(masks):
        m = np.ascontiguousarray(mask > 0).astype(np.uint8)
        if not m.any():
            continue
        colour = PART_COLOURS[i % len(PART_COLOURS)]
        tinted = out.astype(np.float32)
        tinted[m > 0] = (1 - alpha) * tinted[m > 0] + alpha * np.asarray(colour, np.float32)
        out = np.round(tinted).astype(np.uint8)
        contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, colour, thickness)
    return out


def masks_to_frame(
    probs: torch.Tensor,
    frame_shape: tuple[int, int],
    image_size: int,
    resize_mode: str = "resize",
    threshold: float = 0.5,
) -> np.ndarray:
    """Network-size probabilities (P,S,S) → uint8 {0,1} masks (P,H,W) on the original frame.

    Undoes :class:`jtml.data.segmentation.FluoroSegDataset`'s geometry: ``"resize"`` padded the frame
    (centred) to a square and resized it to S; ``"crop"`` took the centred S×S window of the frame
    (zero-padded when smaller).
    """
    h, w = frame_shape
    probs = probs.detach().float().cpu()
    if resize_mode == "crop":
        s = image_size
        ph, pw = max(h, s), max(w, s)
        full = torch.zeros((probs.shape[0], ph, pw))
        y, x = (ph - s) // 2, (pw - s) // 2
        full[:, y : y + s, x : x + s] = probs
        dy, dx = (ph - h) // 2, (pw - w) // 2
        probs = full[:, dy : dy + h, dx : dx + w]
    else:
        side = max(h, w)
        if probs.shape[-1] != side:
            probs = F.interpolate(probs[None], size=(side, side), mode="bilinear", align_corners=False)[0]
        dy, dx = (side - h) // 2, (side - w) // 2
        probs = probs[:, dy : dy + h, dx : dx + w]
    return (probs > threshold).numpy().astype(np.uint8)


class PredictionFolderWriter(BasePredictionWriter):
    """What every ``jtml predict`` writer shares: it writes under ``out_dir`` (default
    ``<trainer.default_root_dir>/predictions``, the run's own folder), refuses an existing path
    that is not a folder, or a non-empty folder unless ``overwrite`` (so an earlier run's results
    are never mixed with or silently replaced by this one's), and says what it wrote on stderr
    (stdout is the command's JSON summary alone).

    The refusal lives in :meth:`setup`, which ``jtml predict`` calls before W&B starts and before
    anything is predicted. Subclasses keep their per-run state in :meth:`reset`; :attr:`root` is
    the folder of the current run.
    """

    def __init__(
        self, out_dir: str | Path | None = None, overwrite: bool = False, write_interval: str = "batch"
    ) -> None:
        super().__init__(write_interval=write_interval)
        self.out_dir = out_dir
        self.overwrite = bool(overwrite)
        self.root: Path | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "predict":
            return
        root = Path(self.out_dir) if self.out_dir else Path(trainer.default_root_dir) / "predictions"
        if root.exists() and not root.is_dir():
            raise JTMLError(
                "prediction output path exists and is not a folder; choose another "
                "--trainer.callbacks.init_args.out_dir",
                root,
            )
        if root.is_dir() and any(root.iterdir()) and not self.overwrite:
            raise JTMLError(
                "prediction output folder exists and is not empty; choose another out_dir or pass "
                "--trainer.callbacks.init_args.overwrite true",
                root,
            )
        self.root = root
        self.reset()

    def reset(self) -> None:
        """Forget the previous predict run's state (called by :meth:`setup`)."""

    def _output_root(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Path:
        """The run's folder; checks it first when :meth:`setup` was not called for predict (direct use)."""
        if self.root is None:
            self.setup(trainer, pl_module, "predict")
        assert self.root is not None
        return self.root

    @staticmethod
    def _dataset(trainer: pl.Trainer, dataloader_idx: int) -> Any:
        """The dataset of the predict DataLoader ``dataloader_idx`` (the frames' files)."""
        loaders = trainer.predict_dataloaders
        if isinstance(loaders, Sequence):
            loaders = loaders[dataloader_idx]
        return loaders.dataset

    @staticmethod
    @rank_zero_only
    def _say(msg: str) -> None:
        """One progress message, on stderr and from rank zero only."""
        print(msg, file=sys.stderr, flush=True)


class SegmentationPredictionWriter(PredictionFolderWriter):
    """Write each predicted frame's part masks (lab label format) and an overlay PNG; see the module
    docstring for the layout and how to add it to ``jtml predict``."""

    def __init__(self, out_dir: str | None = None, overwrite: bool = False, threshold: float = 0.5) -> None:
        super().__init__(out_dir=out_dir, overwrite=overwrite, write_interval="batch")
        if not 0.0 < float(threshold) < 1.0:
            raise JTMLError(f"threshold must be in (0, 1), got {threshold}")
        self.threshold = float(threshold)
        self.written = 0

    def reset(self) -> None:
        self.written = 0

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The files are the output: do not also keep every probability map in memory for the return value.
        trainer.predict_loop.return_predictions = False

    # -- writing ---------------------------------------------------------------------------------------
    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        root = self._output_root(trainer, pl_module)
        dataset = self._dataset(trainer, dataloader_idx)
        rows = getattr(dataset, "rows", None)
        if rows is None:
            raise JTMLError("SegmentationPredictionWriter needs a FluoroSegDataset (rows with frame files)")
        parts = list(getattr(pl_module, "parts", None) or dataset.parts)
        probs = prediction["probs"]
        if probs.shape[1] != len(parts):
            raise JTMLError(f"the model predicts {probs.shape[1]} channels but has parts {parts}")
        if "index" in batch:
            indices = [int(i) for i in batch["index"]]
        elif batch_indices is not None:
            indices = [int(i) for i in batch_indices]
        else:
            raise JTMLError("predict batches carry no 'index'; cannot find the frames to write")
        per_study = len({r.study for r in rows}) > 1
        for k, i in enumerate(indices):
            row = rows[i]
            frame = read_image(row.image)
            masks = masks_to_frame(
                probs[k], frame.shape[:2], dataset.image_size, dataset.resize_mode, self.threshold
            )
            base = root / str(row.study) if per_study else root
            name = Path(row.image).stem
            for part, mask in zip(parts, masks, strict=True):
                write_mask(base / part / f"{name}_label_{part}.tif", mask)
            write_image(base / "overlays" / f"{name}.png", overlay(frame, masks))
            self.written += 1

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.root is not None:
            self._say(f"wrote masks and overlays of {self.written} frame(s) to {self.root}")
