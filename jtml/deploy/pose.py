"""Export a trained :class:`~jtml.models.pose.PoseModule` checkpoint for the JTML app.

The exported model (:class:`PoseAppModel`) takes what :func:`jtml.geometry.roi.make_sample` builds
for one part, batched, in this order (:data:`INPUT_NAMES`):

- the ROI tensor(s) by the model's ``input``: ``roi_mask`` (``mask``), ``roi_image`` (``frame``), or
  ``roi_image`` then ``roi_mask`` (``both``), each ``B × 1 × R × R`` float32 (``R = roi_size``);
- ``roi`` ``B × 3`` float64 (ROI centre ``u, v`` and side, frame pixels);
- ``camera`` ``B × 6`` float64 (``pd, xo, yo, pp, width, height``);
- ``roi_bbox`` ``B × 4`` float32 (the silhouette's bbox in ROI units);
- ``part`` ``B`` int64 (index into the model's ``parts``);

and returns the JointTrack pose rows ``B × 6`` float64 (``x, y, z`` mm, ``z_rot, x_rot, y_rot``
degrees), decoded exactly as ``jtml predict`` does (:meth:`PoseModule.decode`). A sample whose mask is
empty (``make_sample``'s ``valid`` false) has no pose: the app skips it, where ``jtml predict``
writes NaN. ``B`` is free in both formats.

The model's ``parts``, ``input``, ``roi_size`` and ``roi_margin`` (what ``make_sample`` needs) are
recorded in the file (:data:`METADATA_KEY`, a JSON object): a TorchScript extra file
(``torch.jit.load(path, _extra_files={"jtml.json": ""})``), ONNX metadata (``metadata_props``;
ONNX Runtime's ``session.get_modelmeta().custom_metadata_map``), and in the summary.

Formats: TorchScript (the network and its decoding traced, ``torch.jit.save``) and ONNX
(``torch.onnx.export``, opset 17). ONNX Runtime has no float64 ``Atan``/``Asin`` kernels and ONNX no
``rad2deg``, so the decoding's ``atan2``/``asin`` are exported as a float32 seed refined by one
Newton step in float64 (float64 ``Sin``/``Cos``), accurate to float64 rounding.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from jtml.deploy.files import check_target, checkpoint_class, load_module, read_checkpoint
from jtml.errors import JTMLError
from jtml.io import atomic_write
from jtml.models.networks.pose import PoseNet
from jtml.models.parameterisation import decode_pose
from jtml.models.pose import PoseModule

__all__ = ["INPUT_NAMES", "METADATA_KEY", "PoseAppModel", "export_pose", "load_pose_checkpoint"]

ROI_NAMES = {"mask": ("roi_mask",), "frame": ("roi_image",), "both": ("roi_image", "roi_mask")}
INPUT_NAMES = {k: (*rois, "roi", "camera", "roi_bbox", "part") for k, rois in ROI_NAMES.items()}
METADATA_KEY = "jtml.json"
_OPSET = 17


class PoseAppModel(nn.Module):
    """:data:`INPUT_NAMES` ``[input]`` tensors → JointTrack pose rows ``(B, 6)`` float64."""

    def __init__(self, net: PoseNet, depth_ref_mm: float, allocentric: bool) -> None:
        super().__init__()
        self.net = net
        self.depth_ref_mm, self.allocentric = float(depth_ref_mm), bool(allocentric)

    def forward(self, *inputs: Tensor) -> Tensor:
        *rois, roi, camera, roi_bbox, part = inputs
        x = rois[0] if len(rois) == 1 else torch.cat(rois, dim=1)  # as PoseModule.inputs concatenates
        offset, log_depth, rotation = self.net.split_outputs(self.net(x, part, roi_bbox))
        return decode_pose(offset, log_depth, rotation, roi, camera, self.depth_ref_mm, self.allocentric)


def load_pose_checkpoint(ckpt_path: str | os.PathLike) -> PoseModule:
    """The checkpoint's PoseModule, eval mode, CPU; JTMLError names the file."""
    path = Path(ckpt_path)
    if not issubclass(checkpoint_class(read_checkpoint(path), path), PoseModule):
        raise JTMLError("a segmentation checkpoint, not a pose one", path)
    return load_module(PoseModule, path)


def _metadata(module: PoseModule) -> dict[str, Any]:
    """What the app needs to build the exported model's inputs (:func:`jtml.geometry.roi.make_sample`)."""
    return {
        "kind": "pose",
        "parts": list(module.parts),
        "input": module.input,
        "roi_size": module.roi_size,
        "roi_margin": module.roi_margin,
        "inputs": list(INPUT_NAMES[module.input]),
        "output": "pose",
    }


