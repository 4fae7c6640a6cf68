"""Reading trained checkpoints and checking export targets, shared by the segmentation and pose exports."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from jtml._moved import resolve_class
from jtml.errors import JTMLError
from jtml.models.pose import PoseModule
from jtml.models.segmentation import SegmentationModule

__all__ = ["FORMATS", "check_target", "checkpoint_class", "load_module", "read_checkpoint"]

FORMATS = ("torchscript", "onnx")
# What a checkpoint without ``_class_path`` (saved by a plain Trainer) must hold to count as each kind.
_KEYS: dict[type, tuple[str, ...]] = {
    SegmentationModule: ("parts", "arch", "encoder_name"),
    PoseModule: ("parts", "input", "backbone", "roi_size"),
}


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint at ``path`` (``torch.load(weights_only=True)``, CPU); JTMLError names the file."""
    path = Path(path)
    if not path.is_file():
        raise JTMLError("checkpoint not found", path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, truncated, or holding arbitrary Python objects
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
        raise JTMLError(f"not a readable Lightning checkpoint ({type(e).__name__}: {first})", path) from None
    if not isinstance(ckpt, Mapping) or "state_dict" not in ckpt:
        raise JTMLError("not a Lightning checkpoint (no state_dict)", path)
    return dict(ckpt)


def checkpoint_class(ckpt: Mapping[str, Any], path: str | os.PathLike) -> type:
    """:class:`SegmentationModule` or :class:`PoseModule`: the kind of module that wrote ``ckpt``.

    By the class its ``_class_path`` names (old module paths included, subclasses counting as their
    base); a checkpoint without one by its hyper-parameters. Anything else is one JTMLError.
    """
    hp = ckpt.get("hyper_parameters")
    class_path = str(hp.get("_class_path") or "") if isinstance(hp, Mapping) else ""
    if class_path:
        cls = resolve_class(class_path)
        found = class_path
    else:
        cls = next(
            (k for k, keys in _KEYS.items() if isinstance(hp, Mapping) and all(n in hp for n in keys)), None
        )
        found = f"hyper-parameters {sorted(hp)[:8]}" if isinstance(hp, Mapping) else "no hyper-parameters"
    kind = next((k for k in _KEYS if cls is not None and issubclass(cls, k)), None)
    if kind is None:
        expected = "; ".join(f"{k.__name__} ({', '.join(keys)})" for k, keys in _KEYS.items())
        raise JTMLError(f"not a segmentation or pose checkpoint (expected {expected}); found {found}", path)
    return kind


def load_module(kind: type, path: str | os.PathLike) -> Any:
    """``kind.load_from_checkpoint(path)`` in eval mode on the CPU; JTMLError names the file."""
    try:
        module = kind.load_from_checkpoint(path, map_location="cpu")
    except JTMLError as e:
        raise JTMLError(e.message, path) from None
    except Exception as e:
        what = "segmentation" if issubclass(kind, SegmentationModule) else "pose"
        raise JTMLError(f"cannot load the {what} model ({type(e).__name__}: {e})", path) from None
    return module.eval()


def check_target(fmt: str, out: str | os.PathLike) -> Path:
    """``out`` as a Path, refusing an unknown ``fmt``, a folder, and ONNX without the ``onnx`` package."""
    if fmt not in FORMATS:
        raise JTMLError(f"unknown export format {fmt!r}; choose from {FORMATS}")
    out = Path(out)
    if out.is_dir():
        raise JTMLError("export target is a folder; give a file name", out)
    if fmt == "onnx":
        try:
            import onnx  # noqa: F401  (torch.onnx.export needs it)
        except ImportError:
            raise JTMLError(
                "ONNX export needs the 'onnx' package, which is not installed; install onnx (and "
                "onnxruntime to run it) or use --format torchscript"
            ) from None
    return out
