"""Does a pose network hold up on configurations it never saw? Train once, score on held-out ones.

    python benchmarks/pose_generalization.py [--data $JTML_TEST_DATA/kneel1] [--work DIR]
        [--seeds 1 2] [--ckpt right=CKPT --ckpt left=CKPT ...] [--markdown FILE] [-- extra fit args]

From the real kneel1 study it builds, under ``--work``, the held-out configurations (all exact):

- ``kneel1``: the study as it is (a right knee);
- ``left``: kneel1 mirrored left↔right — frames flipped, STLs mirrored (x → −x, as the lab's left implants),
  poses mirrored (:func:`jtml.geometry.knee.mirror_pose_rows`), the calibration's ``xo`` negated —:
  a left knee; its labels are re-rendered and checked equal to the flipped true labels;
- ``rot90``, ``rot180``: kneel1 turned in-plane about the principal point (frames warped, poses
  rotated, labels re-rendered);
- ``degraded``: kneel1 with segmentation-like masks (:func:`jtml.data.degrade.degrade_mask`, seed 0);
  ``degraded_edges``: the same without moving the boundary as a whole (ragged edges, holes, overlaps);
- ``floor``: per degraded configuration, registration started from the TRUE poses — the error the
  masks themselves impose on any silhouette cost (a boundary dilated by k px reads as the model
  closer by k/width of its depth).

Then, per seed, it trains two networks with the unchanged default ``experiments/pose_from_mask.yaml``
— one on kneel1's STLs and calibration (``side: right``, for every configuration but ``left``), one on
the mirrored STLs and calibration with ``side: left`` — runs ``jtml predict`` on each configuration
and scores, with ``PoseError`` (:func:`jtml.cli.score_poses.score`), the written poses (after the
prediction writer's pose-or-twin choice and registration, when the YAML refines) and the
network's own (``<part>_network.jts`` where the writer wrote them), next to JTML's NFD ``fft`` estimates
on kneel1. Minutes of training are reported per network.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pose_kneel1 import jtml, machine  # noqa: E402

from jtml.cli.score_poses import score  # noqa: E402
from jtml.data.degrade import MaskDegradation, degrade_mask  # noqa: E402
from jtml.geometry import Camera, SilhouetteRenderer, euler312_to_matrix  # noqa: E402
from jtml.geometry.knee import mirror_mesh, mirror_pose_rows  # noqa: E402
from jtml.geometry.roi import in_plane_rotation_matrix, rotate_pose_in_plane  # noqa: E402
from jtml.io import read_calibration, read_image, read_poses, read_stl, write_image, write_mask, write_poses  # noqa: E402
from jtml.io.calibration import Calibration, write_calibration  # noqa: E402
from jtml.io.mesh import write_stl  # noqa: E402
from jtml.io.study import label_path, load_study  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("fem", "tib")
CONFIGS = ("kneel1", "left", "rot90", "rot180", "degraded", "degraded_edges")


def _render_labels(study: Path, meshes: dict, camera: Camera, poses: dict, frames: list[Path]) -> None:
    for part in PARTS:
        r = SilhouetteRenderer(meshes[part], camera)
        for frame, pose in zip(frames, poses[part], strict=True):
            write_mask(label_path(study, part, frame), r.render(pose).astype(np.uint8))


def build(data: Path, work: Path) -> dict[str, Path]:
    """The held-out study folders (module docstring); rebuilt from scratch every time."""
    src = load_study(data)
    calib = read_calibration(src.calibration)
    meshes = {p: read_stl(src.models[p]) for p in PARTS}
    poses = {p: src.read_poses(p) for p in PARTS}
    h, w = read_image(src.frames[0]).shape[:2]
    camera = Camera.from_calibration(calib, w, h)
    out = {"kneel1": data}
    if work.exists():
        shutil.rmtree(work)
    # left: the mirror image
    d = work / "left"
    d.mkdir(parents=True)
    left_cal = Calibration(calib.pd, -calib.xo, calib.yo, calib.pp)
    write_calibration(d / "calibration.txt", left_cal)
    left_meshes = {}
    for p in PARTS:
        left_meshes[p] = m = mirror_mesh(meshes[p])
        write_stl(d / f"left_{p}.stl", m)
    left_poses = {p: mirror_pose_rows(poses[p]) for p in PARTS}
    frames = []
    for f in src.frames:
        write_image(d / f.name, cv2.flip(read_image(f), 1))
        frames.append(d / f.name)
    for p in PARTS:
        write_poses(d / f"{p}.jts", left_poses[p])
    _render_labels(d, left_meshes, Camera.from_calibration(left_cal, w, h), left_poses, frames)
    for p in PARTS:
        for f, g in zip(src.frames, frames, strict=True):
            true = np.fliplr(read_image(label_path(data, p, f)) > 0)
            made = read_image(label_path(d, p, g)) > 0
            if (true != made).sum():
                print(
                    f"note: left {p} {g.name}: {(true != made).sum()} pixel(s) differ from the flipped label"
                )
    out["left"] = d
    # in-plane rotations about the principal point
    for deg in (90, 180):
        d = work / f"rot{deg}"
        d.mkdir(parents=True)
        shutil.copy(src.calibration, d / "calibration.txt")
        for p in PARTS:
            shutil.copy(src.models[p], d / src.models[p].name)
        M = in_plane_rotation_matrix(camera, deg)
        frames = []
        for f in src.frames:
            write_image(d / f.name, cv2.warpAffine(read_image(f), M, (w, h), flags=cv2.INTER_LINEAR))
            frames.append(d / f.name)
        rot = {p: np.stack([rotate_pose_in_plane(q, deg) for q in poses[p]]) for p in PARTS}
        for p in PARTS:
            write_poses(d / f"{p}.jts", rot[p])
        _render_labels(d, meshes, camera, rot, frames)
        out[f"rot{deg}"] = d
    # degraded masks: everything MaskDegradation does; and the same without moving the boundary as a
    # whole (ragged edges, holes, overlaps), since a boundary moved by k px out of a silhouette d px
    # wide is the silhouette of the model k/d of its depth closer: no cost can tell the two apart
    for name, degradation in (
        ("degraded", None),
        ("degraded_edges", MaskDegradation(p=1.0, boundary_px=0.0)),
    ):
        d = work / name
        d.mkdir(parents=True)
        shutil.copy(src.calibration, d / "calibration.txt")
        for p in PARTS:
            shutil.copy(src.models[p], d / src.models[p].name)
            shutil.copy(src.poses[p], d / f"{p}.jts")
        rng = np.random.default_rng(0)
        for f in src.frames:
            shutil.copy(f, d / f.name)
            masks = {p: read_image(label_path(data, p, f)) > 0 for p in PARTS}
            for p in PARTS:
                other = masks["tib" if p == "fem" else "fem"]
                degraded = degrade_mask(masks[p], rng, other, degradation)
                write_mask(label_path(d, p, d / f.name), degraded.astype(np.uint8))
        out[name] = d
    return out


def _common(study: Path) -> list[str]:
    """The default YAML with the study's STLs and calibration (what a user gives)."""
    s = load_study(study)
    return [
        "--config",
        str(ROOT / "experiments" / "pose_from_mask.yaml"),
        "--trainer.enable_progress_bar",
        "false",
        "--data.init_args.models.fem",
        str(s.models["fem"]),
        "--data.init_args.models.tib",
        str(s.models["tib"]),
        "--data.init_args.calibration",
        str(s.calibration),
    ]


