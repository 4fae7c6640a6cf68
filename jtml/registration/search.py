"""Staged derivative-free registration of one part in one frame: CMA-ES (the ``cmaes`` package).

Like JTML's staged search: a wide *trunk* stage (at a fraction of the resolution, cheap),
narrower *branch* stages, and a last stage mostly along the weakly determined out-of-plane axis
(depth) at full resolution. Each stage starts from the best pose so far and stops early when its
best cost has not improved by ``tolerance`` for ``patience`` generations. A result within 2 % of a
bound of the last stage's box hit the bound (the truth may lie outside) and says so; an earlier
stage's bound is no limit, since the next stage's box is centred on where it ended.

What a stage searches (``±range`` per coordinate) are offsets that move the silhouette in separate
ways, so that the search is well conditioned: ``x, y`` (mm) move the model's centre parallel to the
image plane, ``z`` (mm) slides it along the line of sight through it (the silhouette grows or
shrinks in place), and ``z_rot, x_rot, y_rot`` (°) turn the model about its centre, about the
camera's z (in the image plane), x and y axes. Near a pose these are the JointTrack coordinates,
without the coupling of depth with image position and of rotation with translation that searching
the pose rows directly has (the rows rotate about the model's origin, and move along z, not the ray).

A stage with ``method: outline`` is no CMA-ES but Gauss–Newton on the model's outline against the
mask's edge (:mod:`jtml.registration.contour`): sub-pixel where an overlap cost is flat, it takes
the search from a coarse stage's result to the basin's bottom, and is kept only where the search's
own cost agrees.

Every generation's candidates are rendered and scored in one batched call
(:meth:`SilhouetteTarget.evaluate`; ``batch`` splits it, which suits small CPU caches), and any
number of searches run in lockstep (:func:`search`), so a GPU sees many poses per call.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from cmaes import CMA

from jtml.errors import JTMLError
from jtml.geometry import SilhouetteRenderer, matrix_to_pose, pose_to_matrix, symmetric_twin
from jtml.geometry.render import one_cpu_thread
from jtml.registration.costs import SilhouetteTarget

__all__ = [
    "DEFAULT_STAGES",
    "OUTLIER_PX",
    "Prior",
    "RefineResult",
    "Stage",
    "TwinResult",
    "offset_poses",
    "refine",
    "refine_with_twin",
    "search",
]

Prior = Callable[[torch.Tensor], torch.Tensor]  # (N, 6) pose rows -> (N,) cost added to the image cost
OUTLIER_PX = 3.0  # a rendered boundary pixel this far (px) from the mask's boundary is an outlier


@dataclass(frozen=True)
class Stage:
    """One CMA-ES stage: the search box around its start, the render scale, the budget and when to
    stop early (``patience`` generations without an improvement of ``tolerance``; 0: never)."""

    range: tuple[float, float, float, float, float, float]
    scale: float = 1.0
    population: int = 16  # CMA-ES candidates per generation; for an outline stage, its starts (1-5)
    generations: int = 40  # CMA-ES generations; for an outline stage, its ICP rounds
    sigma: float = 0.3  # of the box's half-width
    edge_weight: float = 0.02
    patience: int = 0
    tolerance: float = 1e-4
    method: str = "cmaes"  # or "outline": Gauss-Newton on the outline (jtml.registration.contour)
    prior: bool = True  # add the search's prior (the knee's, for a tibia) to this stage's cost

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
        if stage.method not in ("cmaes", "outline"):
            raise JTMLError(f"stage method must be cmaes or outline, got {stage.method!r}: {spec}")
        if not isinstance(stage.prior, bool):
            raise JTMLError(f"stage prior must be true or false, got {spec}")
        if stage.method == "outline" and stage.scale != 1.0:
            raise JTMLError(f"an outline stage runs at full resolution (scale 1), got {spec}")
        if stage.population < 2 or stage.generations < 1 or stage.sigma <= 0 or stage.patience < 0:
            raise JTMLError(
                f"stage needs population >= 2, generations >= 1, sigma > 0, patience >= 0: {spec}"
            )
        return stage

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "range": list(self.range)}


DEFAULT_STAGES = (
    Stage(range=(10.0, 10.0, 40.0, 15.0, 15.0, 15.0), scale=0.5, population=16, generations=30),
    Stage(range=(3.0, 3.0, 12.0, 5.0, 5.0, 5.0), scale=0.5, population=12, generations=25, patience=6),
    # the basin's bottom, sub-pixel: outline fits from the coarse result and from it turned ±2.1°
    # about the camera's x and y axes (the turns a silhouette shows least)
    Stage(
        range=(1.0, 1.0, 15.0, 3.0, 3.0, 3.0),
        population=5,
        generations=8,
        sigma=0.7,
        edge_weight=0.05,
        method="outline",
    ),  # fmt: skip
    Stage(
        range=(0.5, 0.5, 6.0, 1.0, 1.0, 1.0),
        population=12,
        generations=25,
        edge_weight=0.05,
        patience=8,
        tolerance=1e-5,
    ),
)


@dataclass
class RefineResult:
    pose: np.ndarray  # (6,)
    cost: float  # image cost at full resolution (the last stage's edge weight), without the prior
    iou: float
    evaluations: int
    seconds: float
    hit_bounds: bool
    history: list[float] = field(default_factory=list)  # best cost (with the prior) after each stage
    generations: int = 0  # CMA-ES iterations, all stages
    prior: float = 0.0  # the prior's cost at the result
    outliers: float = 0.0  # fraction of the rendered boundary > OUTLIER_PX from the mask's
    stage_seconds: list[float] = field(default_factory=list)


class _Search:
    """One search's state between generations."""

    def __init__(self, start: np.ndarray) -> None:
        start = np.asarray(start, dtype=np.float64)
        if start.shape != (6,) or not np.isfinite(start).all():
            raise JTMLError(f"a start pose needs 6 finite numbers, got {start.tolist()}")
        self.best = start.copy()
        self.evaluations = self.generations = 0
        self.hit = False
        self.history: list[float] = []


