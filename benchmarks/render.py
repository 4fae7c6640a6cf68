"""Silhouette rendering speed: 1024² masks of a ~12k-triangle STL per second (CPU, one process).

Uses kneel1's femoral STL when ``JTML_TEST_DATA`` is set, else the built-in procedural femur
subdivided to a comparable triangle count. Prints one JSON line: ``{"render_masks_per_s": …}``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from jtml.geometry import Camera, SilhouetteRenderer
from jtml.io import Calibration, read_stl


def load_mesh():
    root = os.environ.get("JTML_TEST_DATA")
    if root and (Path(root) / "kneel1" / "KR_right_7_fem.stl").is_file():
        return read_stl(Path(root) / "kneel1" / "KR_right_7_fem.stl"), "kneel1 KR_right_7_fem.stl"
    from jtml.sim.implants import femoral_component

    mesh = femoral_component()
    while len(mesh.faces) < 12000:
        mesh = mesh.subdivide()
    return mesh, "procedural femur (subdivided)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=200, help="masks to render")
    args = parser.parse_args()
    mesh, name = load_mesh()
    cam = Camera.from_calibration(Calibration(1198.0, 0.0, 0.0, 0.373), 1024, 1024)
    renderer = SilhouetteRenderer(mesh, cam)
    rng = np.random.default_rng(0)
    poses = np.column_stack(
        [
            rng.uniform(-40, 40, args.n),
            rng.uniform(-40, 40, args.n),
            rng.uniform(-1100, -950, args.n),
            rng.uniform(-180, 180, (args.n, 3)),
        ]
    )
    renderer.render(poses[0])  # warm-up
    t0 = time.perf_counter()
    pixels = sum(int(renderer.render(p).sum()) for p in poses)
    dt = time.perf_counter() - t0
    area = pixels / args.n
    print(f"model: {name}, {len(mesh.faces)} triangles; {args.n} masks at 1024x1024; mean area {area:.0f} px")
    print(json.dumps({"render_masks_per_s": round(args.n / dt, 1)}))


if __name__ == "__main__":
    main()