def train(study: Path, seed: int, root: Path, side: str, extra: list[str]) -> tuple[str, float]:
    t0 = time.time()
    args = ["fit", *_common(study), "--seed_everything", str(seed), "--trainer.default_root_dir", str(root)]
    args += ["--data.init_args.side", side] if side != "right" else []
    summary = json.loads(jtml(*args, *extra)[-1])
    return summary["checkpoint"], time.time() - t0


def predict(study: Path, ckpt: str, out: Path, refine: bool = True) -> tuple[dict[str, Path], float]:
    t0 = time.time()
    args = ["predict", *_common(study), "--ckpt_path", ckpt, "--data.init_args.studies", f"[{study}]"]
    args += [
        "--trainer.callbacks.init_args.out_dir",
        str(out),
        "--trainer.callbacks.init_args.overwrite",
        "true",
    ]
    jtml(*args, *([] if refine else ["--trainer.callbacks.init_args.refine", "null"]))
    folder = out / study.name
    return {p: next(folder.glob(f"{p}.jt[sa]*")) for p in PARTS}, time.time() - t0


def scores(study: Path, written: dict[str, Path]) -> dict[str, dict]:
    """PoseError of the written poses and of the network's own (``<part>_network.jts``), per part."""
    s = load_study(study)
    res = {}
    for p in PARTS:
        final = score(s.poses[p], written[p], s.models[p], s.calibration, 1024, p)
        own = written[p].with_name(f"{p}_network.jts")
        network = score(s.poses[p], own, s.models[p], s.calibration, 1024, p) if own.is_file() else final
        report = written[p].with_name("report.csv")
        rows = list(csv.DictReader(report.open())) if report.is_file() else []
        res[p] = {"written": final, "network": network, "report": [r for r in rows if r["part"] == p]}
    return res