def _rotation_vectors(w: torch.Tensor) -> torch.Tensor:
    """Rotation vectors ``(N, 3)`` (radians) → matrices ``(N, 3, 3)`` (Rodrigues; differentiable,
    also at 0)."""
    theta = torch.sqrt((w * w).sum(dim=1, keepdim=True) + 1e-30)
    k = w / theta
    zero = torch.zeros_like(k[:, 0])
    K = torch.stack([zero, -k[:, 2], k[:, 1], k[:, 2], zero, -k[:, 0], -k[:, 1], k[:, 0], zero], dim=1).view(
        -1, 3, 3
    )
    s, c = torch.sin(theta)[:, :, None], torch.cos(theta)[:, :, None]
    return torch.eye(3, dtype=w.dtype, device=w.device) + s * K + (1 - c) * (K @ K)


def offset_transforms(centre: np.ndarray, offsets: torch.Tensor, pivot: np.ndarray) -> torch.Tensor:
    """Model-to-camera transforms ``(N, 4, 4)`` at search ``offsets`` ``(N, 6)`` (a float64 tensor;
    differentiable in it) from the pose row ``centre``, turning about ``pivot``: :func:`offset_poses`."""
    T0 = pose_to_matrix(torch.as_tensor(centre, dtype=torch.float64, device=offsets.device))
    off = offsets.reshape(-1, 6)
    p = torch.as_tensor(pivot, dtype=torch.float64, device=offsets.device)
    c = T0[:3, :3] @ p + T0[:3, 3]  # the centre in the camera
    shifted = c + torch.nn.functional.pad(off[:, :2], (0, 1))
    moved = shifted * ((shifted[:, 2:] + off[:, 2:3]) / shifted[:, 2:])  # along the line of sight
    w = torch.deg2rad(off[:, [4, 5, 3]])  # about the camera's x, y, z
    R = _rotation_vectors(w) @ T0[:3, :3]
    top = torch.cat([R, (moved - (R @ p))[:, :, None]], dim=2)
    bottom = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64, device=offsets.device).expand(
        len(off), 1, 4
    )
    return torch.cat([top, bottom], dim=1)


