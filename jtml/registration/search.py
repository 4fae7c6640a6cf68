"""Staged derivative-free registration of one part in one frame: CMA-ES (the ``cmaes`` package).

Like JTML's staged search: a wide *trunk* stage (at half resolution, cheap), narrower *branch*
stages at full resolution, and a last stage mostly along the weakly determined out-of-plane axis
(``z``). Each stage searches offsets from its start, ``±range`` per coordinate
``(x, y, z mm, z_rot, x_rot, y_rot °)``, and starts from the best pose so far. A result that
ends within 2 % of a bound of its stage hit the bound (the truth may lie outside) and says so.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
from cmaes import CMA

from jtml.errors import JTMLError
from jtml.geometry import SilhouetteRenderer, symmetric_twin
from jtml.registration.costs import SilhouetteTarget

__all__ = ["DEFAULT_STAGES", "RefineResult", "Stage", "TwinResult", "refine", "refine_with_twin"]


@dataclass(frozen=True)
class Stage:
    """One CMA-ES stage: the search box around its start, the render scale and the budget."""

    range: tuple[float, float, float, float, float, float]
    scale: float = 1.0
    population: int = 16
    generations: int = 40
    sigma: float = 0.3  # of the box's half-width
    edge_weight: float = 0.02

    @classmethod
    def from_dict(cls, spec: dict[str, Any]) -> Stage:
        try:
            stage = cls(**{**spec, "range": tuple(float(v) for v in spec["range"])})
        except (TypeError, KeyError, ValueError) as e:
            raise JTMLError(
                f"a registration stage needs range: [6 numbers] and known keys, got {spec}: {e}"
            ) from None
        if len(stage.range) != 6 or min(stage.range) <= 0 or not 0 < stage.scale <= 1:
            raise JTMLError(f"stage range must be 6 positive numbers and 0 < scale <= 1, got {spec}")
        return stage


DEFAULT_STAGES = (
    Stage(range=(10.0, 10.0, 40.0, 15.0, 15.0, 15.0), scale=0.5, population=24, generations=40),
    Stage(range=(3.0, 3.0, 12.0, 5.0, 5.0, 5.0), population=16, generations=40),
    Stage(range=(0.5, 0.5, 6.0, 1.0, 1.0, 1.0), population=12, generations=30, edge_weight=0.05),
)


@dataclass
class RefineResult:
    pose: np.ndarray  # (6,)
    cost: float
    iou: float
    evaluations: int
    seconds: float
    hit_bounds: bool
    history: list[float] = field(default_factory=list)  # best cost after each stage


def _scaled(
    renderer: SilhouetteRenderer, target: SilhouetteTarget, scale: float
) -> tuple[SilhouetteRenderer, SilhouetteTarget]:
    """The renderer and target at ``scale`` × the frame's resolution (the same field of view)."""
    if scale == 1.0:
        return renderer, target
    cam = renderer.camera
    w, h = max(8, round(cam.width * scale)), max(8, round(cam.height * scale))
    small = renderer.with_camera(cam.scaled(w, h))
    mask = cv2.resize(target.mask.astype(np.float32), (w, h), interpolation=cv2.INTER_AREA) > 0.5
    return small, SilhouetteTarget.from_mask(mask)


def refine(
    renderer: SilhouetteRenderer,
    target: SilhouetteTarget,
    start: np.ndarray,
    stages: tuple[Stage, ...] = DEFAULT_STAGES,
    seed: int = 0,
) -> RefineResult:
    """The pose (near ``start``) whose silhouette best matches ``target``, stage by stage."""
    t0 = time.perf_counter()
    best = np.asarray(start, dtype=np.float64).copy()
    if best.shape != (6,) or not np.isfinite(best).all():
        raise JTMLError(f"a start pose needs 6 finite numbers, got {best.tolist()}")
    evaluations, hit, history = 0, False, []
    for k, stage in enumerate(stages):
        r, t = _scaled(renderer, target, stage.scale)
        half = np.asarray(stage.range)
        centre = best.copy()
        # the start of the stage, judged at its resolution: a stage never ends worse than it began
        stage_best, stage_x = float(t.costs(r, centre[None], stage.edge_weight)["cost"][0]), np.zeros(6)
        opt = CMA(
            mean=np.zeros(6),
            sigma=stage.sigma,
            bounds=np.tile([-1.0, 1.0], (6, 1)),
            population_size=stage.population,
            seed=seed + k,
        )
        for _ in range(stage.generations):
            xs = np.stack([opt.ask() for _ in range(opt.population_size)])
            costs = t.costs(r, centre + xs * half, stage.edge_weight)["cost"]
            evaluations += len(xs)
            opt.tell(list(zip(xs, costs, strict=True)))
            i = int(np.argmin(costs))
            if costs[i] < stage_best:
                stage_best, stage_x = float(costs[i]), xs[i]
            if opt.should_stop():
                break
        best = centre + stage_x * half
        hit |= bool((np.abs(stage_x) > 0.98).any())
        history.append(stage_best)
    final = target.costs(renderer, best[None], stages[-1].edge_weight if stages else 0.02)
    best_cost = float(final["cost"][0])
    return RefineResult(
        pose=best,
        cost=best_cost,
        iou=float(final["iou"][0]),
        evaluations=evaluations,
        seconds=time.perf_counter() - t0,
        hit_bounds=hit,
        history=history,
    )


@dataclass
class TwinResult:
    """A pose refined from the start and from its symmetric twin: the better one, and how sure."""

    best: RefineResult
    other: RefineResult
    chose_twin: bool
    ambiguity: float  # best cost / other cost: near 1, the silhouette cannot tell them apart
    review: bool  # doubtful: low IoU, ambiguous twin, or a search bound was hit


def refine_with_twin(
    renderer: SilhouetteRenderer,
    target: SilhouetteTarget,
    start: np.ndarray,
    stages: tuple[Stage, ...] = DEFAULT_STAGES,
    seed: int = 0,
    min_iou: float = 0.98,
    ambiguous: float = 0.8,
) -> TwinResult:
    """The symmetric trap handled inside the search: refine ``start`` and its twin
    (:func:`jtml.geometry.symmetric_twin`), keep the lower cost. ``review`` when the kept pose's IoU is
    below ``min_iou``, the two costs are within ``ambiguous`` of each other, or a bound was hit."""
    start = np.asarray(start, dtype=np.float64)
    own = refine(renderer, target, start, stages, seed)
    twin = refine(renderer, target, symmetric_twin(start[None]).numpy()[0], stages, seed)
    chose_twin = twin.cost < own.cost
    best, other = (twin, own) if chose_twin else (own, twin)
    ratio = best.cost / other.cost if other.cost > 0 else 1.0
    review = best.iou < min_iou or ratio > ambiguous or best.hit_bounds
    return TwinResult(best, other, bool(chose_twin), float(ratio), bool(review))