def geodesic(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-row rotation error (°) between pose rows."""
    Ra, Rb = (euler312_to_matrix(np.asarray(x, dtype=np.float64)[:, 3:]).numpy() for x in (a, b))
    cos = (np.trace(np.swapaxes(Ra, 1, 2) @ Rb, axis1=1, axis2=2) - 1) / 2
    return np.degrees(np.arccos(np.clip(cos, -1, 1)))


def worse_by_twin_rule(study: Path, written: dict[str, Path]) -> int:
    """Frames where the pose-or-twin choice (no registration) is further from the truth than the
    network's own pose (by more than 0.01°)."""
    s = load_study(study)
    own = written["tib"].with_name("tib_network.jts")
    if not own.is_file():
        return 0
    truth = s.read_poses("tib")
    return int((geodesic(read_poses(written["tib"]), truth) > geodesic(read_poses(own), truth) + 0.01).sum())


def floor(study: Path) -> dict[str, dict]:
    """PoseError of registration started from the true poses (the masks' own optimum)."""
    from jtml.registration.frame import register_frame

    s = load_study(study)
    calib = read_calibration(s.calibration)
    h, w = read_image(s.frames[0]).shape[:2]
    cam = Camera.from_calibration(calib, w, h)
    renderers = {p: SilhouetteRenderer(read_stl(s.models[p]), cam) for p in PARTS}
    truth = {p: s.read_poses(p) for p in PARTS}
    found = {p: np.zeros_like(truth[p]) for p in PARTS}
    for i, f in enumerate(s.frames):
        masks = {p: read_image(label_path(study, p, f)) > 0 for p in PARTS}
        res = register_frame(renderers, masks, {p: truth[p][i] for p in PARTS})
        for p in PARTS:
            found[p][i] = res[p].pose
    out = {}
    for p in PARTS:
        path = study / f"floor_{p}.jts"
        write_poses(path, found[p])
        out[p] = score(s.poses[p], path, s.models[p], s.calibration, w, p)
    return out


def cell(r: dict) -> str:
    return f"{r['inplane']['mean']:.2f} / {r['z']['mean']:.2f} / {r['geodesic']['mean']:.2f}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    env = os.environ.get("JTML_TEST_DATA")
    parser.add_argument("--data", type=Path, default=Path(env) / "kneel1" if env else None)
    parser.add_argument("--work", type=Path, default=Path("/tmp/jtml_pose_generalization"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--ckpt", action="append", default=[], help="side=CKPT per seed, in --seeds order")
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args(argv)
    if args.data is None or not args.data.is_dir():
        parser.error("give --data KNEEL1 (or set JTML_TEST_DATA)")
    data = args.data.resolve()
    studies = build(data, args.work / "studies")
    given: dict[str, list[str]] = {}
    for spec in args.ckpt:
        side, _, path = spec.partition("=")
        given.setdefault(side, []).append(path)
    nfd = {p: score(load_study(data).poses[p], data / "FFT" / f"{p}_fft.jts", load_study(data).models[p],
                    load_study(data).calibration, 1024, p) for p in PARTS}  # fmt: skip
    lines = [
        "| seed | configuration | part | registered: in-plane / z mm / geodesic ° | network + twin rule "
        "| network | twin written (registered) | review flags | twin rule worse than network "
        "| train min | predict s (registered) |",
        "|" + "---|" * 11,
    ]
    all_results: dict = {}
    for k, seed in enumerate(args.seeds):
        ckpts, minutes = {}, {}
        for side, study in (("right", data), ("left", studies["left"])):
            if side in given and k < len(given[side]):
                ckpts[side], minutes[side] = given[side][k], float("nan")
            else:
                ckpts[side], secs = train(study, seed, args.work / "runs" / f"{side}-seed{seed}", side, extra)
                minutes[side] = secs / 60
                print(f"seed {seed} {side}: trained in {secs / 60:.1f} min: {ckpts[side]}", flush=True)
        for name in CONFIGS:
            side = "left" if name == "left" else "right"
            base = args.work / "predictions" / f"seed{seed}"
            plain, _ = predict(studies[name], ckpts[side], base / f"{name}-network", refine=False)
            written, secs = predict(studies[name], ckpts[side], base / name)
            res, rule = scores(studies[name], written), scores(studies[name], plain)
            worse = worse_by_twin_rule(studies[name], plain)
            all_results[f"{seed}/{name}"] = {
                p: {
                    "registered": res[p]["written"],
                    "network": res[p]["network"],
                    "twin_rule": rule[p]["written"],
                }
                for p in PARTS
            }
            for p in PARTS:
                rep = res[p]["report"]
                twins = sum(r.get("written") == "twin" for r in rep)
                flags = sum(r.get("review") == "1" for r in rep)
                lines.append(
                    f"| {seed} | {name} | {p} | {cell(res[p]['written'])} | {cell(rule[p]['written'])} "
                    f"| {cell(res[p]['network'])} | {twins} | {flags} of {len(rep)} "
                    f"| {worse if p == 'tib' else '–'} | {minutes[side]:.1f} ({side}) | {secs:.0f} |"
                )
            print("\n".join(lines[-2:]), flush=True)
    for name in ("degraded", "degraded_edges"):
        res = floor(studies[name])
        for p in PARTS:
            lines.append(f"| – | {name}: from the true pose | {p} | {cell(res[p])} | | | | | | | |")
    lines.append("")
    lines.append(
        "NFD fft on kneel1 (in-plane / z / geodesic): " + ", ".join(f"{p} {cell(nfd[p])}" for p in PARTS)
    )
    text = "\n".join(lines)
    print(text)
    (args.work / "results.json").write_text(json.dumps(all_results, indent=1, default=float))
    if args.markdown:
        args.markdown.write_text(
            f"{text}\n\nMachine: {machine()}; extra fit arguments: `{' '.join(extra) or 'none'}`.\n"
        )
        print(f"wrote {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