def offset_poses(centre: np.ndarray, offsets: np.ndarray, pivot: np.ndarray) -> np.ndarray:
    """Pose rows ``(N, 6)`` at search ``offsets`` ``(N, 6)`` (module docstring: ``x, y, z`` mm,
    ``z_rot, x_rot, y_rot`` °) from the pose row ``centre``; ``pivot``: the model's centre (model
    coordinates), what the offsets move and turn about."""
    off = torch.as_tensor(np.asarray(offsets), dtype=torch.float64).reshape(-1, 6)
    return matrix_to_pose(offset_transforms(centre, off, pivot)).numpy()


def _scaled(
    renderer: SilhouetteRenderer, target: SilhouetteTarget, scale: float
) -> tuple[SilhouetteRenderer, SilhouetteTarget]:
    """The renderer and target at ``scale`` × the frame's resolution (the same field of view)."""
    if scale == 1.0:
        return renderer, target
    cam = renderer.camera
    w, h = max(8, round(cam.width * scale)), max(8, round(cam.height * scale))
    return renderer.with_camera(cam.scaled(w, h)), target.at_size(w, h)


def _score(
    renderer: SilhouetteRenderer,
    target: SilhouetteTarget,
    poses: np.ndarray,
    edge_weight: float,
    prior: Prior | None,
    batch: int | None,
) -> np.ndarray:
    """Image cost (+ prior) of pose rows, rendered ``batch`` at a time (None: one at a time on a CPU,
    whose caches favour small calls, and all at once on a GPU)."""
    step = int(batch) if batch else (1 if renderer.device.type == "cpu" else len(poses))
    all_poses = torch.as_tensor(poses, device=renderer.device)
    costs = [
        target.evaluate(renderer, all_poses[i : i + step], edge_weight)["cost"]
        for i in range(0, len(poses), max(step, 1))
    ]
    if not costs:
        return np.zeros(0)
    cost = torch.cat(costs)
    if prior is not None:  # one call for the whole generation
        cost = cost + prior(all_poses)
    return cost.cpu().numpy()


def search(
    renderer: SilhouetteRenderer,
    target: SilhouetteTarget,
    starts: Sequence[np.ndarray],
    stages: Sequence[Stage] = DEFAULT_STAGES,
    seed: int = 0,
    prior: Prior | None = None,
    batch: int | None = None,
) -> list[RefineResult]:
    """Independent staged searches from each of ``starts``, run in lockstep: every generation's
    candidates of every search are scored together (one batched render call, split by ``batch``)."""
    with one_cpu_thread(renderer.device):
        return _search(renderer, target, starts, stages, seed, prior, batch)


