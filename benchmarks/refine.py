"""Registration on kneel1: JTML's NFD estimates refined to the true masks, before and after.

    python benchmarks/refine.py [--data $JTML_TEST_DATA/kneel1] [--start fft|fft_perfect] [--twin]

For each part and frame: the start (``FFT/<part>_<start>.jts``) refined by
:func:`jtml.registration.search.refine` (or ``refine_with_twin`` with ``--twin``) with
``DEFAULT_STAGES`` against the true mask (``Labels/<part>/``); prints per part-frame errors,
IoU, renders and seconds, then one JSON line with the mean |error| per axis before and after and
the seconds per part-frame. (The masks are the tracked poses' exact silhouettes: this measures the
search, not segmentation.)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
from pathlib import Path

import numpy as np

from jtml.geometry import Camera, SilhouetteRenderer, euler312_to_matrix, geodesic_angle
from jtml.io import list_images, read_calibration, read_mask, read_poses, read_stl
from jtml.registration.costs import SilhouetteTarget
from jtml.registration.search import refine, refine_with_twin

STL = {"fem": "KR_right_7_fem.stl", "tib": "KR_right_6_tib.stl"}


def errors(pose: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    d = np.abs(pose - truth)
    geo = geodesic_angle(euler312_to_matrix(pose[3:]), euler312_to_matrix(truth[3:]))
    return {"x": float(d[0]), "y": float(d[1]), "z": float(d[2]), "geodesic": math.degrees(float(geo))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = Path(os.environ.get("JTML_TEST_DATA", "../shared/data")) / "kneel1"
    parser.add_argument("--data", type=Path, default=default)
    parser.add_argument("--start", choices=("fft", "fft_perfect"), default="fft")
    parser.add_argument("--twin", action="store_true", help="refine the start and its twin, keep the better")
    args = parser.parse_args()
    camera = Camera.from_calibration(read_calibration(args.data / "calibration.txt"), 1024, 1024)
    frames = list_images(args.data)
    summary: dict[str, object] = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    }
    seconds = []
    for part, stl in STL.items():
        renderer = SilhouetteRenderer(read_stl(args.data / stl), camera)
        truth = read_poses(args.data / f"{part}.jts")
        starts = read_poses(args.data / "FFT" / f"{part}_{args.start}.jts")
        before, after = [], []
        for i, frame in enumerate(frames):
            target = SilhouetteTarget.from_mask(
                read_mask(args.data / "Labels" / part / f"{frame.stem}_label_{part}.tif")
            )
            if args.twin:
                twin = refine_with_twin(renderer, target, starts[i])
                result, extra = (
                    twin.best,
                    f" twin {twin.chose_twin} ratio {twin.ambiguity:.3f} review {twin.review}",
                )
            else:
                result, extra = refine(renderer, target, starts[i]), ""
                spent = result.seconds
            before.append(errors(starts[i], truth[i]))
            after.append(errors(result.pose, truth[i]))
            seconds.append(spent)
            e0, e1 = before[-1], after[-1]
            print(
                f"{part} {frame.stem}: z {e0['z']:6.2f} -> {e1['z']:5.2f} mm, in-plane "
                f"{max(e1['x'], e1['y']):.2f} mm, geodesic {e0['geodesic']:.2f} -> {e1['geodesic']:.2f} deg, "
                f"IoU {result.iou:.4f}, {result.evaluations} renders per search, {spent:.1f} s{extra}",
                flush=True,
            )
        for name, rows in (("before", before), ("after", after)):
            summary[f"{part}_{name}"] = {k: round(float(np.mean([r[k] for r in rows])), 3) for k in rows[0]}
    summary["seconds_per_part_frame"] = round(float(np.mean(seconds)), 1)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
