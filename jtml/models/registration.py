"""Registration as a LightningModule: ``trainer.predict`` registers every frame of a study.

:class:`RegistrationModule` has no network and no training: its ``predict_step`` runs
:func:`jtml.registration.frame.register_frame` on each frame of a batch
(:class:`jtml.data.registration.RegistrationDataModule` items) and returns the per-part results, so
that thousands of frames go through Lightning's predict loop — DDP over devices and nodes, SLURM —
like every other jtml prediction, and :class:`jtml.callbacks.refine.RefineWriter` writes them. Its
arguments are the registration settings of the experiment YAML (:class:`RegistrationConfig`: the
stages and their ranges, the twin, the priors, the review thresholds). Renders run on the module's
device (a GPU under ``accelerator: gpu``): the same code as on the CPU.

Every frame's search is seeded by ``seed`` and the frame's index alone, so a frame gets the same
pose whichever process registers it.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any, Literal

import numpy as np
import pytorch_lightning as pl
import torch

from jtml.geometry import Camera, SilhouetteRenderer
from jtml.io import Calibration, read_stl
from jtml.registration.frame import PartResult, RegistrationConfig, register_frame

__all__ = ["RegistrationModule"]


class RegistrationModule(pl.LightningModule):
    """Registers frames in ``predict_step`` (module docstring); the arguments are
    :class:`~jtml.registration.frame.RegistrationConfig`'s (``stages``: a list of
    :class:`~jtml.registration.search.Stage` dicts; None: the default schedule), and
    ``cpu_threads``: torch's intra-op threads while predicting on a CPU (None: as they are)."""

    def __init__(
        self,
        stages: list[dict[str, Any]] | None = None,
        twin: bool = True,
        twin_skip: int = 1,
        twin_decisive: float = 1.25,
        tibia_rule: Literal["cost", "varus_valgus"] = "cost",
        image: bool = False,
        band: float = 6.0,
        priors: bool = True,
        prior_start: bool = True,
        femur: str = "fem",
        tibia: str = "tib",
        varus_sigma: float = 3.0,
        offset_sigma: float = 3.0,
        prior_weight: float = 0.01,
        min_iou: float = 0.9,
        max_outliers: float = 0.05,
        ambiguous: float = 0.8,
        max_varus: float = 8.0,
        max_offset: float = 8.0,
        seed: int = 0,
        batch: int | None = None,
        cpu_threads: int | None = 1,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        known = {f.name for f in fields(RegistrationConfig)}
        spec = {k: v for k, v in self.hparams.items() if k in known and (k != "stages" or v is not None)}
        self.config = RegistrationConfig.from_dict(spec)
        self._renderers: dict[tuple[Any, ...], SilhouetteRenderer] = {}
        self._meshes: dict[str, Any] = {}
        self.cpu_threads = cpu_threads
        self._threads: int | None = None

    def on_predict_start(self) -> None:
        # the renders are many small ops: a second intra-op thread only spins (3-8x slower on a busy
        # 2-core machine); processes (--devices N --strategy ddp) are the way to use more cores
        if self.device.type == "cpu" and self.cpu_threads:
            self._threads = torch.get_num_threads()
            torch.set_num_threads(int(self.cpu_threads))

    def on_predict_end(self) -> None:
        if self._threads is not None:
            torch.set_num_threads(self._threads)
            self._threads = None

    def renderer(
        self, part: str, model: str, calibration: tuple[float, ...], shape: tuple[int, int]
    ) -> SilhouetteRenderer:
        """``model`` seen through a frame of ``shape`` ``(H, W)`` with the study's calibration (for
        frames of that size, as ``jtml labels`` reads it), on this module's device; cached."""
        key = (model, tuple(calibration), tuple(shape), str(self.device))
        if key not in self._renderers:
            if model not in self._meshes:
                self._meshes[model] = read_stl(model)
            h, w = shape
            camera = Camera.from_calibration(Calibration(*calibration), w, h)
            self._renderers[key] = SilhouetteRenderer(self._meshes[model], camera, self.device)
        return self._renderers[key]

    def register(self, item: dict[str, Any]) -> dict[str, PartResult]:
        """One frame's item → each part's result."""
        if tuple(item["shape"]) == (0, 0):  # the frame itself could not be read
            return {
                part: PartResult(part, np.full(6, np.nan), False, item["problems"][part], np.asarray(start))
                for part, start in item["starts"].items()
            }
        renderers = {
            part: self.renderer(part, model, item["calibration"], item["shape"])
            for part, model in item["models"].items()
        }
        results = register_frame(
            renderers,
            item["masks"],
            item["starts"],
            self.config,
            seed=self.config.seed + int(item["index"]),
            frame=item.get("image"),
        )
        for part, reason in item.get("problems", {}).items():
            if part in results and not results[part].refined:
                results[part].reason = reason
        return results

    def predict_step(
        self, batch: list[dict[str, Any]], batch_idx: int, dataloader_idx: int = 0
    ) -> list[dict[str, Any]]:
        with torch.no_grad():
            return [
                {
                    "index": int(item["index"]),
                    "frame": item["frame"],
                    "item": _light(item),
                    "results": self.register(item),
                }
                for item in batch
            ]

    def configure_optimizers(self) -> None:  # predict only: nothing to train
        return None


def _light(item: dict[str, Any]) -> dict[str, Any]:
    """What the writer needs of an item (not its masks)."""
    return {k: item[k] for k in ("shape", "models", "calibration")}
