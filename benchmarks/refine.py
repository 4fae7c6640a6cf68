"""Registration accuracy and speed: kneel1 from JTML's NFD estimates, and synthetic studies.

    python benchmarks/refine.py kneel1 [--data $JTML_TEST_DATA/kneel1] [--start fft|fft_perfect]
    python benchmarks/refine.py synth [--frames 20] [--size 1024] [--seed 0] [--masks true|degraded|both]
    python benchmarks/refine.py ... --device cuda --batch 0      # a GPU: whole generations per call

Both run :func:`jtml.registration.frame.register_frame` — what ``jtml refine`` runs per frame —
with the default settings (:class:`RegistrationConfig`: ``DEFAULT_STAGES``, twin, femur–tibia
priors) unless ``--no-twin``/``--no-priors``/``--stages FILE.json``; ``--image``: masks refined by
the frame's edges (``image: true``).

``kneel1``: the ``FFT/<part>_<start>.jts`` starts refined against kneel1's true masks
(``Labels/<part>/``: the tracked poses' exact silhouettes, so what is left is the search's error),
scored like ``jtml score-poses`` (:class:`jtml.metrics.pose.PoseError`: mean absolute error per
axis, geodesic) before and after, plus seconds per part-frame.

``synth``: a synthetic study (``jtml synth``, built-in implants, ``--frames`` frames) generated into
``--out`` (reused when there), starts drawn around the truth up to 5 mm in-plane, 40 mm out of plane
and 10° (:func:`jtml.data.registration.perturbed_starts`), registered against the true masks and
against segmentation-like ones (:func:`jtml.data.degrade.degrade_mask`: boundary eroded/dilated by
up to 2 px, ragged edges, holes, the other implant's overlap removed). Success per part-frame:
in-plane error ≤ 0.5 mm, |z| ≤ 3 mm and geodesic ≤ 1°; the ``review`` flag's precision (flagged
frames that failed) and recall (failures flagged).

Each prints one line per part-frame and one JSON summary line. Speeds depend on what else runs on
the machine: on a shared machine they are noisy (the JSON has the machine's load average).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from jtml.geometry import Camera, SilhouetteRenderer, euler312_to_matrix, geodesic_angle
from jtml.io import list_images, read_calibration, read_image, read_mask, read_poses, read_stl
from jtml.registration.frame import RegistrationConfig, register_frame
from jtml.registration.search import Stage

KNEEL1 = {"fem": "KR_right_7_fem.stl", "tib": "KR_right_6_tib.stl"}
SUCCESS = {"inplane": 0.5, "z": 3.0, "geodesic": 1.0}


def errors(pose: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Absolute errors (mm, °) as PoseError reports them: per axis, in-plane and geodesic."""
    d = np.abs(pose - truth)
    geo = geodesic_angle(euler312_to_matrix(pose[3:]), euler312_to_matrix(truth[3:]))
    return {
        "x": float(d[0]),
        "y": float(d[1]),
        "z": float(d[2]),
        "inplane": float(np.hypot(d[0], d[1])),
        "geodesic": math.degrees(float(geo)),
    }


def success(e: dict[str, float]) -> bool:
    return (
        e["inplane"] <= SUCCESS["inplane"] and e["z"] <= SUCCESS["z"] and e["geodesic"] <= SUCCESS["geodesic"]
    )


def _config(args: argparse.Namespace) -> RegistrationConfig:
    spec: dict[str, object] = {
        "twin": not args.no_twin,
        "priors": not args.no_priors,
        "image": args.image,
    }
    if args.stages:
        spec["stages"] = [Stage.from_dict(s) for s in json.loads(Path(args.stages).read_text())]
    for item in args.set or []:
        key, _, value = item.partition("=")
        spec[key] = json.loads(value)
    if args.batch is not None:
        spec["batch"] = None if args.batch == 0 else args.batch
    return RegistrationConfig.from_dict(spec)


def _machine(args: argparse.Namespace) -> dict[str, object]:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    gpu = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None
    return {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "device": gpu or "cpu",
        "torch_threads": torch.get_num_threads(),
        "load_average": round(load, 2) if load is not None else None,
    }


