"""`jtml track` accuracy on a synthetic knee sequence, from frames alone (issue 14's acceptance run).

    python benchmarks/track.py [--work DIR] [--frames 60] [--size 1024] [--side right] [--seed 1]
        [--seg-config experiments/demo_seg.yaml] [--pose-config experiments/demo_pose.yaml]
        [--seg-ckpt CKPT] [--pose-ckpt CKPT] [--fast] [--accelerator auto] [-- TRACK_ARGS...]

1. ``jtml synth --sequence`` writes the test study (``WORK/study``: ``--frames`` frames of one
   smooth knee motion, its true poses in ``fem.jts``/``tib.jts``);
2. unless given (``--seg-ckpt``/``--pose-ckpt``), a segmentation and a pose network are trained with
   the repository's CPU YAMLs (their own synthetic training data — never the test study), runs in
   ``WORK/runs``; ``--seg-size`` sets the segmentation YAML's training frame and network size;
3. ``jtml track`` runs on the study's frames alone (``WORK/track``; the arguments after ``--`` are
   passed on, e.g. ``-- --backward``);
4. the tracked poses are scored against the truth, per part: median in-plane translation error
   (mm), median |z| (mm), median geodesic (°) — and the network's own poses for comparison — and
   the knee's flexion, varus–valgus (ab/adduction) and internal–external rotation by
   :mod:`jtml.kinematics`: median |tracked − true| (°); then the share of frames flagged for review
   and the seconds per frame (``track.json``).

Prints the table, then one JSON line (also written to ``WORK/track_benchmark.json``). Issue 14 asks
for median in-plane ≤ 0.5 mm, |z| ≤ 3 mm, geodesic ≤ 1° per part, the three angles within 1°
(median) and at most 10 % of the frames flagged.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("fem", "tib")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("benchmarks/.track"), help="working folder")
    parser.add_argument("--frames", type=int, default=60, help="frames of the test sequence (60)")
    parser.add_argument("--size", type=int, default=1024, help="the test study's frame size (1024)")
    parser.add_argument("--side", choices=("left", "right"), default="right", help="the knee (right)")
    parser.add_argument("--seed", type=int, default=1, help="the test sequence's seed (1)")
    parser.add_argument("--seg-config", type=Path, default=ROOT / "experiments" / "demo_seg.yaml")
    parser.add_argument("--pose-config", type=Path, default=ROOT / "experiments" / "demo_pose.yaml")
    parser.add_argument(
        "--seg-size", type=int, default=256, help="segmentation training frames and network input (256)"
    )
    parser.add_argument(
        "--seg-ckpt", type=Path, help="a trained segmentation checkpoint (skips its training)"
    )
    parser.add_argument("--pose-ckpt", type=Path, help="a trained pose checkpoint (skips its training)")
    parser.add_argument("--fast", action="store_true", help="jtml track --fast (fewer registration stages)")
    parser.add_argument("--accelerator", default="auto", help="for training and tracking (auto)")
    parser.add_argument("track_args", nargs="*", help="more `jtml track` arguments (after --)")
    return parser.parse_args(argv)


def _jtml(*argv: str) -> dict[str, Any]:
    """``jtml ARGV`` in this process; its JSON summary (stdout's last line)."""
    import contextlib
    import io

    from jtml.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(list(argv))
    if code != 0:
        sys.exit(f"`jtml {' '.join(argv)}` failed with exit code {code}")
    lines = [ln for ln in out.getvalue().splitlines() if ln.startswith("{")]
    return json.loads(lines[-1]) if lines else {}


def _synthetic(config: Path, **changes: Any) -> dict[str, Any]:
    """The YAML's ``data.init_args.synthetic`` study with ``changes`` (its own folder in WORK)."""
    import yaml

    spec = yaml.safe_load(Path(config).read_text())["data"]["init_args"].get("synthetic") or {}
    return {**spec, **changes}


def _median(values: np.ndarray) -> float:
    values = values[np.isfinite(values)]
    return round(float(np.median(values)), 3) if len(values) else math.nan


def _errors(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    import torch

    from jtml.geometry import euler312_to_matrix, geodesic_angle

    ok = np.isfinite(pred).all(axis=1)
    geo = np.full(len(pred), np.nan)
    if ok.any():
        Rp = euler312_to_matrix(torch.from_numpy(pred[ok, 3:]))
        Rt = euler312_to_matrix(torch.from_numpy(truth[ok, 3:]))
        geo[ok] = np.degrees(geodesic_angle(Rp, Rt).numpy())
    d = pred - truth
    return {
        "inplane_mm": _median(np.hypot(d[:, 0], d[:, 1])),
        "z_mm": _median(np.abs(d[:, 2])),
        "geodesic_deg": _median(geo),
        "no_pose": int((~ok).sum()),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    from jtml.io import read_poses
    from jtml.kinematics import ABDUCTION, FLEXION, INTERNAL, knee_kinematics
    from jtml.sim.synth import generate_study

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    study = work / "study"
    if not (study / "fem.jts").is_file():
        generate_study(study, args.frames, args.seed, args.size, sequence=True, side=args.side)
    runs = str(work / "runs")
    accel = ["--trainer.accelerator", args.accelerator]
    seg_data = _synthetic(args.seg_config, out=str(work / "seg_train"), size=args.seg_size)
    seg = args.seg_ckpt or Path(
        _jtml("fit", "--config", str(args.seg_config), "--trainer.default_root_dir", runs, *accel,
              "--data.init_args.image_size", str(args.seg_size),
              "--data.init_args.synthetic", json.dumps(seg_data))["checkpoint"]
    )  # fmt: skip
    pose_data = _synthetic(args.pose_config, out=str(work / "pose_test"))
    pose = args.pose_ckpt or Path(
        _jtml("fit", "--config", str(args.pose_config), "--trainer.default_root_dir", runs, *accel,
              "--data.init_args.side", args.side,
              "--data.init_args.synthetic", json.dumps(pose_data))["checkpoint"]
    )  # fmt: skip
    out = work / "track"
    _jtml("track", "--study", str(study), "--seg", str(seg), "--pose", str(pose),
          "--model", f"fem={study / 'fem.stl'}", "--model", f"tib={study / 'tib.stl'}",
          "--side", args.side, "--out", str(out), "--overwrite", "--accelerator", args.accelerator,
          *(["--fast"] if args.fast else []), *args.track_args)  # fmt: skip
    record = json.loads((out / "track.json").read_text())
    truth = {p: read_poses(study / f"{p}.jts") for p in PARTS}
    tracked = {p: read_poses(next(out.glob(f"{p}.jt*")), allow_missing=True) for p in PARTS}
    network = {p: read_poses(next(out.glob(f"{p}_network.jt*")), allow_missing=True) for p in PARTS}
    summary: dict[str, Any] = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "frames": args.frames,
        "size": args.size,
        "side": args.side,
        "seg_checkpoint": str(seg),
        "pose_checkpoint": str(pose),
    }
    for p in PARTS:
        summary[p] = _errors(tracked[p], truth[p])
        summary[f"{p}_network"] = _errors(network[p], truth[p])
    true_k = knee_kinematics(truth["fem"], truth["tib"], args.side)
    got_k = knee_kinematics(tracked["fem"], tracked["tib"], args.side)
    for name, column in (("flexion", FLEXION), ("varus_valgus", ABDUCTION), ("internal_external", INTERNAL)):
        summary[f"{name}_deg"] = _median(np.abs(got_k[column] - true_k[column]))
    summary["flagged_pct"] = round(100.0 * record["frames_flagged"] / record["frames"], 1)
    summary["seconds_per_frame"] = record["this_run"]["seconds_per_frame"]
    for p in PARTS:
        e, n = summary[p], summary[f"{p}_network"]
        print(
            f"{p}: in-plane {e['inplane_mm']} mm (network {n['inplane_mm']}), |z| {e['z_mm']} mm "
            f"(network {n['z_mm']}), geodesic {e['geodesic_deg']} deg (network {n['geodesic_deg']})"
        )
    print(
        f"flexion {summary['flexion_deg']} deg, varus-valgus {summary['varus_valgus_deg']} deg, "
        f"internal-external {summary['internal_external_deg']} deg (median |error|); "
        f"{summary['flagged_pct']} % flagged; {summary['seconds_per_frame']} s/frame"
    )
    print(json.dumps(summary), flush=True)
    (work / "track_benchmark.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()
