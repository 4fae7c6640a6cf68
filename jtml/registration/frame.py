"""Registering every part of one frame: each part alone, or femur and tibia jointly with priors.

:func:`register_frame` is the API on arrays — renderers, masks and start poses in, one
:class:`PartResult` per part out — that :class:`jtml.models.registration.RegistrationModule` runs
for every frame of a study and that any other caller (a pose network's writer) can run on its own.

Joint registration (``priors: true`` and both the femur and the tibia given): the femur is
registered first; the tibia's search then adds a prior on its pose relative to the femur's result,
as the anatomy has it — its varus–valgus angle (:func:`jtml.geometry.knee.varus_valgus`) near 0,
and its origin's offset along the femur's mediolateral axis near 0: in a lateral view that axis is
close to the line of sight, so this is "similar depth" in a way that holds however the knee is
turned. The prior costs ``prior_weight · ((varus/varus_sigma)² + (offset/offset_sigma)²) / 2`` and
the tibia starts at the depth that makes its offset 0 (``prior_start``). A result that breaks the
prior (``|varus| > max_varus`` or ``|offset| > max_offset``) is flagged for review: on the tibia's
nearly mirror-symmetric silhouette, a wrong basin with a good overlap is the typical failure.

With the frame (``image: true``), each mask is first refined by the image near its boundary
(:meth:`SilhouetteTarget.from_frame`): a segmentation's mask is off by pixels, and a uniform offset
of its boundary reads as a change of depth; the implant's edge in the image does not.

The symmetric trap: the pose and its twin are both refined (``twin``) and the lower cost wins, or,
for the tibia with ``tibia_rule: varus_valgus``, JointTrack's rule (the smaller |varus–valgus|
relative to the femur). ``ambiguity`` is the cost ratio either way.

``review`` flags a doubtful result: an IoU below ``min_iou``, more than ``max_outliers`` of the
rendered boundary over 3 px from the mask's (a part of the model where the mask is not: what a wrong
basin leaves, and a segmentation's shifted or ragged edge does not), an ambiguous twin (cost ratio
above ``ambiguous``), the last stage's search bound hit, or (jointly) the tibia beyond the prior.

A part that cannot be registered in this frame — no start pose, no or an empty mask, a start pose
behind the source or whose silhouette misses the image — gets a result with ``refined`` False and
the ``reason``, never a made-up pose.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

import numpy as np
import torch

from jtml.errors import JTMLError
from jtml.geometry import SilhouetteRenderer, euler312_to_matrix, matrix_to_euler312
from jtml.registration.costs import SilhouetteTarget
from jtml.registration.search import DEFAULT_STAGES, Prior, RefineResult, Stage, refine, refine_with_twin

__all__ = [
    "PartResult",
    "RegistrationConfig",
    "along_femur_axis",
    "knee_prior",
    "register_frame",
    "tibia_relative",
    "tibia_start",
]


@dataclass(frozen=True)
class RegistrationConfig:
    """Everything about a registration that is not data: the experiment YAML's ``model`` settings."""

    stages: tuple[Stage, ...] = DEFAULT_STAGES
    twin: bool = True
    twin_skip: int = 1  # stages the twin's search skips (it starts from the twin of the result)
    twin_decisive: float = 1.25  # the twin's search stops at a stage where it costs this x the start's
    tibia_rule: Literal["cost", "varus_valgus"] = "cost"
    image: bool = False  # refine each mask's boundary by the frame's intensities (when given)
    band: float = 6.0  # ... within this many pixels of it
    priors: bool = True
    prior_start: bool = True
    femur: str = "fem"
    tibia: str = "tib"
    varus_sigma: float = 3.0  # degrees
    offset_sigma: float = 3.0  # mm
    prior_weight: float = 0.01
    min_iou: float = 0.9
    max_outliers: float = 0.05
    ambiguous: float = 0.8
    max_varus: float = 8.0
    max_offset: float = 8.0
    seed: int = 0
    batch: int | None = None  # candidate poses per render call (None: 1 on a CPU, a generation on a GPU)

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any] | None) -> RegistrationConfig:
        spec = dict(spec or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(spec) - known)
        if unknown:
            raise JTMLError(f"unknown registration setting(s) {unknown}; known: {sorted(known)}")
        if "stages" in spec:
            stages = spec["stages"]
            if not isinstance(stages, list | tuple) or not stages:
                raise JTMLError(f"registration stages must be a non-empty list, got {stages!r}")
            spec["stages"] = tuple(s if isinstance(s, Stage) else Stage.from_dict(dict(s)) for s in stages)
        config = cls(**spec)
        if config.tibia_rule not in ("cost", "varus_valgus"):
            raise JTMLError(f"tibia_rule must be cost or varus_valgus, got {config.tibia_rule!r}")
        for name in ("varus_sigma", "offset_sigma", "max_varus", "max_offset", "band", "twin_decisive"):
            if not getattr(config, name) > 0:
                raise JTMLError(f"registration setting {name} must be positive, got {getattr(config, name)}")
        if not 0 <= config.min_iou <= 1 or config.prior_weight < 0 or config.twin_skip < 0:
            raise JTMLError("registration needs 0 <= min_iou <= 1, prior_weight >= 0 and twin_skip >= 0")
        if config.batch is not None and config.batch < 1:
            raise JTMLError(f"registration batch must be >= 1 or null, got {config.batch}")
        return config

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["stages"] = [s.to_dict() for s in self.stages]
        return out