def _mean(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: round(float(np.mean([r[k] for r in rows])), 3) for k in rows[0]} if rows else {}


def run_kneel1(args: argparse.Namespace) -> dict[str, object]:
    data = args.data
    camera = Camera.from_calibration(read_calibration(data / "calibration.txt"), 1024, 1024)
    renderers = {
        p: SilhouetteRenderer(read_stl(data / stl), camera, args.device) for p, stl in KNEEL1.items()
    }
    frames = list_images(data)
    truth = {p: read_poses(data / f"{p}.jts", n_frames=len(frames)) for p in KNEEL1}
    starts = {p: read_poses(data / "FFT" / f"{p}_{args.start}.jts", n_frames=len(frames)) for p in KNEEL1}
    config = _config(args)
    before: dict[str, list] = {p: [] for p in KNEEL1}
    after: dict[str, list] = {p: [] for p in KNEEL1}
    seconds = []
    for i, frame in enumerate(frames):
        masks = {p: read_mask(data / "Labels" / p / f"{frame.stem}_label_{p}.tif") for p in KNEEL1}
        results = register_frame(
            renderers, masks, {p: starts[p][i] for p in KNEEL1}, config, config.seed + i, read_image(frame)
        )
        for part, r in results.items():
            e0, e1 = errors(starts[part][i], truth[part][i]), errors(r.pose, truth[part][i])
            before[part].append(e0)
            after[part].append(e1)
            seconds.append(r.seconds)
            print(
                f"{part} {frame.stem}: z {e0['z']:6.2f} -> {e1['z']:5.2f} mm, in-plane {e1['inplane']:.3f} "
                f"mm, geodesic {e0['geodesic']:.2f} -> {e1['geodesic']:.3f} deg, IoU {r.iou:.4f}, "
                f"{r.evaluations} renders, {r.seconds:.1f} s, twin {r.chose_twin} ambiguity "
                f"{r.ambiguity:.3f} review {r.review}",
                flush=True,
            )
    summary: dict[str, object] = {"benchmark": "kneel1", "start": args.start, **_machine(args)}
    for part in KNEEL1:
        summary[f"{part}_before"], summary[f"{part}_after"] = _mean(before[part]), _mean(after[part])
    summary["seconds_per_part_frame"] = round(float(np.mean(seconds)), 2)
    summary["seconds_per_part_frame_max"] = round(float(np.max(seconds)), 2)
    return summary


def _synthetic_study(args: argparse.Namespace) -> Path:
    from jtml.sim.synth import generate_study

    out = args.out
    if not (out.is_dir() and list_images(out)):
        generate_study(out, frames=args.frames, seed=args.seed, size=args.size, progress=False)
    return out


