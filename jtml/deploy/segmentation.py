"""Export a trained :class:`~jtml.models.segmentation.SegmentationModule` checkpoint for the JTML app.

The exported segmentation model (:class:`JTMLAppModel`) follows the app's input contract, so the app needs no
knowledge of how the network was trained:

- **input**: one tensor ``1 × 1 × H × W`` float32, RAW intensities 0–255 (no scaling, no
  normalisation), implants WHITE — i.e. ``255 − frame`` for a frame file as stored on disk (implants
  dark); the app does that inversion itself.
- **output**: logits ``1 × P × H × W`` float32 at the input's own ``H × W`` (P = the checkpoint's
  ``parts``, in that order, e.g. ``fem, tib``); ``sigmoid(logits) > 0.5`` (i.e. ``logits > 0``) is
  the mask, one channel per part.

Which ``H × W`` an exported file accepts: the TorchScript export (``resize_mode: resize``, the
default) takes any frame size — the wrapper is compiled with ``torch.jit.script`` (its padding and
resizing follow the input's shape) around the network traced at the training ``image_size``, the
only size the network ever sees. With ``resize_mode: crop`` the network runs at the frame's
(padded) native size, so a traced network holds only for frames whose longer side is the export
``size``; any other frame is refused with a message saying so. The ONNX export is traced for
``size × size`` frames only (the graph's input shape is fixed, so ONNX Runtime refuses any other).

Inside, the wrapper reproduces :class:`jtml.data.segmentation.FluoroSegDataset`'s preprocessing with the
training datamodule's settings, read from the checkpoint's ``datamodule_hyper_parameters`` (written
by ``jtml fit``; a checkpoint without them gets the :class:`FluoroSegDataModule` defaults, with a
warning): back to the stored frame ``255 − x``; zero-padding (centred) to a square when H ≠ W; resize
to the training ``image_size`` (OpenCV's uint8 ``INTER_AREA`` when shrinking, reproduced as a
pixel-overlap weight matrix on each axis and rounded to whole grey levels as OpenCV rounds — equal to
it for any factor, integer or not, but for a rare pixel whose average lies within float rounding of
a half grey level; bilinear when enlarging, within one grey level of OpenCV's fixed-point
``INTER_LINEAR``); ``invert`` (``255 − value``) when the network was trained with ``invert: true``;
``normalize`` (``minmax`` per frame, ``meanstd`` with ``mean``/``std`` on value/255, or ``none``).
The logits are resized back bilinearly to the padded square and the padding is cropped away.
With ``resize_mode: crop`` the network runs on the whole (padded-to-square) frame at native
resolution (H and W must then be divisible by ``2**encoder_depth``).

Formats: TorchScript (``torch.jit.script`` around a traced network, saved with ``torch.jit.save``;
load with ``torch.jit.load``) and ONNX (``torch.onnx.export``, opset 17, only when the ``onnx``
package is installed). Files are written atomically. Any other checkpoint (neither kind, a file without
their hyper-parameters, not a checkpoint at all) is one :class:`JTMLError` naming the file.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from jtml.deploy.files import FORMATS, check_target, checkpoint_class, load_module, read_checkpoint
from jtml.errors import JTMLError
from jtml.io import atomic_write
from jtml.models.segmentation import SegmentationModule

__all__ = [
    "FORMATS",
    "JTMLAppModel",
    "export_segmentation",
    "load_segmentation_checkpoint",
    "preprocessing",
]

_PREPROCESSING_KEYS = ("image_size", "resize_mode", "normalize", "mean", "std", "invert")


def preprocessing(datamodule_hparams: Mapping[str, Any] | None) -> dict[str, Any]:
    """The datamodule settings the wrapper reproduces (FluoroSegDataModule's defaults where missing)."""
    import inspect

    from jtml.data.segmentation import FluoroSegDataModule  # lazy: data imports albumentations

    defaults = {
        k: p.default
        for k, p in inspect.signature(FluoroSegDataModule.__init__).parameters.items()
        if k in _PREPROCESSING_KEYS
    }
    hp = dict(datamodule_hparams or {})
    return {k: hp.get(k, defaults[k]) for k in _PREPROCESSING_KEYS}


def _area_weights(n: int, s: int) -> Tensor:
    """``(s, n)`` float32 weights of OpenCV's ``INTER_AREA`` shrinking ``n`` pixels to ``s``: output
    pixel ``i`` averages the input pixels under ``[i·n/s, (i+1)·n/s)``, each by its overlap.

    Weights in float64 and then float32, like OpenCV's (which accumulates uint8 images in float32).
    """
    scale = n / s
    lo = torch.arange(s, dtype=torch.float64) * scale
    j = torch.arange(n, dtype=torch.float64)
    overlap = torch.minimum(lo[:, None] + scale, j[None, :] + 1.0) - torch.maximum(lo[:, None], j[None, :])
    return (overlap.clamp_min(0.0) / scale).float()


class JTMLAppModel(nn.Module):
    """``1×1×H×W`` raw 0–255 frame with implants white → ``1×P×H×W`` logits (see the module docstring).

    Written so that ``torch.jit.script`` compiles it: every size follows the input's shape.
    ``network_side`` > 0 refuses frames whose padded square side differs from it (a network traced
    at that side under ``resize_mode: crop``); 0 accepts any size.
    """

    def __init__(
        self,
        network: nn.Module,
        image_size: int,
        resize_mode: str = "resize",
        normalize: str = "minmax",
        mean: float = 0.449,
        std: float = 0.226,
        invert: bool = False,
        network_side: int = 0,
    ) -> None:
        super().__init__()
        if normalize not in ("minmax", "meanstd", "none") or resize_mode not in ("resize", "crop"):
            raise JTMLError(
                f"unsupported preprocessing: normalize={normalize!r}, resize_mode={resize_mode!r}"
            )
        self.network = network
        self.image_size = int(image_size)
        self.resize_mode = resize_mode
        self.normalize = normalize
        self.mean = float(mean)
        self.std = float(std)
        self.invert = bool(invert)
        self.network_side = int(network_side)

    def forward(self, x: Tensor) -> Tensor:
        h, w = int(x.shape[-2]), int(x.shape[-1])
        side = max(h, w)
        if self.network_side > 0 and side != self.network_side:
            raise RuntimeError(
                f"frame {h}x{w}: this model runs its network at the frame's native size (resize_mode "
                f"crop) and was exported for frames whose longer side is {self.network_side} px; "
                f"export it again with --size {side}"
            )
        frame = 255.0 - x.float()  # the stored frame: implants dark
        top, left = (side - h) // 2, (side - w) // 2
        if side != h or side != w:
            frame = F.pad(frame, [left, side - w - left, top, side - h - top])
        s = self.image_size if self.resize_mode == "resize" else side
        if s < side:
            # OpenCV's INTER_AREA on uint8, as the dataset does. At an integer factor it is the box
            # average F.interpolate's "area" computes (fast); at any other, "area" is an adaptive average
            # pool that differs from OpenCV by tens of grey levels: overlap weights on each axis instead.
            if side % s == 0:
                frame = F.interpolate(frame, size=(s, s), mode="area")
            else:
                a = _area_weights(side, s).to(frame.device)  # built on the CPU: float64 on any device
                frame = torch.matmul(torch.matmul(a, frame), a.t())
            # OpenCV rounds halves up in its 2× fast path and to even everywhere else
            frame = torch.floor(frame + 0.5) if side == 2 * s else torch.round(frame)
        elif s > side:
            frame = torch.round(F.interpolate(frame, size=(s, s), mode="bilinear", align_corners=False))
            frame = frame.clamp(0.0, 255.0)
        if self.invert:
            frame = 255.0 - frame
        if self.normalize == "minmax":
            lo = frame.amin(dim=(-2, -1), keepdim=True)
            hi = frame.amax(dim=(-2, -1), keepdim=True)
            span = hi - lo
            scale = torch.where(span > 0, 1.0 / span.clamp_min(1e-12), torch.zeros_like(span))
            net_in = frame * scale - lo * scale
        elif self.normalize == "meanstd":
            net_in = frame * (1.0 / (255.0 * self.std)) - self.mean / self.std
        else:
            net_in = frame
        logits = self.network(net_in)
        if s != side:
            logits = F.interpolate(logits, size=(side, side), mode="bilinear", align_corners=False)
        return logits[:, :, top : top + h, left : left + w]


def load_segmentation_checkpoint(ckpt_path: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """``(SegmentationModule in eval mode on the CPU, preprocessing settings)``; JTMLError names the file."""
    path = Path(ckpt_path)
    ckpt = read_checkpoint(path)
    if not issubclass(checkpoint_class(ckpt, path), SegmentationModule):
        raise JTMLError("a pose checkpoint, not a segmentation one", path)
    dm_hp = ckpt.get("datamodule_hyper_parameters")
    if not isinstance(dm_hp, Mapping):
        warnings.warn(
            f"{path}: no datamodule_hyper_parameters (not trained with `jtml fit`); assuming the "
            "FluoroSegDataModule defaults for preprocessing",
            stacklevel=2,
        )
        dm_hp = None
    return load_module(SegmentationModule, path), preprocessing(dm_hp)


def app_model(ckpt_path: str | os.PathLike) -> JTMLAppModel:
    """The checkpoint wrapped in :class:`JTMLAppModel`, eval mode, CPU."""
    module, prep = load_segmentation_checkpoint(ckpt_path)
    model = JTMLAppModel(module.model, **prep).eval()  # the smp network alone: no losses or metrics
    model.parts = list(module.parts)
    return model


def _torchscript(model: JTMLAppModel, size: int) -> torch.jit.ScriptModule:
    """``model`` compiled for the app: the wrapper scripted (any frame size), the network traced.

    Tracing the wrapper, as before, froze the padding and resizing to the example's size, so a
    ``512²`` frame came back as ``1024²`` logits; scripting keeps them shape-driven. The network
    itself is traced at the one size it sees: ``image_size`` with ``resize_mode: resize``, the
    export ``size`` with ``crop`` (then the wrapper refuses other frame sizes).
    """
    crop = model.resize_mode == "crop"
    side = int(size) if crop else model.image_size
    net_in = torch.rand(1, 1, side, side, generator=torch.Generator().manual_seed(0))
    network = torch.jit.trace(model.network, net_in, check_trace=False)
    app = JTMLAppModel(
        network,
        model.image_size,
        model.resize_mode,
        model.normalize,
        model.mean,
        model.std,
        model.invert,
        network_side=side if crop else 0,
    ).eval()
    return torch.jit.script(app)


def export_segmentation(
    ckpt_path: str | os.PathLike, fmt: str, out: str | os.PathLike, size: int = 1024
) -> dict[str, Any]:
    """Export ``ckpt_path`` as ``fmt`` ("torchscript" or "onnx") to ``out`` for ``size``² app frames.

    Returns a summary: ``out``, ``format``, ``input`` and ``output`` shapes for a ``size``² frame
    (the output measured by running the exported model), ``any_frame_size`` (whether other
    ``H × W`` are accepted: TorchScript with ``resize_mode: resize``), ``parts`` and the
    preprocessing settings baked in.
    """
    out = check_target(fmt, out)
    if int(size) < 8:
        raise JTMLError(f"size must be at least 8, got {size}")
    model = app_model(ckpt_path)
    parts = list(model.parts)
    example = torch.zeros(1, 1, int(size), int(size))
    example[..., size // 4 : size // 2, size // 4 : size // 2] = 255.0  # minmax needs some contrast
    with torch.no_grad():
        if fmt == "torchscript":
            with warnings.catch_warnings():  # TracerWarning, and torch's deprecation notices of jit
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                warnings.simplefilter("ignore", FutureWarning)
                scripted = _torchscript(model, int(size))
                output = list(scripted(example).shape)
                with atomic_write(out) as tmp:
                    torch.jit.save(scripted, str(tmp))
        else:
            output = list(model(example).shape)
            with atomic_write(out) as tmp:
                torch.onnx.export(
                    model,
                    (example,),
                    str(tmp),
                    input_names=["image"],
                    output_names=["logits"],
                    opset_version=17,
                    dynamo=False,  # the TorchScript-based exporter: no onnxscript dependency, seconds
                )
    return {
        "out": str(out),
        "format": fmt,
        "input": [1, 1, int(size), int(size)],
        "output": output,
        "any_frame_size": fmt == "torchscript" and model.resize_mode == "resize",
        "parts": parts,
        "preprocessing": {
            "image_size": model.image_size,
            "resize_mode": model.resize_mode,
            "normalize": model.normalize,
            "mean": model.mean,
            "std": model.std,
            "invert": model.invert,
        },
    }
