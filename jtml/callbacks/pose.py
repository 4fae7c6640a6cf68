"""Write predicted poses as JointTrack pose files, ``<out_dir>/<study>/<part>.jts``, with a report.

One row per frame of the study, in file-name order (the order JointTrack pairs rows with frames),
written with :func:`jtml.io.write_poses`. A frame without a pose (an empty mask: no silhouette to
start from) cannot be stored in a ``.jts``; such a part is written as ``<part>.jtak`` instead, with
``NOT_OPTIMIZED`` rows, which JointTrack also loads — and a note says so.

``<out_dir>/<study>/report.csv`` says per frame and part how far to trust each pose, without ground
truth: the silhouette ``iou`` of the written pose's render against the input mask (and its cost,
:mod:`jtml.registration.costs`), for symmetric-trap parts the twin's, which one was written and why,
whether the knee is plausible for the side the network was trained for, and a ``review`` flag.
A network given a knee of the other side, another implant or another calibration shows as low IoUs
and implausible knees, and the writer warns.

Symmetric trap: a network trained with a trap-aware loss for a (nearly) mirror-symmetric part
(``trap_aware_loss``) may return either the pose or its twin (:func:`jtml.geometry.symmetric_twin`).
``trap_rule``:

- ``evidence`` (default): the pose or its twin, whichever silhouette matches the mask better, when
  the IoUs differ by more than ``twin_margin``; when they do not (ambiguous), the twin only if its
  varus–valgus angle relative to the femur is smaller by more than ``varus_margin`` degrees
  (JointTrack's rule, with a margin); otherwise the network's pose. The reason goes in the report.
- ``varus_valgus``: JointTrack's rule alone, applied to every frame (can swap a right answer).
- ``none``: the network's poses as they are.

When the rule changed a pose, the network's own poses are written too (``<part>_network.jts``).
"""

from __future__ import annotations

import csv
import math
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytorch_lightning as pl
import torch
import trimesh

from jtml.callbacks.predict import PredictionFolderWriter, gather_objects
from jtml.errors import JTMLError
from jtml.geometry import Camera, SilhouetteRenderer, symmetric_twin
from jtml.geometry.knee import knee_angles, mirror_pose_rows, varus_valgus
from jtml.io import read_image, write_poses
from jtml.io.atomic import atomic_write
from jtml.registration.costs import SilhouetteTarget

__all__ = ["PosePredictionWriter"]


REPORT_FIELDS = (
    "frame", "part", "iou", "cost", "twin_iou", "twin_cost", "written", "reason", "knee_plausible", "review",
)  # fmt: skip
# A knee whose tibia sits like this relative to the femur is not a knee of the trained side.
PLAUSIBLE = {"flexion": (-30.0, 160.0), "varus": (-20.0, 20.0), "axial": (-45.0, 45.0)}


@dataclass
class _Row:
    study: str
    part: str
    frame: str
    pos: int
    n: int
    pose: np.ndarray
    iou: float = math.nan
    cost: float = math.nan
    twin: np.ndarray | None = None
    twin_iou: float = math.nan
    twin_cost: float = math.nan
    written: str = "network"
    reason: str = ""
    plausible: str = ""
    network: np.ndarray | None = None  # the network's own pose, where the written one differs
    mask_path: str | None = None
    camera: tuple[float, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)


def _refine_settings(spec: dict[str, Any] | bool | None) -> Any:
    """``refine:`` → a :class:`jtml.registration.frame.RegistrationConfig` (its keys: stages, twin,
    priors, seed, …; ``{}``: its defaults), or None (``null``: the network's poses as they are)."""
    if spec is None or spec is False:
        return None
    from jtml.registration.frame import RegistrationConfig

    if spec is not True and not isinstance(spec, dict):
        raise JTMLError(f"refine must be a mapping of registration settings or null, got {spec!r}")
    return RegistrationConfig.from_dict({} if spec is True else spec)


def _fmt(v: Any) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


