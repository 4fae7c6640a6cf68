"""Building the smp segmentation network offline: architecture fixes, unused parameters, local weights."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import segmentation_models_pytorch as smp
import torch
from torch import Tensor, nn

from jtml.errors import JTMLError

__all__ = [
    "WEIGHT_SUFFIXES",
    "check_encoder_weights",
    "create_network",
    "freeze_unused_parameters",
    "load_encoder_state_dict",
]

WEIGHT_SUFFIXES = (".pth", ".pt", ".safetensors", ".bin")


def _is_local_weights(value: str) -> bool:
    return value.lower().endswith(WEIGHT_SUFFIXES) or "/" in value or os.sep in value or os.path.exists(value)


def check_encoder_weights(encoder_weights: str | None) -> None:
    """Refuse hub weight names (``imagenet``, ...): nothing may be downloaded, so say how to get a file."""
    if encoder_weights is not None and not _is_local_weights(encoder_weights):
        raise JTMLError(
            f"encoder_weights={encoder_weights!r}: pretrained weights cannot be downloaded (offline). "
            "Supply a local file instead, e.g. `encoder_weights: /path/to/encoder.pth`, made on a "
            "machine with internet by building the same smp model with in_channels=1 and "
            f"encoder_weights={encoder_weights!r} and running "
            "`torch.save(smp_model.encoder.state_dict(), 'encoder.pth')`; or use encoder_weights: null."
        )


def create_network(
    arch: str, encoder_name: str, encoder_depth: int, classes: int, model_kwargs: dict[str, Any] | None
) -> nn.Module:
    """The smp network for 1-channel frames, randomly initialised, its unused parameters frozen
    (:func:`freeze_unused_parameters`); JTMLError when smp cannot build it."""
    model_kwargs = dict(model_kwargs or {})
    if arch.lower() == "fpn" and encoder_depth < 5:
        # smp's FPN decodes the last 4 feature maps and upsamples ×4, which is only right for depth 5.
        model_kwargs.setdefault("upsampling", 2 ** (encoder_depth - 3))
    try:
        net = smp.create_model(
            arch,
            encoder_name=encoder_name,
            encoder_weights=None,  # never download; local weights are applied by the module
            in_channels=1,
            classes=classes,
            encoder_depth=encoder_depth,
            **model_kwargs,
        )
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        raise JTMLError(f"cannot build {arch} with encoder {encoder_name!r}: {e}") from None
    freeze_unused_parameters(net, in_channels=1, size=2 ** max(encoder_depth, 5) * 2)
    return net


def load_encoder_state_dict(encoder: nn.Module, path: str | os.PathLike) -> None:
    """Strictly load a state dict file (.pth/.pt/.safetensors) into ``encoder``; JTMLError names the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise JTMLError("encoder weights file not found", path)
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path, device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise JTMLError(f"cannot read encoder weights ({type(e).__name__}: {e})", path) from None
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise JTMLError("encoder weights file must hold a plain state dict of tensors", path)
    try:
        encoder.load_state_dict(state, strict=True)
    except RuntimeError as e:
        detail = " ".join(str(e).split())
        if len(detail) > 600:
            detail = detail[:600] + " ..."
        raise JTMLError(
            "encoder weights do not match this encoder (save them from an smp model built with the same "
            f"encoder_name, encoder_depth and in_channels=1): {detail}",
            path,
        ) from None


def freeze_unused_parameters(net: nn.Module, in_channels: int, size: int) -> list[str]:
    """Turn off ``requires_grad`` of the parameters no output depends on, and name them.

    smp encoders at ``encoder_depth < 5`` keep their deeper stages (e.g. a ResNet's ``layer4``)
    although the forward pass never reaches them. Such parameters never get a gradient, which
    plain DDP (``strategy: ddp``) refuses as an error; frozen, DDP ignores them and checkpoints keep
    their keys. Found by one backward pass of a zero image in eval mode (no BatchNorm statistics move).
    """
    was_training = net.training
    net.eval()
    try:
        out = net(torch.zeros(1, in_channels, size, size))
        (out.float().sum() if torch.is_tensor(out) else sum(o.float().sum() for o in out)).backward()
    finally:
        net.train(was_training)
    unused = [name for name, p in net.named_parameters() if p.requires_grad and p.grad is None]
    for name, p in net.named_parameters():
        p.grad = None
        if name in unused:
            p.requires_grad_(False)
    return unused