def run_synth(args: argparse.Namespace) -> dict[str, object]:
    from jtml.data.degrade import degrade_mask
    from jtml.data.registration import perturbed_starts

    study = _synthetic_study(args)
    frames = list_images(study)[: args.frames]
    parts = ("fem", "tib")
    size = read_mask(study / "Labels" / "fem" / f"{frames[0].stem}_label_fem.tif").shape
    camera = Camera.from_calibration(read_calibration(study / "calibration.txt"), size[1], size[0])
    renderers = {p: SilhouetteRenderer(read_stl(study / f"{p}.stl"), camera, args.device) for p in parts}
    truth = {p: read_poses(study / f"{p}.jts")[: len(frames)] for p in parts}
    starts = {
        p: perturbed_starts(truth[p], 5.0, 40.0, 10.0, seed=args.seed + 100 + k) for k, p in enumerate(parts)
    }
    config = _config(args)
    kinds = ("true", "degraded") if args.masks == "both" else (args.masks,)
    summary: dict[str, object] = {
        "benchmark": "synth",
        "frames": len(frames),
        "size": size[0],
        **_machine(args),
    }
    for kind in kinds:
        rows = []
        for i, frame in enumerate(frames):
            masks = {p: read_mask(study / "Labels" / p / f"{frame.stem}_label_{p}.tif") > 0 for p in parts}
            if kind == "degraded":
                rng = np.random.default_rng([args.seed, i])
                masks = {
                    p: degrade_mask(masks[p], rng, other=masks[parts[1 - k]]) for k, p in enumerate(parts)
                }
            results = register_frame(
                renderers, masks, {p: starts[p][i] for p in parts}, config, config.seed + i, read_image(frame)
            )
            for part, r in results.items():
                e0 = errors(starts[part][i], truth[part][i])
                e1 = errors(r.pose, truth[part][i]) if r.refined else {k: math.inf for k in e0}
                ok = r.refined and success(e1)
                rows.append(
                    {"part": part, "ok": ok, "review": r.review or not r.refined, "seconds": r.seconds, **e1}
                )
                print(
                    f"{kind} {part} {frame.stem}: start z {e0['z']:5.1f} in-plane {e0['inplane']:.1f} geo "
                    f"{e0['geodesic']:4.1f} -> z {e1['z']:6.2f} in-plane {e1['inplane']:.3f} geo "
                    f"{e1['geodesic']:.3f} IoU {r.iou:.4f} {'ok' if ok else 'FAIL'} review {r.review} twin "
                    f"{r.chose_twin} "
                    f"{r.seconds:.1f} s {r.reason}",
                    flush=True,
                )
        summary[kind] = _synth_summary(rows)
    return summary


def _synth_summary(rows: list[dict[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for part in ("fem", "tib", "all"):
        mine = [r for r in rows if part == "all" or r["part"] == part]
        ok = np.array([bool(r["ok"]) for r in mine])
        flag = np.array([bool(r["review"]) for r in mine])
        fails = ~ok
        finite = [r for r in mine if math.isfinite(float(r["z"]))]  # type: ignore[arg-type]
        out[part] = {
            "n": len(mine),
            "success": round(float(ok.mean()), 3) if len(mine) else None,
            "review_precision": round(float((flag & fails).sum() / flag.sum()), 3) if flag.any() else None,
            "review_recall": round(float((flag & fails).sum() / fails.sum()), 3) if fails.any() else None,
            "flagged": int(flag.sum()),
            "failures": int(fails.sum()),
            "median_z": round(float(np.median([float(r["z"]) for r in finite])), 3) if finite else None,  # type: ignore[arg-type]
            "median_inplane": round(float(np.median([float(r["inplane"]) for r in finite])), 3)
            if finite
            else None,  # type: ignore[arg-type]
            "median_geodesic": round(float(np.median([float(r["geodesic"]) for r in finite])), 3)
            if finite
            else None,  # type: ignore[arg-type]
            "seconds_per_part_frame": round(float(np.mean([float(r["seconds"]) for r in mine])), 2),  # type: ignore[arg-type]
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("benchmark", choices=("kneel1", "synth"))
    default = Path(os.environ.get("JTML_TEST_DATA", "../shared/data")) / "kneel1"
    parser.add_argument("--data", type=Path, default=default, help="kneel1 folder")
    parser.add_argument("--start", choices=("fft", "fft_perfect"), default="fft")
    parser.add_argument(
        "--out", type=Path, default=Path("data/synthetic/refine_bench"), help="synthetic study"
    )
    parser.add_argument("--frames", type=int, default=20)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--masks", choices=("true", "degraded", "both"), default="both")
    parser.add_argument("--stages", help="JSON list of stage dicts instead of DEFAULT_STAGES")
    parser.add_argument("--no-twin", action="store_true")
    parser.add_argument("--no-priors", action="store_true")
    parser.add_argument(
        "--image", action="store_true", help="masks refined by the frame's edges (image: true)"
    )
    parser.add_argument("--set", action="append", metavar="KEY=JSON", help="another registration setting")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--batch", type=int, help="candidate poses per render call (0: a whole generation)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    summary = run_kneel1(args) if args.benchmark == "kneel1" else run_synth(args)
    summary["wall_seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(summary), flush=True)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