def _search(
    renderer: SilhouetteRenderer,
    target: SilhouetteTarget,
    starts: Sequence[np.ndarray],
    stages: Sequence[Stage],
    seed: int,
    prior: Prior | None,
    batch: int | None,
) -> list[RefineResult]:
    t0 = time.perf_counter()
    runs = [_Search(s) for s in starts]
    if not stages:
        raise JTMLError("registration needs at least one stage")
    v = renderer.vertices
    pivot = ((v.min(dim=0).values + v.max(dim=0).values) / 2).cpu().numpy()
    stage_seconds: list[float] = []
    for k, stage in enumerate(stages):
        ts = time.perf_counter()
        stage_prior = prior if stage.prior else None
        if stage.method == "outline":
            _outline_stage(renderer, target, runs, stage, pivot, stage_prior, batch)
            stage_seconds.append((time.perf_counter() - ts) / len(runs))
            continue
        r, t = _scaled(renderer, target, stage.scale)
        half = np.asarray(stage.range)
        centres = np.stack([run.best for run in runs])
        # only the faces that a pose in this stage's box can turn to the source (the same pixels)
        r = r.near(centres, float(np.linalg.norm(half[3:])), float(np.linalg.norm(half[:3])))
        # the start of the stage, judged at its resolution: a stage never ends worse than it began
        best = _score(r, t, centres, stage.edge_weight, stage_prior, batch)
        best_x = np.zeros((len(runs), 6))
        stale = np.zeros(len(runs), dtype=int)
        opts = [
            CMA(
                mean=np.zeros(6),
                sigma=stage.sigma,
                bounds=np.tile([-1.0, 1.0], (6, 1)),
                population_size=stage.population,
                seed=seed + k,
            )
            for _ in runs
        ]
        active = list(range(len(runs)))
        for run in runs:
            run.evaluations += 1
        for _ in range(stage.generations):
            if not active:
                break
            xs = {i: np.stack([opts[i].ask() for _ in range(opts[i].population_size)]) for i in active}
            poses = np.concatenate([offset_poses(centres[i], xs[i] * half, pivot) for i in active])
            costs = _score(r, t, poses, stage.edge_weight, stage_prior, batch)
            still = []
            for j, i in enumerate(active):
                c = costs[j * stage.population : (j + 1) * stage.population]
                opts[i].tell(list(zip(xs[i], c, strict=True)))
                runs[i].evaluations += len(c)
                runs[i].generations += 1
                m = int(np.argmin(c))
                improved = c[m] < best[i] - stage.tolerance
                if c[m] < best[i]:
                    best[i], best_x[i] = float(c[m]), xs[i][m]
                stale[i] = 0 if improved else stale[i] + 1
                if not (opts[i].should_stop() or (stage.patience and stale[i] >= stage.patience)):
                    still.append(i)
            active = still
        for i, run in enumerate(runs):
            run.best = offset_poses(centres[i], best_x[i][None] * half, pivot)[0]
            run.hit = bool((np.abs(best_x[i]) > 0.98).any())  # the last stage's says it
            run.history.append(float(best[i]))
        stage_seconds.append((time.perf_counter() - ts) / len(runs))
    edge_weight = stages[-1].edge_weight
    final = target.evaluate(
        renderer,
        torch.as_tensor(np.stack([run.best for run in runs]), device=renderer.device),
        edge_weight,
        OUTLIER_PX,
    )
    priors = (
        prior(torch.as_tensor(np.stack([run.best for run in runs]), device=renderer.device)).cpu().numpy()
        if prior is not None
        else np.zeros(len(runs))
    )
    seconds = (time.perf_counter() - t0) / len(runs)
    return [
        RefineResult(
            pose=run.best,
            cost=float(final["cost"][i]),
            iou=float(final["iou"][i]),
            evaluations=run.evaluations + 1,
            seconds=seconds,
            hit_bounds=run.hit,
            history=run.history,
            generations=run.generations,
            prior=float(priors[i]),
            outliers=float(final["outliers"][i]),
            stage_seconds=stage_seconds,
        )
        for i, run in enumerate(runs)
    ]


def _outline_starts(stage: Stage) -> np.ndarray:
    """An outline stage's start offsets ``(K, 6)``: the stage's start, then turns of ``± sigma ·
    range`` about the camera's x and y axes (the out-of-plane turns a silhouette shows least), as
    many as ``population`` allows — the fit finds the nearest optimum of the outline, and a coarse
    stage can leave the model a couple of degrees out of plane."""
    turns = [np.zeros(6)]
    for axis in (4, 5):
        for sign in (1.0, -1.0):
            d = np.zeros(6)
            d[axis] = sign * stage.sigma * stage.range[axis]
            turns.append(d)
    return np.stack(turns[: max(1, min(stage.population, len(turns)))])


def _outline_stage(
    renderer: SilhouetteRenderer,
    target: SilhouetteTarget,
    runs: list[_Search],
    stage: Stage,
    pivot: np.ndarray,
    prior: Prior | None,
    batch: int | None,
) -> None:
    """An outline stage (:func:`jtml.registration.contour.fit_outline`) for each search, from each of
    :func:`_outline_starts`: the lowest of the search's own cost (with the prior) is kept, and only
    when it is not worse than the stage's start."""
    from jtml.registration.contour import fit_outline

    half = np.asarray(stage.range)
    for run in runs:
        poses, hits = [run.best], [False]
        for offset in _outline_starts(stage):
            start = offset_poses(run.best, offset[None], pivot)[0]
            fit = fit_outline(renderer, target, start, pivot, half, stage.generations)
            poses.append(offset_poses(start, fit.offsets[None], pivot)[0])
            hits.append(fit.hit_bounds)
            run.evaluations += fit.renders
            run.generations += fit.iterations
        costs = _score(renderer, target, np.stack(poses), stage.edge_weight, prior, batch)
        run.evaluations += len(poses)
        k = int(np.argmin(costs))  # the first of equals: the start, unless a fit is better
        run.best, run.hit = poses[k], hits[k]
        run.history.append(float(costs[k]))


