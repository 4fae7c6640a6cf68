"""Learning-rate schedules whose length follows the trainer's run.

A schedule length copied into an experiment YAML (OneCycleLR's ``total_steps``, CosineAnnealingLR's
``T_max``) drifts from the run as soon as ``--trainer.max_epochs`` or the data size changes: a shorter
run stops half-way through the schedule (near the peak LR, for OneCycleLR), a longer one crashes when
OneCycleLR runs out of steps, or restarts the cosine. So the YAMLs leave the length out and
:func:`scheduler_config` sets it from the trainer when the optimizers are configured: the optimizer
steps of the run (``trainer.estimated_stepping_batches``) for a schedule stepped per batch, its
``max_epochs`` for one stepped per epoch. A length the YAML does set is kept, but one shorter than the
run is refused there, before the first training step; so is resuming (``fit --ckpt_path``) a
checkpoint whose schedule is shorter than the resumed run (:func:`check_restored_lengths`).
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import OneCycleLR

from jtml.errors import JTMLError

__all__ = ["RUN_LENGTH_KEYS", "CosineAnnealingLR", "check_restored_lengths", "run_length", "scheduler_config"]

Interval = Literal["epoch", "step"]


class CosineAnnealingLR(torch.optim.lr_scheduler.CosineAnnealingLR):
    """torch's CosineAnnealingLR with ``T_max`` optional: left out, a jtml module sets it to the run's
    length (torch's class makes ``T_max`` a required argument, so a YAML could not leave it out)."""

    def __init__(
        self, optimizer: Optimizer, T_max: int | None = None, eta_min: float = 0.0, last_epoch: int = -1
    ) -> None:
        if T_max is None:
            raise JTMLError(
                "CosineAnnealingLR without T_max: a jtml module's configure_optimizers sets it from the "
                "trainer; elsewhere give T_max"
            )
        super().__init__(optimizer, T_max=T_max, eta_min=eta_min, last_epoch=last_epoch)


# Scheduler class -> the argument that is its length (in units of its interval).
RUN_LENGTH_KEYS: dict[type, str] = {
    OneCycleLR: "total_steps",
    torch.optim.lr_scheduler.CosineAnnealingLR: "T_max",
}


def _scheduler_class(scheduler_fn: Any) -> tuple[type | None, dict[str, Any]]:
    """The class a scheduler callable builds and the keyword arguments it already binds.

    jsonargparse builds a ``class_path`` callable as ``partial(<instantiator>, ..., cls, **init_args)``
    (every argument, defaults included); Python callers pass ``partial(cls, ...)`` or the class itself.
    """
    if isinstance(scheduler_fn, functools.partial):
        cls = next((a for a in (scheduler_fn.func, *scheduler_fn.args) if inspect.isclass(a)), None)
        return cls, dict(scheduler_fn.keywords) if cls is not None else {}
    return (scheduler_fn, {}) if inspect.isclass(scheduler_fn) else (None, {})


def _length_key(cls: type | None) -> str | None:
    return next((key for base, key in RUN_LENGTH_KEYS.items() if cls and issubclass(cls, base)), None)


def _length_given(cls: type, kwargs: dict[str, Any], key: str) -> bool:
    if kwargs.get(key) is not None:
        return True
    # OneCycleLR's other way to give its length
    return issubclass(cls, OneCycleLR) and None not in (kwargs.get("epochs"), kwargs.get("steps_per_epoch"))


def run_length(trainer: pl.Trainer, interval: Interval) -> int | None:
    """Optimizer steps (``interval: step``) or epochs (``epoch``) the trainer's fit runs for; None
    when the run has no fixed length (no max_epochs/max_steps, or an iterable dataset without max_steps)."""
    if interval == "step":
        steps = trainer.estimated_stepping_batches
        return int(steps) if math.isfinite(steps) and steps > 0 else None
    epochs = trainer.max_epochs
    return int(epochs) if epochs is not None and epochs > 0 else None


def scheduler_config(
    scheduler_fn: Any,
    optimizer: Optimizer,
    trainer: pl.Trainer | None,
    interval: Interval | None = None,
    monitor: str | None = None,
) -> dict[str, Any]:
    """Build the scheduler from its LightningCLI callable and return Lightning's ``lr_scheduler`` dict.

    ``interval`` defaults to the schedule's own: ``step`` for OneCycleLR (its length is in optimizer
    steps), ``epoch`` for the others. The length argument of a schedule in :data:`RUN_LENGTH_KEYS`, when
    not given, is the run's length in that interval (``trainer`` must then be attached to a fit); a
    given one shorter than the run raises :class:`JTMLError` naming the key. ``monitor`` is added for
    ReduceLROnPlateau.
    """
    cls, kwargs = _scheduler_class(scheduler_fn)
    if interval is None:
        interval = "step" if cls is not None and issubclass(cls, OneCycleLR) else "epoch"
    key = _length_key(cls)
    name = cls.__name__ if cls is not None else "lr_scheduler"
    yaml_key = f"model.init_args.lr_scheduler.init_args.{key}"
    unit = "optimizer steps" if interval == "step" else "epochs"
    run = run_length(trainer, interval) if trainer is not None and key is not None else None
    overrides: dict[str, Any] = {}
    if key is not None and cls is not None and not _length_given(cls, kwargs, key):
        if run is None:
            why = "no trainer is attached" if trainer is None else "the trainer's run has no fixed length"
            raise JTMLError(
                f"{name} needs its length ({yaml_key}) and it cannot follow the trainer: {why} "
                f"(set trainer.max_epochs{' or max_steps' if interval == 'step' else ''}, or {key})"
            )
        overrides[key] = run
    try:
        scheduler = scheduler_fn(optimizer, **overrides)
    except ZeroDivisionError:  # torch's OneCycleLR when a phase has no width (pct_start x total_steps = 1)
        given = {k: v for k, v in {**kwargs, **overrides}.items() if k in (key, "pct_start")}
        raise JTMLError(
            f"{name} with {given} has a phase of zero steps, which torch cannot schedule (it divides by "
            "zero): change pct_start or the run's length"
        ) from None
    length = getattr(scheduler, key, None) if key is not None else None
    if length is not None and trainer is not None:
        if run is None:
            raise JTMLError(
                f"{yaml_key} is {length} but the trainer's run has no fixed length, so {name} would run "
                "out; set trainer.max_epochs (or max_steps)"
            )
        if length < run:
            raise JTMLError(
                f"{yaml_key} is {length} {unit}, shorter than this run's {run} "
                f"(trainer.max_epochs {trainer.max_epochs}): leave {key} out to follow the trainer, or "
                f"make it at least {run}"
            )
    config: dict[str, Any] = {"scheduler": scheduler, "interval": interval}
    if monitor is not None and isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        config["monitor"] = monitor
    return config


def check_restored_lengths(trainer: pl.Trainer) -> None:
    """Refuse a fit whose schedules, as restored from ``--ckpt_path``, end before the run does.

    A checkpoint carries its scheduler's state, length included, and Lightning restores it after
    :func:`scheduler_config` ran: resuming with a larger ``max_epochs`` would crash a OneCycleLR when it
    runs out of steps (or restart a cosine). For ``on_train_start``, which runs after the restore and
    before the first training step.
    """
    for config in trainer.lr_scheduler_configs:
        scheduler = config.scheduler
        key = _length_key(type(scheduler))
        length = getattr(scheduler, key, None) if key is not None else None
        run = run_length(trainer, config.interval)
        if length is not None and run is not None and length < run:
            unit = "optimizer steps" if config.interval == "step" else "epochs"
            raise JTMLError(
                f"the checkpoint's {type(scheduler).__name__} has {key} {length} (the run it was made for) "
                f"but this run takes {run} {unit}: resume with that run's trainer.max_epochs, or give "
                f"model.init_args.lr_scheduler.init_args.{key} from the start of a run to be extended",
                trainer.ckpt_path,
            )
