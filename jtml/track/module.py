"""Tracking as a LightningModule: ``trainer.predict`` tracks every frame of every study.

:class:`TrackModule` holds the segmentation and pose networks (loaded from their checkpoints) and
the registration settings; its ``predict_step`` takes one study (:mod:`jtml.track.data`) and runs
its frames in order — the dependency on the previous frame is sequential within a study, while
studies spread over processes, devices and nodes as any Lightning prediction does. For each frame:

1. **masks**: the segmentation network's (the frame prepared exactly as its training data,
   :meth:`FluoroSegDataset.prepare`, the probabilities mapped back to the frame by
   :func:`~jtml.callbacks.predict.masks_to_frame`), or the given masks (``--masks``);
2. **network pose** per part: :meth:`PoseModule.estimate` on the part's mask;
3. **registration** per part (femur first): :func:`~jtml.registration.search.refine_with_twin` from
   each start — the network's pose, the ``init`` file's row if any, and the previous frame's result —
   keeping the lowest cost; the tibia beside this frame's femur with the knee prior (``priors``,
   as ``jtml refine``: varus–valgus and mediolateral offset near 0, its starts moved to the
   femur-consistent depth), each mask refined by the frame near its edge with ``image``. When the
   kept search cannot tell the pose from its symmetric twin (their cost ratio above
   ``ambiguous``), the tibia takes JointTrack's rule (the smaller varus–valgus angle to this
   frame's femur) when it is smaller by more than the knee prior's ``varus_sigma`` (else the cost
   decides), and any other part the one nearer (geodesic) to its
   previous pose: the silhouette cannot decide, continuity can. ``review`` when the kept pose's IoU
   (against the mask the search used: with ``image`` the frame-refined one) is below ``min_iou``,
   it hit a search bound, or the twin stayed undecided (a first frame).

With ``backward``, a second pass from frame N−2 down to 0 registers each frame from the next
frame's final pose and keeps that result when its cost is lower. Each finished frame is appended to
the study's journal (:mod:`jtml.track.journal`) before the next begins, so a killed run resumes at
the first unfinished frame, from bit-identical results: frame ``i``'s searches are seeded with
``seed + i`` (``seed + N + i`` backward), whichever process or run computes it.

Runs on the module's device (networks and renders alike; the renders in float64).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from tqdm import tqdm

from jtml.callbacks.predict import masks_to_frame
from jtml.data.segmentation import FluoroSegDataset
from jtml.errors import JTMLError
from jtml.geometry import Camera, SilhouetteRenderer, euler312_to_matrix, geodesic_angle
from jtml.geometry.knee import varus_valgus
from jtml.io import Calibration, read_image, read_mask, read_stl, write_mask
from jtml.models.pose import PoseModule
from jtml.models.segmentation import SegmentationModule
from jtml.registration.costs import SilhouetteTarget
from jtml.registration.frame import RegistrationConfig, knee_prior, tibia_start
from jtml.registration.search import RefineResult, TwinResult, refine_with_twin
from jtml.track.journal import Journal, fsync_file, mask_file
from jtml.track.settings import TrackSettings

__all__ = ["FEMUR", "TIBIA", "TrackModule", "choose_twin"]

FEMUR, TIBIA = "fem", "tib"


REGISTRATION = RegistrationConfig()  # the knee prior's and the image refinement's settings (jtml refine's)


def _pose(values: Any) -> np.ndarray | None:
    """A pose row from the journal (None: no pose)."""
    return None if values is None else np.asarray(values, dtype=np.float64)


def _row(pose: np.ndarray | None) -> list[float] | None:
    return None if pose is None else [float(v) for v in pose]


def _geodesic_deg(a: np.ndarray, b: np.ndarray) -> float:
    Ra, Rb = euler312_to_matrix(torch.from_numpy(a[3:])), euler312_to_matrix(torch.from_numpy(b[3:]))
    return math.degrees(float(geodesic_angle(Ra, Rb)))


def choose_twin(
    part: str,
    twin: TwinResult,
    ambiguous: float,
    femur: np.ndarray | None = None,
    reference: np.ndarray | None = None,
) -> tuple[RefineResult, str]:
    """The kept one of a search's pose and twin, and the rule that kept it (module docstring, step
    3): the lower cost, unless their cost ratio is above ``ambiguous``; then, for the tibia beside
    this frame's ``femur``, the smaller |varus–valgus| when smaller by more than the knee prior's
    ``varus_sigma`` (the prior is in the cost already: a twin a few degrees nearer 0 is no evidence,
    and the rule alone swapped right poses for wrong ones), else the cost; for other parts (and a
    tibia without a femur) the one nearer the previous frame's pose (``reference``), or "undecided"
    for a first frame."""
    a, b = twin.best, twin.other
    if not twin.ambiguity > ambiguous:
        return a, "cost"
    if part == TIBIA and femur is not None:
        vv = np.abs(varus_valgus(np.stack([femur, femur]), np.stack([a.pose, b.pose])))
        return (b, "varus-valgus") if vv[1] < vv[0] - REGISTRATION.varus_sigma else (a, "cost")
    if reference is not None:
        nearer = _geodesic_deg(b.pose, reference) < _geodesic_deg(a.pose, reference)
        return (b if nearer else a), "continuity"
    return a, "undecided"


class TrackModule(pl.LightningModule):
    """Segmentation → pose network → registration for every frame of a study (module docstring).

    Args:
        pose: the pose network (its parts must include every tracked part).
        parts: the tracked parts, in report order.
        seg: the segmentation network; None when masks are given (items with ``masks``).
        seg_preprocessing: the seg checkpoint's data settings (``image_size``, ``resize_mode``,
            ``normalize``, ``mean``, ``std``, ``invert``), as its training data prepared frames.
        settings: the registration settings.
        progress: a tqdm bar per study on stderr (None: when stderr is a terminal).
    """

    def __init__(
        self,
        pose: PoseModule,
        parts: Sequence[str],
        seg: SegmentationModule | None = None,
        seg_preprocessing: Mapping[str, Any] | None = None,
        settings: TrackSettings | None = None,
        progress: bool | None = None,
    ) -> None:
        super().__init__()
        self.pose = pose.eval()
        self.seg = None if seg is None else seg.eval()
        self.parts = [str(p) for p in parts]
        missing = [p for p in self.parts if p not in pose.parts]
        if missing:
            raise JTMLError(f"the pose network has parts {pose.parts}, not {missing}")
        if seg is not None:
            missing = [p for p in self.parts if p not in seg.parts]
            if missing:
                raise JTMLError(f"the segmentation network has parts {seg.parts}, not {missing}")
            self._seg_data = FluoroSegDataset([], list(seg.parts), **dict(seg_preprocessing or {}))
        self.settings = settings or TrackSettings()
        self.progress = progress
        # femur first: the tibia's twin rule needs this frame's femur
        self._order = sorted(self.parts, key=lambda p: (p != FEMUR, self.parts.index(p)))
        self._edge = self.settings.stages[-1].edge_weight

    # -- inputs ----------------------------------------------------------------------------------------
    def _renderer(self, mesh: Any, camera: Camera) -> SilhouetteRenderer:
        renderer = SilhouetteRenderer(mesh, camera)
        return renderer if self.device.type == "cpu" else renderer.to(self.device)

    def _target(
        self, mask: np.ndarray, frame: np.ndarray | None = None, other: np.ndarray | None = None
    ) -> SilhouetteTarget:
        """The mask as a registration target; with ``image`` and the frame, refined near its edge by
        the frame's intensities (``other``: the other parts' masks, whose edges are not this one's)."""
        if self.settings.image and frame is not None:
            target = SilhouetteTarget.from_frame(frame, mask, other, REGISTRATION.band)
        else:
            target = SilhouetteTarget.from_mask(mask)
        return target if self.device.type == "cpu" else target.to(self.device)

    @torch.no_grad()
    def segment(self, frame: np.ndarray) -> dict[str, np.ndarray]:
        """The tracked parts' uint8 {0, 1} masks of one frame, from the segmentation network."""
        assert self.seg is not None
        x, _, _ = self._seg_data.prepare(frame)
        probs = self.seg(x[None].to(self.device)).sigmoid()[0]
        masks = masks_to_frame(
            probs, frame.shape[:2], self._seg_data.image_size, self._seg_data.resize_mode, self.seg.threshold
        )
        return {p: masks[self.seg.parts.index(p)] for p in self.parts}

    def _masks(
        self, item: dict[str, Any], journal: Journal, i: int, frame: np.ndarray
    ) -> dict[str, np.ndarray]:
        """Frame ``i``'s masks: given, already predicted (a resumed or backward frame), or predicted now
        and kept in the journal's folder (written and fsynced before the frame's record)."""
        stem = Path(item["frames"][i]).stem
        if item["masks"] is not None:
            return {p: read_mask(mask_file(Path(item["masks"]), p, stem), item["shape"]) for p in self.parts}
        kept = {p: mask_file(journal.masks, p, stem) for p in self.parts}
        if all(path.is_file() for path in kept.values()):
            return {p: read_mask(path, item["shape"]) for p, path in kept.items()}
        masks = self.segment(frame)
        for p, path in kept.items():
            write_mask(path, masks[p])
            fsync_file(path)
        return masks

    # -- one part in one frame -------------------------------------------------------------------------
    def _choose(
        self,
        part: str,
        found: list[tuple[str, TwinResult]],
        reference: np.ndarray | None,
        femur: np.ndarray | None,
        iou_of: Any = None,
    ) -> dict[str, Any]:
        """The kept result among the starts' searches (module docstring, step 3). ``iou_of``: the
        IoU of a pose against the mask as written (when the search's target was refined by the
        frame, whose fractional edge is no overlap to judge by); None: the search's own."""
        # the lowest cost with the prior (the tibia's, when it has one); the first start wins a tie
        start, twin = min(found, key=lambda s: s[1].best.cost + s[1].best.prior)
        chosen, rule = choose_twin(part, twin, self.settings.ambiguous, femur, reference)
        iou = float(chosen.iou if iou_of is None else iou_of(chosen.pose))
        review = iou < self.settings.min_iou or chosen.hit_bounds or rule == "undecided"
        reasons = []
        if iou < self.settings.min_iou:
            reasons.append(f"IoU {iou:.3f} < {self.settings.min_iou}")
        if chosen.hit_bounds:
            reasons.append("hit a search bound")
        if rule == "undecided":
            reasons.append(f"pose and twin fit alike (ratio {twin.ambiguity:.3f})")
        return {
            "pose": _row(chosen.pose),
            "cost": float(chosen.cost),
            "iou": iou,
            "review": bool(review),
            "start": start,
            "twin": bool(twin.chose_twin if chosen is twin.best else not twin.chose_twin),
            "twin_rule": rule,
            "ambiguity": float(twin.ambiguity),
            "costs": {name: float(t.best.cost) for name, t in found},
            "reason": "; ".join(reasons),
        }

    def _register(
        self,
        part: str,
        mask: np.ndarray,
        renderer: SilhouetteRenderer,
        starts: list[tuple[str, np.ndarray | None]],
        seed: int,
        reference: np.ndarray | None,
        femur: np.ndarray | None,
        frame: np.ndarray | None = None,
        other: np.ndarray | None = None,
        femur_fits: bool = False,
    ) -> dict[str, Any]:
        """Register ``part`` from each usable start; the kept result, or why there is none. The
        tibia beside this frame's femur, when that fits its mask (``femur_fits``: IoU at least
        ``jtml refine``'s review threshold), is searched with the knee prior (``priors``), each
        start moved to the femur-consistent depth where that fits better."""
        t0 = time.perf_counter()
        if not mask.any():
            return {"pose": None, "review": True, "reason": "empty mask: no silhouette", "start": ""}
        target = self._target(mask, frame, other)
        joint = self.settings.priors and part == TIBIA and femur is not None and femur_fits
        prior = knee_prior(femur, REGISTRATION, renderer.device) if joint else None
        found, problems = [], []
        for name, start in starts:
            if start is None or not np.isfinite(start).all():
                continue
            if joint:
                start = tibia_start(renderer, target, np.asarray(start, dtype=np.float64), femur, self._edge)
            try:
                found.append((name, refine_with_twin(
                    renderer, target, start, self.settings.stages, seed, self.settings.min_iou,
                    self.settings.ambiguous, prior,
                )))  # fmt: skip
            except JTMLError as e:  # e.g. a mask too small for a coarse stage: this start's problem
                problems.append(f"{name}: {e}")
        if not found:
            why = "; ".join(problems) or "no start pose (the network found no silhouette)"
            return {"pose": None, "review": True, "reason": why, "start": ""}
        # the IoU reported and flagged: against the frame-refined mask the search used, made binary
        # (a 256-px network's mask upsampled scores ~0.90 against the truth itself, so against it a
        # perfect pose is flagged; the coverage's fractional edge pixels would do the same)
        refined = self.settings.image and frame is not None
        plain = SilhouetteTarget.from_mask(target.mask, target.device) if refined else None

        def iou_of(pose: np.ndarray) -> float:
            assert plain is not None
            return float(plain.costs(renderer, pose[None], self._edge)["iou"][0])

        out = self._choose(part, found, reference, femur, None if plain is None else iou_of)
        if problems:
            out["reason"] = "; ".join([out["reason"], *problems]).strip("; ")
        out["seconds"] = time.perf_counter() - t0
        return out

    def _network(self, part: str, mask: np.ndarray, camera: Camera, frame: np.ndarray, renderer: Any) -> dict:
        """The pose network's pose of ``part`` and how well its silhouette fits (cost, IoU)."""
        if not mask.any():
            return {"network": None, "network_cost": math.nan, "network_iou": math.nan}
        pose = self.pose.estimate(mask, camera, part, None if self.pose.input == "mask" else frame)
        if not np.isfinite(pose).all():
            return {"network": None, "network_cost": math.nan, "network_iou": math.nan}
        fit = self._target(mask).costs(renderer, pose[None], self._edge)
        return {
            "network": _row(pose),
            "network_cost": float(fit["cost"][0]),
            "network_iou": float(fit["iou"][0]),
        }

    # -- a study -------------------------------------------------------------------------------------
    def _check(self, item: dict[str, Any], journal: Journal) -> Any:
        """A journal record is usable when its frame's predicted masks are there."""

        def check(record: dict[str, Any]) -> bool:
            if item["masks"] is not None or record.get("pass") != "forward":
                return True
            stem = Path(item["frames"][int(record["frame"])]).stem
            return all(mask_file(journal.masks, p, stem).is_file() for p in self.parts)

        return check

    def track(self, item: dict[str, Any]) -> dict[str, Any]:
        """Track one study (an item of :class:`~jtml.track.data.TrackDataModule`): every frame, in
        order, resuming from its journal; returns the per-frame results for the writer."""
        t0 = time.perf_counter()
        frames = [Path(f) for f in item["frames"]]
        n = len(frames)
        h, w = item["shape"]
        camera = Camera.from_calibration(Calibration(*item["calibration"]), w, h)
        renderers = {p: self._renderer(read_stl(item["models"][p]), camera) for p in self.parts}
        init = {p: np.asarray(rows, dtype=np.float64) for p, rows in item["init"].items()}
        journal = Journal(item["out"], item["fingerprint"], n)
        done = journal.open(restart=bool(item["overwrite"]), check=self._check(item, journal))
        resumed = len(done)
        total = n + (n - 1 if self.settings.backward else 0)
        show = sys.stderr.isatty() if self.progress is None else self.progress
        bar = tqdm(
            total=total, initial=resumed, desc=item["name"], unit="frame", disable=not show, file=sys.stderr
        )
        final: list[dict[str, Any]] = [{} for _ in range(n)]
        last: dict[str, np.ndarray | None] = {p: None for p in self.parts}  # the latest pose per part
        computed = 0
        for k in range(total):
            backward = k >= n
            i = k if not backward else n - 2 - (k - n)
            if k < len(done):
                record = done[k]
            else:
                record = self._frame(
                    item, journal, i, frames[i], camera, renderers, init, last, final, backward
                )
                journal.append(record)
                computed += 1
                bar.update(1)
            if not backward:
                final[i] = record["parts"]
            else:
                final[i] = {p: record["parts"][p] for p in self.parts}
            for p in self.parts:
                pose = _pose(final[i][p].get("pose"))
                if pose is not None:
                    last[p] = pose
        bar.close()
        return {
            "name": item["name"],
            "out": item["out"],
            "frames": [f.stem for f in frames],
            "parts": list(self.parts),
            "models": dict(item["models"]),
            "masks": item["masks"],
            "partial_masks": str(journal.masks) if item["masks"] is None else None,
            "results": final,
            "resumed": resumed,
            "computed": computed,
            "seconds": time.perf_counter() - t0,
            "inputs": item.get("inputs", {}),
            "fingerprint": item["fingerprint"],
        }

    def _frame(
        self,
        item: dict[str, Any],
        journal: Journal,
        i: int,
        path: Path,
        camera: Camera,
        renderers: Mapping[str, SilhouetteRenderer],
        init: Mapping[str, np.ndarray],
        last: Mapping[str, np.ndarray | None],
        final: list[dict[str, Any]],
        backward: bool,
    ) -> dict[str, Any]:
        """One frame's record: each part's result (forward), or the better of its forward result and
        one registered from the next frame's pose (backward)."""
        frame = read_image(path)
        masks = self._masks(item, journal, i, frame)
        n = len(item["frames"])
        seed = self.settings.seed + (n + i if backward else i)
        parts: dict[str, Any] = {}
        for part in self._order:
            femur = _pose(parts.get(FEMUR, {}).get("pose")) if part != FEMUR else None
            fits = float(parts.get(FEMUR, {}).get("iou") or 0.0) >= REGISTRATION.min_iou
            others = [masks[q] > 0 for q in self.parts if q != part]
            other = np.logical_or.reduce(others) if others else None
            if not backward:
                net = self._network(part, masks[part], camera, frame, renderers[part])
                starts = [("network", _pose(net["network"]))]
                if part in init:
                    starts.append(("init", init[part][i]))
                starts.append(("previous", last[part]))
                result = self._register(
                    part, masks[part], renderers[part], starts, seed, last[part], femur, frame, other, fits
                )
                parts[part] = {**net, **result}
            else:
                before = final[i][part]
                nxt = _pose(final[i + 1][part].get("pose"))
                result = self._register(
                    part, masks[part], renderers[part], [("next", nxt)], seed, nxt, femur, frame, other, fits
                )
                better = result.get("pose") is not None and (
                    before.get("pose") is None or result["cost"] < before["cost"]
                )
                keep = {k: before[k] for k in ("network", "network_cost", "network_iou") if k in before}
                parts[part] = {**keep, **result} if better else dict(before)
        return {
            "pass": "backward" if backward else "forward",
            "frame": i,
            "parts": {p: parts[p] for p in self.parts},
        }

    def predict_step(
        self, batch: list[dict[str, Any]], batch_idx: int, dataloader_idx: int = 0
    ) -> list[dict]:
        with torch.no_grad():
            return [self.track(item) for item in batch]

    def configure_optimizers(self) -> None:  # predict only: nothing to train
        return None