class PosePredictionWriter(PredictionFolderWriter):
    """Collects :meth:`PoseModule.predict_step` outputs and writes per study the pose files and
    ``report.csv`` (module docstring).

    ``out_dir``, ``overwrite``: as every prediction writer
    (:class:`jtml.callbacks.predict.PredictionFolderWriter`): default ``<run dir>/predictions``
    (the trainer's ``default_root_dir``, which ``jtml predict`` sets to the run's directory); a
    non-empty folder is refused unless ``overwrite``. ``trap_rule``, ``twin_margin``,
    ``varus_margin``: the symmetric-trap choice (module docstring; ``femur``/``tibia`` name the
    parts). ``min_iou``: a pose whose silhouette IoU is below it is flagged for review. ``refine``:
    registration settings (:class:`jtml.registration.frame.RegistrationConfig`; null: none);
    ``retries``: how many more times (other seeds) a frame the registration flags is searched, the
    lowest cost per part kept. Under DDP
    every rank scores its own frames, the rows are gathered and rank zero writes. ``written`` lists
    the files of the last predict run.
    """

    def __init__(
        self,
        out_dir: str | None = None,
        overwrite: bool = False,
        trap_rule: Literal["evidence", "varus_valgus", "none"] = "evidence",
        twin_margin: float = 0.01,
        varus_margin: float = 3.0,
        min_iou: float = 0.85,
        refine: dict[str, Any] | None = None,
        retries: int = 2,
        femur: str = "fem",
        tibia: str = "tib",
    ) -> None:
        super().__init__(out_dir=out_dir, overwrite=overwrite, write_interval="batch")
        if trap_rule not in ("evidence", "varus_valgus", "none"):
            raise JTMLError(f"trap_rule must be evidence, varus_valgus or none, got {trap_rule!r}")
        if not (0 <= twin_margin < 1 and varus_margin >= 0 and 0 <= min_iou <= 1):
            raise JTMLError("twin_margin and min_iou must be in [0, 1), varus_margin >= 0")
        self.trap_rule, self.femur, self.tibia = trap_rule, femur, tibia
        self.twin_margin, self.varus_margin, self.min_iou = (
            float(twin_margin),
            float(varus_margin),
            float(min_iou),
        )
        self.written: list[Path] = []
        self._rows: list[_Row] = []
        self._meshes: dict[str, trimesh.Trimesh] = {}
        self._renderers: dict[tuple[str, tuple[float, ...]], SilhouetteRenderer] = {}
        self._trap: set[str] = set()
        self.side: str | None = None
        self.refine = _refine_settings(refine)
        if int(retries) < 0:
            raise JTMLError(f"retries must be >= 0, got {retries}")
        self.retries = int(retries)

    def reset(self) -> None:
        self.written, self._rows, self._renderers = [], [], {}

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        dm = getattr(trainer, "datamodule", None)
        part_meshes = getattr(dm, "part_meshes", None)
        self._meshes = dict(part_meshes()) if callable(part_meshes) else {}
        self.side = getattr(dm, "side", None)
        parts = list(getattr(pl_module, "parts", []))
        trap = getattr(pl_module, "trap_parts", None)
        self._trap = {p for p, t in zip(parts, [] if trap is None else trap.tolist(), strict=False) if t}
        missing = sorted(set(parts) - set(self._meshes))
        if missing:
            self._say(f"no model for part(s) {missing}: their poses are written without a silhouette check")

    # -- per batch, on every rank --------------------------------------------------------------------
    def _renderer(self, part: str, camera: np.ndarray) -> SilhouetteRenderer:
        key = (part, tuple(float(c) for c in camera))
        if key not in self._renderers:
            pd, xo, yo, pp, w, h = key[1]
            self._renderers[key] = SilhouetteRenderer(
                self._meshes[part], Camera(pd, xo, yo, pp, int(w), int(h))
            )
        return self._renderers[key]

    def _score(self, row: _Row, mask_path: Any, camera: np.ndarray) -> None:
        """The silhouette evidence for a pose (and its twin): IoU and cost against the input mask."""
        if row.part not in self._meshes or mask_path is None or not np.isfinite(row.pose).all():
            return
        target = SilhouetteTarget.from_mask(read_image(mask_path) > 0)
        poses = [row.pose]
        if row.part in self._trap:
            row.twin = symmetric_twin(row.pose[None]).numpy()[0]
            poses.append(row.twin)
        c = target.costs(self._renderer(row.part, camera), np.stack(poses))
        row.iou, row.cost = float(c["iou"][0]), float(c["cost"][0])
        if row.twin is not None:
            row.twin_iou, row.twin_cost = float(c["iou"][1]), float(c["cost"][1])

    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        poses = torch.as_tensor(prediction["pose"]).detach().cpu().double().numpy()
        items = getattr(self._dataset(trainer, dataloader_idx), "items", None)
        cameras = torch.as_tensor(batch["camera"]).detach().cpu().double().numpy()
        for i, pose in enumerate(poses):
            row = _Row(
                str(prediction["study"][i]),
                str(prediction["part"][i]),
                str(prediction["frame"][i]),
                int(prediction["frame_pos"][i]),
                int(prediction["n_frames"][i]),
                pose,
            )
            item = items[int(batch_indices[i])] if items is not None and batch_indices is not None else None
            mask_path = None if item is None else item.row.masks.get(row.part)
            self._score(row, mask_path, cameras[i])
            row.mask_path, row.camera = (None if mask_path is None else str(mask_path)), tuple(cameras[i])
            self._rows.append(row)

    # -- at the end: registration (frames shared out over the ranks), then rank zero writes -----------
    def _register(self, trainer: pl.Trainer, rows: list[_Row]) -> list[_Row]:
        """Each frame's parts registered together from the network's poses
        (:func:`jtml.registration.frame.register_frame`: femur first, the tibia with the knee's
        priors, each from its pose and its twin's); frame ``k`` on rank ``k mod world size``."""
        from tqdm import tqdm

        from jtml.registration.frame import register_frame

        frames: dict[tuple[str, int], list[_Row]] = {}
        for r in rows:
            frames.setdefault((r.study, r.pos), []).append(r)
        keys = sorted(frames)[trainer.global_rank :: max(1, trainer.world_size)]
        done: list[tuple[tuple[str, int], dict[str, Any]]] = []
        bar = tqdm(
            keys, desc="registering", unit="frame", disable=not trainer.is_global_zero, file=sys.stderr
        )
        for key in bar:
            part_rows = [r for r in frames[key] if r.part in self._meshes and r.mask_path is not None]
            if not part_rows:
                continue
            renderers = {r.part: self._renderer(r.part, np.asarray(r.camera)) for r in part_rows}
            masks = {r.part: read_image(r.mask_path) > 0 for r in part_rows}
            starts = {r.part: r.pose for r in part_rows}
            results = register_frame(renderers, masks, starts, self.refine)
            for k in range(1, self.retries + 1):  # a doubtful frame: more searches, other seeds
                if not any(res.review for res in results.values()):
                    break
                again = register_frame(renderers, masks, starts, self.refine, seed=self.refine.seed + k)
                for part, res in again.items():
                    old = results[part]
                    if res.refined and (not old.refined or res.cost < old.cost):
                        results[part] = res
            done.append((key, {p: (res.pose, res.row()) for p, res in results.items()}))
        by_key = dict(gather_objects(trainer, done))  # a collective: every rank takes part
        for key, parts in by_key.items():
            for r in frames[key]:
                if r.part not in parts:
                    continue
                pose, info = parts[r.part]
                r.network = r.pose.copy()
                shared = {"refined", "reason", "iou", "cost", "review"}  # columns of the report already
                r.extra.update(
                    network_iou=r.iou,
                    network_cost=r.cost,
                    **{k: v for k, v in info.items() if k not in shared},
                )
                r.extra.update(
                    refined=int(bool(info["refined"])), registration_review=int(bool(info["review"]))
                )
                if not info["refined"]:
                    r.reason = f"not registered: {info['reason']}"
                else:
                    r.pose, r.iou, r.cost = (
                        np.asarray(pose, dtype=np.float64),
                        float(info["iou"]),
                        float(info["cost"]),
                    )
                    r.twin, r.twin_iou, r.twin_cost = None, math.nan, math.nan
                    r.written = "twin" if info["chose_twin"] else "network"
                    r.reason = "registration: lower cost" if math.isfinite(info["ambiguity"]) else ""
        return rows

    # -- at the end, on rank zero -----------------------------------------------------------------------
    def _choose_twins(self, fem: dict[int, _Row], tib: dict[int, _Row]) -> None:
        """The trap rule, frame by frame (module docstring); the reason goes in the report."""
        for pos, t in tib.items():
            if t.extra.get("refined"):  # registration chose between the pose and its twin by cost
                continue
            if t.twin is None:
                t.twin = symmetric_twin(t.pose[None]).numpy()[0] if np.isfinite(t.pose).all() else None
            if t.twin is None:
                continue
            f = fem.get(pos)
            vv = None
            if f is not None and np.isfinite(f.pose).all():
                vv = np.abs(varus_valgus(np.stack([f.pose, f.pose]), np.stack([t.pose, t.twin])))
            swap = False
            if self.trap_rule == "varus_valgus":
                swap, t.reason = bool(vv is not None and vv[1] < vv[0]), "varus-valgus rule (JointTrack)"
            elif math.isfinite(t.iou) and abs(t.iou - t.twin_iou) > self.twin_margin:
                swap, t.reason = t.twin_iou > t.iou, "silhouette"
            elif vv is not None and vv[1] + self.varus_margin < vv[0]:
                swap, t.reason = True, f"ambiguous silhouette; varus-valgus {vv[1]:.1f} vs {vv[0]:.1f} deg"
            else:
                t.reason = (
                    "ambiguous; kept the network's"
                    if math.isfinite(t.iou)
                    else "no evidence; kept the network's"
                )
            if swap:
                t.pose, t.twin = t.twin, t.pose
                t.iou, t.twin_iou = t.twin_iou, t.iou
                t.cost, t.twin_cost = t.twin_cost, t.cost
                t.written = "twin" if t.written == "network" else "network"

    def _check_side(self, study: str, fem: dict[int, _Row], tib: dict[int, _Row]) -> None:
        """Mark each frame's knee plausible or not for the trained side; warn when most are not."""
        pairs = [(p, fem[p], tib[p]) for p in sorted(set(fem) & set(tib))]
        pairs = [(p, f, t) for p, f, t in pairs if np.isfinite(f.pose).all() and np.isfinite(t.pose).all()]
        if not pairs or self.side is None:
            return
        F, T = np.stack([f.pose for _, f, _ in pairs]), np.stack([t.pose for _, _, t in pairs])
        sides = ["right", "left"] if self.side == "both" else [self.side]
        ok = np.zeros(len(pairs), dtype=bool)
        for side in sides:
            a = knee_angles(*(mirror_pose_rows(F), mirror_pose_rows(T)) if side == "left" else (F, T))
            ok |= np.all(
                [(lo <= a[:, k]) & (a[:, k] <= hi) for k, (lo, hi) in enumerate(PLAUSIBLE.values())], 0
            )
        for (_, f, t), good in zip(pairs, ok, strict=True):
            f.plausible = t.plausible = "yes" if good else "no"
        if (~ok).sum() * 2 > len(ok):
            msg = (
                f"{study}: in {int((~ok).sum())} of {len(ok)} frame(s) the {self.tibia} relative to the "
                f"{self.femur} is not a plausible {self.side} knee (flexion, varus-valgus, axial rotation "
                f"outside {PLAUSIBLE}): is this a knee of the other side? The network was trained for side: "
                f"{self.side}; see report.csv"
            )
            warnings.warn(msg, stacklevel=1)
            self._say(f"warning: {msg}")

    def _write_report(self, path: Path, rows: list[_Row]) -> None:
        with atomic_write(path) as tmp, open(tmp, "w", newline="") as fh:
            extra = sorted({k for r in rows for k in r.extra})
            w = csv.writer(fh)
            w.writerow([*REPORT_FIELDS, *extra])
            for r in sorted(rows, key=lambda r: (r.pos, r.part)):
                low = math.isfinite(r.iou) and r.iou < self.min_iou
                review = (
                    low
                    or r.plausible == "no"
                    or r.reason.startswith("ambiguous")
                    or bool(r.extra.get("registration_review"))
                )
                values = [r.frame, r.part, r.iou, r.cost, r.twin_iou, r.twin_cost, r.written, r.reason]
                w.writerow(
                    [_fmt(v) for v in [*values, r.plausible, int(review)]]
                    + [_fmt(r.extra.get(k, "")) for k in extra]
                )
        self.written.append(path)

    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        out = self._output_root(trainer, pl_module)
        rows = gather_objects(trainer, self._rows)
        if self.refine is not None:
            rows = self._register(trainer, rows)
        if not trainer.is_global_zero:
            return
        self.written = []
        by_study: dict[str, dict[str, dict[int, _Row]]] = {}
        for r in rows:
            by_study.setdefault(r.study, {}).setdefault(r.part, {})[r.pos] = r
        for study, parts in sorted(by_study.items()):
            fem, tib = parts.get(self.femur, {}), parts.get(self.tibia, {})
            network = {
                part: {
                    pos: (r.network if r.network is not None else r.pose).copy() for pos, r in rows_.items()
                }
                for part, rows_ in parts.items()
            }
            if self.trap_rule != "none" and self.tibia in self._trap | (
                {self.tibia} if self.trap_rule == "varus_valgus" else set()
            ):
                self._choose_twins(fem, tib)
            self._check_side(study, fem, tib)
            for part, table_rows in sorted(parts.items()):
                n = next(iter(table_rows.values())).n
                table = np.full((n, 6), np.nan)
                for pos, r in table_rows.items():
                    table[pos] = r.pose
                changed = [r for r in table_rows.values() if r.written == "twin" or r.network is not None]
                if changed:
                    own = np.full((n, 6), np.nan)
                    for pos, pose in network[part].items():
                        own[pos] = pose
                    path = out / study / f"{part}_network.{'jtak' if np.isnan(own).any() else 'jts'}"
                    write_poses(path, own)
                    self.written.append(path)
                    swapped = sum(r.written == "twin" for r in table_rows.values())
                    what = (
                        "registered"
                        if self.refine is not None
                        else f"wrote the symmetric twin for {swapped} of"
                    )
                    self._say(f"{study}: {what} {n} {part} pose(s); the network's own poses: {path}")
                missing = np.isnan(table).any(axis=1)
                path = out / study / f"{part}.{'jtak' if missing.any() else 'jts'}"
                write_poses(path, table)
                self.written.append(path)
                note = (
                    f" ({int(missing.sum())} frame(s) without a pose: NOT_OPTIMIZED)" if missing.any() else ""
                )
                self._say(f"wrote {path} ({n} {part} pose(s) of {study}){note}")
            report = [r for table_rows in parts.values() for r in table_rows.values()]
            self._write_report(out / study / "report.csv", report)
            ious = [r.iou for r in report if math.isfinite(r.iou)]
            if ious and float(np.median(ious)) < self.min_iou:
                msg = (
                    f"{study}: the poses explain the masks poorly (median silhouette IoU "
                    f"{np.median(ious):.3f} < {self.min_iou}): another implant, knee side or calibration "
                    "than the network was trained for?"
                )
                warnings.warn(msg, stacklevel=1)
                self._say(f"warning: {msg}")