def refine(
    renderer: SilhouetteRenderer,
    target: SilhouetteTarget,
    start: np.ndarray,
    stages: Sequence[Stage] = DEFAULT_STAGES,
    seed: int = 0,
    prior: Prior | None = None,
    batch: int | None = None,
) -> RefineResult:
    """The pose (near ``start``) whose silhouette best matches ``target``, stage by stage."""
    return search(renderer, target, [start], stages, seed, prior, batch)[0]


@dataclass
class TwinResult:
    """A pose refined from the start and from its symmetric twin: the better one, and how sure."""

    best: RefineResult
    other: RefineResult
    chose_twin: bool
    ambiguity: float  # best cost / other cost: near 1, the silhouette cannot tell them apart
    review: bool  # doubtful: low IoU, ambiguous twin, or a search bound was hit
    seconds: float = 0.0  # both searches


def refine_with_twin(
    renderer: SilhouetteRenderer,
    target: SilhouetteTarget,
    start: np.ndarray,
    stages: Sequence[Stage] = DEFAULT_STAGES,
    seed: int = 0,
    min_iou: float = 0.98,
    ambiguous: float = 0.8,
    prior: Prior | None = None,
    batch: int | None = None,
    twin_skip: int = 1,
    decisive: float = 1.25,
) -> TwinResult:
    """The symmetric trap handled inside the search: refine ``start``, then the symmetric twin
    (:func:`jtml.geometry.symmetric_twin`) of the result through all but the first ``twin_skip``
    stages (the twin of the best pose in one basin lies near the best of the other), and keep the
    lower cost (with the prior). The twin's search stops after a stage whose cost is ``decisive``
    times the start's at that stage or more: it cannot win (an asymmetric part's twin), and its
    last stage would only polish it. ``review`` when the kept pose's IoU is below ``min_iou``, the
    two costs are within ``ambiguous`` of each other, or a bound was hit."""
    t0 = time.perf_counter()
    start = np.asarray(start, dtype=np.float64)
    own = refine(renderer, target, start, stages, seed, prior, batch)
    skip = min(twin_skip, len(stages) - 1)
    pose = symmetric_twin(own.pose[None]).numpy()[0]
    parts: list[RefineResult] = []
    for k, stage in enumerate(stages[skip:], start=skip):
        parts.append(refine(renderer, target, pose, [stage], seed + k, prior, batch))
        pose = parts[-1].pose
        if k < len(stages) - 1 and parts[-1].history[-1] >= decisive * own.history[k]:
            break
    twin = _chained(parts)
    chose_twin = twin.cost + twin.prior < own.cost + own.prior
    best, other = (twin, own) if chose_twin else (own, twin)
    total = other.cost + other.prior
    ratio = (best.cost + best.prior) / total if total > 0 else 1.0
    review = best.iou < min_iou or ratio > ambiguous or best.hit_bounds
    return TwinResult(best, other, bool(chose_twin), float(ratio), bool(review), time.perf_counter() - t0)


def _chained(parts: list[RefineResult]) -> RefineResult:
    """One result of searches run one stage after the other (each from the previous one's pose)."""
    last = parts[-1]
    return RefineResult(
        pose=last.pose,
        cost=last.cost,
        iou=last.iou,
        evaluations=sum(p.evaluations for p in parts),
        seconds=sum(p.seconds for p in parts),
        hit_bounds=last.hit_bounds,
        history=[h for p in parts for h in p.history],
        generations=sum(p.generations for p in parts),
        prior=last.prior,
        outliers=last.outliers,
        stage_seconds=[t for p in parts for t in p.stage_seconds],
    )
