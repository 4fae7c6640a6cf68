"""Old module paths, and classes named by dotted path (YAML ``class_path``, checkpoints).

jtml 0.1's first layout had modules at other paths (``jtml.callbacks_pose``,
``jtml.data.datamodule``, ...). Experiment YAMLs, run directories' ``config.yaml`` and checkpoints
written then name classes by those paths, so the old paths still import — as the new modules,
with a ``FutureWarning`` that names the new path. Code compares classes, never names: a subclass
is what its base is (:func:`resolve_class`).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings
from typing import Any

# old module -> the modules that hold its public names now (searched in this order)
MOVED: dict[str, tuple[str, ...]] = {
    "jtml.callbacks_pose": ("jtml.callbacks.pose", "jtml.callbacks.system", "jtml.geometry.knee"),
    "jtml.callbacks_predict": ("jtml.callbacks.predict",),
    "jtml.cli_links": ("jtml.cli.links",),
    "jtml.commands": ("jtml.cli",),
    "jtml.commands.export": ("jtml.cli.export",),
    "jtml.commands.index": ("jtml.cli.index",),
    "jtml.commands.labels": ("jtml.cli.labels",),
    "jtml.commands.reproduce": ("jtml.cli.reproduce",),
    "jtml.commands.runs": ("jtml.cli.runs",),
    "jtml.commands.score_poses": ("jtml.cli.score_poses",),
    "jtml.commands.slurm": ("jtml.cli.slurm",),
    "jtml.commands.synth": ("jtml.cli.synth",),
    "jtml.data.datamodule": ("jtml.data.segmentation",),
    "jtml.data.datasets": ("jtml.data.segmentation",),
    "jtml.data.implants": ("jtml.sim.implants",),
    "jtml.data.study": ("jtml.io.study",),
    "jtml.data.synth": ("jtml.sim.synth", "jtml.geometry.knee"),
    "jtml.export": ("jtml.deploy.segmentation", "jtml.deploy"),
    "jtml.lightning_cli": ("jtml.cli.lightning", "jtml.runs.records"),
    "jtml.loggers": ("jtml.runs.loggers",),
    "jtml.provenance": ("jtml.runs.provenance",),
    "jtml.wandb_offline": ("jtml.runs.wandb_offline",),
}


class _OldModule(types.ModuleType):
    """An old module path: attribute look-ups go to the modules that hold the names now."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        for target in MOVED[self.__name__]:
            module = importlib.import_module(target)
            if hasattr(module, name):
                return getattr(module, name)
        raise AttributeError(
            f"module {self.__name__!r} (now {', '.join(MOVED[self.__name__])}) has no {name!r}"
        )


class _Loader(importlib.abc.Loader):
    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return _OldModule(spec.name)

    def exec_module(self, module: types.ModuleType) -> None:
        new = ", ".join(MOVED[module.__name__])
        warnings.warn(
            f"{module.__name__} moved to {new}; update the class_path/import (the old path still works)",
            FutureWarning,
            stacklevel=2,
        )
        if module.__name__ == "jtml.commands":
            module.__path__ = []  # a package, so jtml.commands.<name> imports too


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname in MOVED:
            return importlib.machinery.ModuleSpec(fullname, _Loader(), is_package=fullname == "jtml.commands")
        return None


def install() -> None:
    """Make the old module paths importable (idempotent)."""
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.append(_Finder())


def resolve_class(path: str | None) -> type | None:
    """The class a dotted ``class_path`` names (old paths included), or None when it names none."""
    module, _, name = str(path or "").rpartition(".")
    if not module:
        return None
    try:
        obj = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None
    return obj if isinstance(obj, type) else None


def is_subclass(path: str | None, base: type | tuple[type, ...]) -> bool:
    """Whether the class at ``path`` is ``base`` or a subclass of it (False for no class)."""
    cls = resolve_class(path)
    return cls is not None and issubclass(cls, base)


def same_class(a: str, b: str) -> bool:
    """Whether two class paths name one class (an old path names the class that moved)."""
    ca, cb = resolve_class(a), resolve_class(b)
    return ca is cb if ca is not None and cb is not None else a == b