@dataclass
class PartResult:
    """One part in one frame: a row of ``report.csv``."""

    part: str
    pose: np.ndarray  # (6,), NaN when not refined
    refined: bool
    reason: str = ""
    start: np.ndarray = field(default_factory=lambda: np.full(6, np.nan))
    cost: float = math.nan
    iou: float = math.nan
    evaluations: int = 0
    iterations: int = 0
    seconds: float = 0.0
    chose_twin: bool = False
    ambiguity: float = math.nan
    hit_bounds: bool = False
    review: bool = False
    prior: float = math.nan
    outliers: float = math.nan  # fraction of the rendered boundary > 3 px from the mask's
    varus_valgus: float = math.nan  # the tibia relative to the femur (°), when both are registered
    offset: float = math.nan  # the tibia origin's mediolateral offset from the femur's (mm)

    REPORT_COLUMNS = (
        "refined", "reason", "cost", "iou", "evaluations", "iterations", "seconds", "chose_twin",
        "ambiguity", "hit_bounds", "outliers", "review", "prior", "varus_valgus", "offset",
    )  # fmt: skip

    def row(self) -> dict[str, Any]:
        """The report columns (poses are written to the pose files)."""
        return {k: getattr(self, k) for k in self.REPORT_COLUMNS}


def tibia_relative(femur: torch.Tensor, tibia: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Varus–valgus (°) and the mediolateral offset (mm) of tibia poses ``(N, 6)`` relative to a
    femur pose ``(6,)``: the ``x_rot`` of ``R_femᵀ·R_tib`` (as :func:`jtml.geometry.knee.varus_valgus`)
    and the z (mediolateral) coordinate of the tibia's origin in the femur's frame."""
    R_f = euler312_to_matrix(femur[3:])
    R_t = euler312_to_matrix(tibia[:, 3:])
    varus = matrix_to_euler312(R_f.T @ R_t)[:, 1]
    offset = ((tibia[:, :3] - femur[:3]) @ R_f)[:, 2]
    return varus, offset


def knee_prior(femur: np.ndarray, config: RegistrationConfig, device: torch.device | str = "cpu") -> Prior:
    """The tibia's prior relative to a registered femur pose (module docstring)."""
    f = torch.as_tensor(np.asarray(femur, dtype=np.float64), device=device)

    def prior(tibia: torch.Tensor) -> torch.Tensor:
        varus, offset = tibia_relative(f.to(tibia.device), tibia.to(torch.float64))
        z = (varus / config.varus_sigma) ** 2 + (offset / config.offset_sigma) ** 2
        return config.prior_weight * z / 2

    return prior


def _start_problem(renderer: SilhouetteRenderer, start: np.ndarray) -> str:
    """Why ``start`` cannot start a search in this frame ("" when it can)."""
    if start.shape != (6,) or not np.isfinite(start).all():
        return "no start pose for this frame"
    win = renderer.render_windows(torch.as_tensor(start[None], device=renderer.device))
    if not bool(win.valid[0]):
        return "the start pose puts the model at or behind the X-ray source"
    if not bool(win.masks[0].any()):
        return "the start pose's silhouette misses the image"
    return ""


def _not_refined(part: str, start: np.ndarray, reason: str) -> PartResult:
    return PartResult(part=part, pose=np.full(6, np.nan), refined=False, reason=reason, start=start)


def along_femur_axis(tibia: np.ndarray, femur: np.ndarray) -> np.ndarray:
    """The tibia start moved along the femur's mediolateral axis so that its offset is 0."""
    R_f = euler312_to_matrix(torch.as_tensor(femur[3:])).numpy()
    axis = R_f[:, 2]
    out = tibia.copy()
    out[:3] -= axis * float((tibia[:3] - femur[:3]) @ axis)
    return out


def tibia_start(
    renderer: SilhouetteRenderer,
    target: SilhouetteTarget,
    start: np.ndarray,
    femur: np.ndarray,
    edge_weight: float,
) -> np.ndarray:
    """``start`` moved to the femur-consistent depth (:func:`along_femur_axis`) when that fits the
    mask at least as well, else ``start`` as it is: a poor femur (or a start turned far off) can put
    the moved start where the tibia is not."""
    moved = along_femur_axis(start, femur)
    cost = target.costs(renderer, np.stack([start, moved]), edge_weight)["cost"]
    return moved if cost[1] <= cost[0] else start


def _problem(renderer: SilhouetteRenderer, mask: np.ndarray | None, start: np.ndarray, part: str) -> str:
    """Why this part cannot be registered in this frame ("" when it can)."""
    if mask is None:
        return "no mask for this frame"
    if mask.shape != (renderer.camera.height, renderer.camera.width):
        raise JTMLError(
            f"{part}: the mask is {mask.shape[1]}x{mask.shape[0]} but the frame's camera is "
            f"{renderer.camera.width}x{renderer.camera.height}"
        )
    if not (mask > 0).any():
        return "the mask is empty"
    return _start_problem(renderer, start)


def _search_part(
    renderer: SilhouetteRenderer,
    target: SilhouetteTarget,
    start: np.ndarray,
    config: RegistrationConfig,
    seed: int,
    prior: Prior | None,
    femur: PartResult | None,
    is_tibia: bool,
) -> tuple[RefineResult, bool, float, int, int]:
    """The search (and its twin's): ``(best, chose_twin, ambiguity, evaluations, iterations)``."""
    if not config.twin:
        best = refine(renderer, target, start, config.stages, seed, prior, config.batch)
        return best, False, math.nan, best.evaluations, best.generations
    tw = refine_with_twin(
        renderer, target, start, config.stages, seed, config.min_iou, config.ambiguous, prior, config.batch,
        config.twin_skip, config.twin_decisive,
    )  # fmt: skip
    best, other, chose_twin = tw.best, tw.other, tw.chose_twin
    if is_tibia and config.tibia_rule == "varus_valgus" and femur is not None and femur.refined:
        f = torch.as_tensor(femur.pose)
        vv = [abs(float(tibia_relative(f, torch.as_tensor(r.pose[None]))[0][0])) for r in (best, other)]
        if vv[1] < vv[0]:  # JointTrack's rule: the smaller varus-valgus wins
            best, other, chose_twin = other, best, not chose_twin
    evaluations = tw.best.evaluations + tw.other.evaluations
    return best, chose_twin, tw.ambiguity, evaluations, tw.best.generations + tw.other.generations


def register_frame(
    renderers: Mapping[str, SilhouetteRenderer],
    masks: Mapping[str, np.ndarray | None],
    starts: Mapping[str, np.ndarray],
    config: RegistrationConfig | None = None,
    seed: int | None = None,
    frame: np.ndarray | None = None,
) -> dict[str, PartResult]:
    """Register every part of ``starts`` in one frame (module docstring): ``renderers`` (each part's
    model through this frame's camera), ``masks`` (each part's silhouette, bool/uint8 ``(H, W)``;
    None: missing), ``starts`` (each part's start pose row, NaN: none), ``frame`` (the image, for
    masks refined by its edges with ``image: true``; None: the masks as they are). ``seed``
    (default the config's) makes the search repeatable: the same inputs give the same poses."""
    config = config or RegistrationConfig()
    seed = config.seed if seed is None else int(seed)
    order = sorted(starts, key=lambda p: (p != config.femur, p != config.tibia, p))
    results: dict[str, PartResult] = {}
    for part in order:
        if part not in renderers:
            raise JTMLError(f"no model for part {part!r} (have {sorted(renderers)})")
        renderer = renderers[part]
        start = np.asarray(starts[part], dtype=np.float64).reshape(-1)
        mask = masks.get(part)
        mask = None if mask is None else np.asarray(mask)
        reason = _problem(renderer, mask, start, part)
        if reason:
            results[part] = _not_refined(part, start, reason)
            continue
        assert mask is not None
        t0 = time.perf_counter()
        if frame is not None and config.image:
            others = [np.asarray(m) > 0 for q, m in masks.items() if q != part and m is not None]
            other = np.logical_or.reduce(others) if others else None
            target = SilhouetteTarget.from_frame(frame, mask, other, config.band, renderer.device)
        else:
            target = SilhouetteTarget.from_mask(mask, renderer.device)
        femur = results.get(config.femur)
        is_tibia = part == config.tibia
        beside_femur = is_tibia and femur is not None and femur.refined
        joint = config.priors and beside_femur
        prior = knee_prior(femur.pose, config, renderer.device) if joint else None
        search_start = start
        if joint and config.prior_start:
            moved = along_femur_axis(start, femur.pose)
            search_start = moved if not _start_problem(renderer, moved) else start
        best, chose_twin, ambiguity, evaluations, iterations = _search_part(
            renderer, target, search_start, config, seed, prior, femur, is_tibia
        )
        result = _result(part, start, best)
        result.chose_twin, result.ambiguity = bool(chose_twin), float(ambiguity)
        result.evaluations, result.iterations = int(evaluations), int(iterations)
        if beside_femur:
            varus, offset = tibia_relative(torch.as_tensor(femur.pose), torch.as_tensor(best.pose[None]))
            result.varus_valgus, result.offset = float(varus[0]), float(offset[0])
        result.review = _doubtful(result, config, joint)
        result.seconds = time.perf_counter() - t0
        results[part] = result
    return {p: results[p] for p in starts}


def _doubtful(r: PartResult, config: RegistrationConfig, joint: bool) -> bool:
    """The review flag: a poor overlap, a boundary partly far from the mask's, an ambiguous twin, the
    last stage's bound hit, or (jointly) a tibia that breaks the knee's prior."""
    return bool(
        r.iou < config.min_iou
        or r.outliers > config.max_outliers
        or (math.isfinite(r.ambiguity) and r.ambiguity > config.ambiguous)
        or r.hit_bounds
        or (joint and (abs(r.varus_valgus) > config.max_varus or abs(r.offset) > config.max_offset))
    )


def _result(part: str, start: np.ndarray, best: RefineResult) -> PartResult:
    return PartResult(
        part=part,
        pose=np.asarray(best.pose, dtype=np.float64),
        refined=True,
        start=start,
        cost=best.cost,
        iou=best.iou,
        evaluations=best.evaluations,
        iterations=best.generations,
        seconds=best.seconds,
        hit_bounds=best.hit_bounds,
        prior=best.prior,
        outliers=best.outliers,
    )
