"""Settings the model takes from the data, linked at parse time so the two cannot disagree, and
data settings that follow a checkpoint (``--ckpt_path``).

The data decides which parts there are, what the network sees (``input``) and the ROI it is cut to
(``roi_size``, ``roi_margin``); a model trained on anything else is wrong. Written under both ``model``
and ``data`` in an experiment, one copy drifts from the other. :func:`add_links` makes
``data.init_args.<key>`` the one place for them: ``model.init_args.<key>`` gets its value by a
jsonargparse link (so ``--print_config`` and the run's ``config.yaml`` show it once, under ``data``).

A key the model or the data class does not have is left alone (a segmentation model has no ROI; a
DataModule without ``parts`` leaves the model's own). A model value in the config that contradicts the
data's is refused with the two keys named; one that agrees, or is the model class's default (what
jsonargparse fills in when the config gives none), is taken as the data's, so older configs that
repeated the value under ``model`` still load. With ``--ckpt_path`` the model is the checkpoint's:
:func:`check_checkpoint` refuses data whose settings differ from the trained model's, naming the
checkpoint, before LightningCLI parses the checkpoint's hyper-parameters into the model config.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from jsonargparse import Namespace

from jtml._moved import resolve_class, same_class
from jtml.errors import JTMLError

__all__ = [
    "LINKED_KEYS",
    "MODEL_DATA_KEYS",
    "add_links",
    "check_checkpoint",
    "class_path",
    "follow_checkpoint_data",
    "given",
]

LINKED_KEYS = ("parts", "input", "roi_size", "roi_margin")


def class_path(node: Any) -> str:
    """The ``class_path`` of a config node (``""`` when it names none)."""
    return str(getattr(node, "class_path", "") or "") if isinstance(node, Namespace) else ""


def _class_default(class_path: str, key: str) -> Any:
    """``key``'s default in the signature of the class at ``class_path`` (``inspect.Parameter.empty``
    when it has none or the class cannot be found)."""
    cls = resolve_class(class_path)
    try:
        param = inspect.signature(cls).parameters.get(key) if cls is not None else None
    except (ValueError, TypeError):
        return inspect.Parameter.empty
    return param.default if param is not None else inspect.Parameter.empty


def _from_data(key: str) -> Callable[[Any, Any, str], Any]:
    def from_data(data_value: Any, model_value: Any, model_class_path: str) -> Any:
        unset = model_value is None or model_value == _class_default(model_class_path, key)
        if not unset and model_value != data_value:
            raise ValueError(
                f"model.init_args.{key} {model_value!r} contradicts data.init_args.{key} {data_value!r}: "
                f"the model takes {key} from the data, so set it under data only"
            )
        return data_value

    from_data.__name__ = f"{key}_from_data"
    return from_data


def add_links(parser: Any) -> None:
    """Link ``data.init_args.<key>`` -> ``model.init_args.<key>`` for :data:`LINKED_KEYS` (parse time).

    For ``LightningCLI.add_arguments_to_parser`` (subclass-mode model and data). The model's own value
    is a source too, only so that a contradicting one is refused rather than silently replaced.
    """
    for key in LINKED_KEYS:
        parser.link_arguments(
            (f"data.init_args.{key}", f"model.init_args.{key}", "model.class_path"),
            f"model.init_args.{key}",
            compute_fn=_from_data(key),
            apply_on="parse",
        )


def check_checkpoint(config: Any) -> None:
    """With ``--ckpt_path``, refuse data whose linked settings differ from the checkpoint's model.

    For after the arguments are parsed and ``ckpt_path`` resolved, before LightningCLI reads the
    checkpoint's hyper-parameters into the model config: the links run again then, and the trained
    model's own ``input``, say, could otherwise be replaced by the data's unnoticed (when it is the
    model class's default). ``config`` is the sub-command's (``cli.config[subcommand]``).
    """
    ckpt_path = config.get("ckpt_path")
    path = Path(str(ckpt_path)) if ckpt_path else None
    data = config.get("data")
    init = data.get("init_args") if data is not None else None
    if path is None or not path.is_file() or init is None:
        return  # also best/hpc/URLs: LightningCLI reads no hyper-parameters from those
    try:
        trained = torch.load(path, map_location="cpu", weights_only=True).get("hyper_parameters") or {}
    except Exception:  # unreadable: LightningCLI's own load reports it
        return
    for key in LINKED_KEYS:
        if key in trained and key in init and init[key] != trained[key]:
            raise JTMLError(
                f"the checkpoint's model has {key} {trained[key]!r} but data.init_args.{key} is "
                f"{init[key]!r}: give the data the checkpoint's {key} (--data.init_args.{key})",
                path,
            )


MODEL_DATA_KEYS = ("parts", "input", "image_size", "resize_mode", "normalize", "mean", "std", "invert",
                   "roi_size", "roi_margin", "side")  # fmt: skip


def given(argv: list[str], key: str) -> bool:
    """Whether ``--data.init_args.<key>`` (or ``--data.<key>``) is on the command line."""
    names = (f"--data.init_args.{key}", f"--data.{key}")
    return any(a.split("=", 1)[0] in names for a in argv)


def follow_checkpoint_data(cfg: Namespace, argv: list[str]) -> None:
    """With ``--ckpt_path FILE``: the data settings the model was trained with (``MODEL_DATA_KEYS``,
    from the checkpoint's DataModule hyper-parameters) replace the YAML's, so a checkpoint trained
    at 128 px is not silently evaluated at 512; the same key given on the command line with
    another value is an error."""
    ckpt_path, data = cfg.get("ckpt_path"), cfg.get("data")
    if not ckpt_path or not Path(str(ckpt_path)).is_file() or not class_path(data):
        return
    ckpt = torch.load(str(ckpt_path), map_location="cpu", weights_only=False, mmap=True)
    trained = ckpt.get("datamodule_hyper_parameters") if isinstance(ckpt, dict) else None
    if not isinstance(trained, dict) or not same_class(
        trained.get("_class_path", class_path(data)), class_path(data)
    ):
        return
    args = data.init_args
    for key in MODEL_DATA_KEYS:
        if key not in trained or key not in args:
            continue
        was, now = trained[key], args[key]
        if _same_value(was, now):
            continue
        if given(argv, key):
            raise JTMLError(
                f"--data.init_args.{key} {now!r} contradicts the checkpoint's {key} {was!r} (the model "
                "was trained with it); leave it out to use the checkpoint's",
                ckpt_path,
            )
        print(f"jtml: data {key} {was!r} from the checkpoint (the config says {now!r})", file=sys.stderr)
        args[key] = list(was) if isinstance(was, (list, tuple)) else was


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    return a == b