def _example_inputs(module: PoseModule, batch: int = 2) -> tuple[Tensor, ...]:
    """A plausible batch (a centred square silhouette in a 1024² frame) to trace the model with."""
    r = module.roi_size
    roi_mask = torch.zeros(batch, 1, r, r)
    roi_mask[..., r // 8 : r - r // 8, r // 8 : r - r // 8] = 1.0
    roi_image = torch.rand(batch, 1, r, r, generator=torch.Generator().manual_seed(0))
    rois = {"roi_mask": roi_mask, "roi_image": roi_image}
    roi = torch.tensor([[512.0, 512.0, 300.0]], dtype=torch.float64).expand(batch, 3)
    camera = torch.tensor([[1198.0, 0.0, 0.0, 0.373, 1024.0, 1024.0]], dtype=torch.float64).expand(batch, 6)
    roi_bbox = torch.tensor([[0.125, 0.125, 0.875, 0.875]]).expand(batch, 4)
    part = torch.arange(batch) % len(module.parts)
    return (*(rois[k] for k in ROI_NAMES[module.input]), roi.clone(), camera.clone(), roi_bbox.clone(), part)


# -- ONNX: the decoding's operators that ONNX (Runtime) lacks in float64 --------------------------------


def _constant(g: Any, value: float, like: Any) -> Any:
    return g.op("CastLike", g.op("Constant", value_t=torch.tensor(value, dtype=torch.float64)), like)


def _atan2(g: Any, y: Any, x: Any) -> Any:
    # float32 seed (quadrants as torch: x < 0 adds ±π by the sign of y), then one Newton step on
    # x·sin θ − y·cos θ = 0 in the inputs' precision; atan2(0, 0) = 0 as in torch.
    yf, xf = g.op("Cast", y, to_i=1), g.op("Cast", x, to_i=1)  # 1: FLOAT
    seed = g.op("Atan", g.op("Div", yf, xf))
    pi, zero_f = (g.op("Constant", value_t=torch.tensor(v, dtype=torch.float32)) for v in (math.pi, 0.0))
    turned = g.op("Where", g.op("Less", yf, zero_f), g.op("Sub", seed, pi), g.op("Add", seed, pi))
    seed = g.op("CastLike", g.op("Where", g.op("Less", xf, zero_f), turned, seed), y)
    sin, cos = g.op("Sin", seed), g.op("Cos", seed)
    residual = g.op("Sub", g.op("Mul", x, sin), g.op("Mul", y, cos))
    slope = g.op("Add", g.op("Mul", x, cos), g.op("Mul", y, sin))
    zero = _constant(g, 0.0, y)
    refined = g.op("Where", g.op("Equal", slope, zero), seed, g.op("Sub", seed, g.op("Div", residual, slope)))
    origin = g.op("And", g.op("Equal", x, zero), g.op("Equal", y, zero))
    return g.op("Where", origin, zero, refined)


def _asin(g: Any, s: Any) -> Any:
    one = _constant(g, 1.0, s)
    return _atan2(g, s, g.op("Sqrt", g.op("Mul", g.op("Sub", one, s), g.op("Add", one, s))))


def _rad2deg(g: Any, x: Any) -> Any:
    return g.op("Mul", x, _constant(g, 180.0 / math.pi, x))


@contextlib.contextmanager
def _onnx_symbolics() -> Iterator[None]:
    """Our ``atan2``/``asin``/``rad2deg`` for the export, torch's own again afterwards."""
    ops = {"aten::atan2": _atan2, "aten::asin": _asin, "aten::rad2deg": _rad2deg}
    for name, fn in ops.items():
        torch.onnx.register_custom_op_symbolic(name, fn, _OPSET)
    try:
        yield
    finally:
        for name in ops:
            torch.onnx.unregister_custom_op_symbolic(name, _OPSET)


def _write_onnx(
    model: PoseAppModel, example: tuple[Tensor, ...], names: list[str], meta: str, tmp: Path
) -> None:
    import onnx

    with _onnx_symbolics():
        torch.onnx.export(
            model,
            example,
            str(tmp),
            input_names=names,
            output_names=["pose"],
            dynamic_axes={name: {0: "batch"} for name in [*names, "pose"]},
            opset_version=_OPSET,
            dynamo=False,  # the TorchScript-based exporter: no onnxscript dependency, seconds
        )
    proto = onnx.load(str(tmp))
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, meta
    onnx.save(proto, str(tmp))


def export_pose(ckpt_path: str | os.PathLike, fmt: str, out: str | os.PathLike) -> dict[str, Any]:
    """Export the pose checkpoint ``ckpt_path`` as ``fmt`` ("torchscript" or "onnx") to ``out``.

    Returns a summary: ``out``, ``format``, ``inputs`` (name → shape for one sample), ``output``
    (its shape for that sample), ``parts`` and the ROI settings (``preprocessing``), which are also
    in the file's metadata.
    """
    out = check_target(fmt, out)
    module = load_pose_checkpoint(ckpt_path)
    model = PoseAppModel(module.net, module.depth_ref_mm, module.allocentric).eval()
    meta = _metadata(module)
    names = list(INPUT_NAMES[module.input])
    example = _example_inputs(module)
    with torch.no_grad(), warnings.catch_warnings():  # TracerWarning, and torch's notices of jit/onnx
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        # part indices are never negative, the one case where ONNX's index gathering would be wrong
        warnings.filterwarnings("ignore", "Exporting aten::index operator", UserWarning)
        if fmt == "torchscript":
            traced = torch.jit.trace(model, example, check_trace=False)
            output = list(traced(*(t[:1] for t in example)).shape)
            with atomic_write(out) as tmp:
                torch.jit.save(traced, str(tmp), _extra_files={METADATA_KEY: json.dumps(meta)})
        else:
            output = list(model(*(t[:1] for t in example)).shape)
            with atomic_write(out) as tmp:
                _write_onnx(model, example, names, json.dumps(meta), tmp)
    return {
        "out": str(out),
        "format": fmt,
        "inputs": {name: [1, *t.shape[1:]] for name, t in zip(names, example, strict=True)},
        "output": output,
        "parts": meta["parts"],
        "preprocessing": {k: meta[k] for k in ("input", "roi_size", "roi_margin")},
    }
