"""LightningModules: segmentation and pose networks."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["loadable_hparams"]


def loadable_hparams(checkpoint: dict[str, Any], key: str) -> None:
    """Drop Python classes/partials (e.g. the default ``torch.optim.Adam``) from the checkpoint's
    ``optimizer``/``lr_scheduler`` hyper-parameters, in place: they make it unloadable with
    ``torch.load(weights_only=True)`` and only matter for training. LightningCLI stores them as plain
    ``{class_path, init_args}`` dicts, which are kept."""
    hp = checkpoint.get(key)
    if isinstance(hp, Mapping):
        checkpoint[key] = {
            k: v
            for k, v in hp.items()
            if k not in ("optimizer", "lr_scheduler") or v is None or isinstance(v, (dict, str))
        }
