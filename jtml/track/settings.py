"""What a track computes with: the registration stages, seeds, review thresholds and passes.

``stages``: :data:`~jtml.registration.search.DEFAULT_STAGES` by default, :data:`FAST_STAGES`
(``--fast``: fewer, smaller generations — a quick look, and the tests), or a YAML/JSON file
(``--stages FILE``): a list of :meth:`Stage.from_dict` mappings, or ``{stages: [...]}``::

    stages:
      - {range: [10, 10, 40, 15, 15, 15], scale: 0.5, population: 16, generations: 30}
      - {range: [0.5, 0.5, 6, 1, 1, 1], population: 10, generations: 25, edge_weight: 0.05}
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from jtml.errors import JTMLError
from jtml.registration.frame import RegistrationConfig
from jtml.registration.search import DEFAULT_STAGES, Stage

__all__ = ["FAST_STAGES", "TrackSettings", "load_stages"]

_REGISTRATION = RegistrationConfig()

FAST_STAGES = (
    Stage(range=(10.0, 10.0, 40.0, 15.0, 15.0, 15.0), scale=0.5, population=10, generations=12),
    Stage(range=(2.0, 2.0, 10.0, 3.0, 3.0, 3.0), population=8, generations=10),
    Stage(range=(0.5, 0.5, 4.0, 1.0, 1.0, 1.0), population=8, generations=8, edge_weight=0.05),
)


def load_stages(path: str | os.PathLike) -> tuple[Stage, ...]:
    """Registration stages from a YAML or JSON file (module docstring); JTMLError names the file."""
    path = Path(path)
    if not path.is_file():
        raise JTMLError("stages file not found", path)
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise JTMLError(f"not a YAML/JSON file: {str(e).splitlines()[0]}", path) from None
    if isinstance(spec, dict) and set(spec) == {"stages"}:
        spec = spec["stages"]
    if not isinstance(spec, list) or not spec or not all(isinstance(s, dict) for s in spec):
        raise JTMLError("expected a non-empty list of stages (mappings with range: [6 numbers], ...)", path)
    try:
        return tuple(Stage.from_dict(s) for s in spec)
    except JTMLError as e:
        raise JTMLError(e.message, path) from None


@dataclass(frozen=True)
class TrackSettings:
    """The registration settings of a track (everything a frame's result depends on besides its
    inputs). ``min_iou``/``ambiguous``: :func:`~jtml.registration.search.refine_with_twin`'s review
    thresholds; ``backward``: a second pass from the last frame to the first, each frame also
    started from the next one's result; ``seed``: frame ``i`` is searched with ``seed + i``;
    ``priors``: the tibia searched with the knee prior relative to this frame's femur
    (:func:`jtml.registration.frame.knee_prior`, its start moved to the femur-consistent depth), as
    ``jtml refine`` does; ``image``: each mask refined near its edge by the frame's intensities
    (:meth:`SilhouetteTarget.from_frame`: a segmentation network's boundary is off by pixels, which
    reads as millimetres of depth)."""

    stages: tuple[Stage, ...] = field(default=DEFAULT_STAGES)
    seed: int = 0
    min_iou: float = _REGISTRATION.min_iou  # jtml refine's thresholds: one review rule
    ambiguous: float = _REGISTRATION.ambiguous
    backward: bool = False
    priors: bool = True
    image: bool = False

    def __post_init__(self) -> None:
        if not self.stages:
            raise JTMLError("registration needs at least one stage")
        if not 0.0 <= self.min_iou <= 1.0 or not 0.0 < self.ambiguous <= 1.0:
            raise JTMLError(
                f"min_iou must be in [0, 1] and ambiguous in (0, 1], got {self.min_iou}, {self.ambiguous}"
            )
        if self.seed < 0:
            raise JTMLError(f"seed must be >= 0, got {self.seed}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (stages as plain mappings), for the journal fingerprint and ``track.json``."""
        return {
            "stages": [{**asdict(s), "range": list(s.range)} for s in self.stages],
            "seed": self.seed,
            "min_iou": self.min_iou,
            "ambiguous": self.ambiguous,
            "backward": self.backward,
            "priors": self.priors,
            "image": self.image,
        }

    def digest_text(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)
