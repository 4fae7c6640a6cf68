"""Mask → pose on kneel1: train on renders of its STLs, score on its 3 true masks next to JTML's NFD.

    python benchmarks/pose_kneel1.py [--data $JTML_TEST_DATA/kneel1] [--markdown /tmp/pose_results.md]

1. ``jtml fit --config experiments/pose_from_mask.yaml`` with kneel1's STLs and calibration (the
   network never sees a kneel1 frame, mask or pose: only renders of the CAD models at random knee
   poses through that calibration);
2. ``jtml predict`` on the kneel1 study (its true masks, ``Labels/<part>/``) → ``<part>.jts``;
3. scores those files (the network's own poses, and for the tibia also after JointTrack's
   varus–valgus choice between a pose and its symmetric twin, which the prediction writer applies)
   and JTML's NFD estimates (``FFT/<part>_fft.jts``: from the network
   segmentation; ``FFT/<part>_fft_perfect.jts``: from the true silhouettes) against the tracked
   poses with the same metric (:func:`jtml.cli.score_poses.score`), and prints the table
   (also written as Markdown with the machine and wall time to ``--markdown``).

Every step goes through the ``jtml`` CLI, i.e. the same LightningCLI code and experiment YAML as any
run; extra ``jtml fit`` arguments can follow ``--``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

from jtml.cli.score_poses import score
from jtml.io.study import load_study

ROOT = Path(__file__).resolve().parents[1]
AXES = ("x", "y", "z", "z_rot", "x_rot", "y_rot")


def jtml(*args: str) -> list[str]:
    """Run ``jtml`` (this checkout's), echo its stderr tail on failure, return its stdout lines."""
    cmd = [sys.executable, "-m", "jtml.cli", *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"failed ({proc.returncode}): jtml {' '.join(args)}")
    return proc.stdout.splitlines()


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()}-core CPU ({cpu}), no GPU, torch {__import__('torch').__version__}"


def row(name: str, part: str, r: dict) -> str:
    t = r["trap_aware"]
    cells = [f"{r[a]['mean']:.2f}" if a != "z" else f"{r[a]['mean']:.1f}" for a in AXES]
    success = r["success"]["inplane_5mm_5deg"]
    cells += [f"{r['geodesic']['mean']:.2f}", f"{r['mtre']['mean']:.1f}", f"{success:.2f}"]
    cells += [f"{r['trap_rate']:.2f}", f"{t['geodesic']['mean']:.2f}", f"{t['z']['mean']:.1f}"]
    return f"| {part} | {name} | " + " | ".join(cells) + " |"


HEADER = (
    "| part | method | x mm | y mm | z mm | z_rot ° | x_rot ° | y_rot ° | geodesic ° | mTRE mm "
    "| in-plane 5 mm/5° | trap rate | trap-aware geodesic ° | trap-aware z mm |\n|" + "---|" * 14
)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default = (
        Path(os.environ.get("JTML_TEST_DATA", "")) / "kneel1" if os.environ.get("JTML_TEST_DATA") else None
    )
    parser.add_argument(
        "--data", type=Path, default=default, help="the kneel1 folder ($JTML_TEST_DATA/kneel1)"
    )
    parser.add_argument("--config", default=str(ROOT / "experiments" / "pose_from_mask.yaml"))
    parser.add_argument(
        "--root", default=str(ROOT / "runs"), help="where the runs go (trainer.default_root_dir)"
    )
    parser.add_argument("--ckpt", help="skip training: score this checkpoint")
    parser.add_argument("--markdown", type=Path, help="also write the table (Markdown) here")
    args = parser.parse_args(argv)
    if args.data is None or not args.data.is_dir():
        parser.error("give --data KNEEL1 (or set JTML_TEST_DATA)")
    data = args.data.resolve()
    study = load_study(data)
    models = {part: study.models[part] for part in ("fem", "tib")}
    common = [
        "--config",
        args.config,
        "--trainer.default_root_dir",
        args.root,
        "--trainer.enable_progress_bar",
        "false",
        "--data.init_args.models.fem",
        str(models["fem"]),
        "--data.init_args.models.tib",
        str(models["tib"]),
        "--data.init_args.calibration",
        str(study.calibration),
    ]
    started = time.time()
    ckpt = args.ckpt
    fit_seconds = 0.0
    if ckpt is None:
        summary = json.loads(jtml("fit", *common, *extra)[-1])
        ckpt = summary["checkpoint"]
        fit_seconds = time.time() - started
        print(f"trained in {fit_seconds / 60:.1f} min: {ckpt}", flush=True)
    lines = jtml("predict", *common, "--ckpt_path", str(ckpt), "--data.init_args.studies", f"[{data}]")
    paths = [Path(m) for line in lines for m in re.findall(r"wrote (\S+\.(?:jts|jtak))\b", line)]
    written = {p.stem: p for p in paths}
    total = time.time() - started
    table = [HEADER]
    results: dict[str, dict] = {}
    for part in ("fem", "tib"):
        truth = study.poses[part]
        raw = written[part].with_name(f"{part}_network.jts")
        candidates = {"network (mask → pose)": raw if raw.is_file() else written[part]}
        if raw.is_file():  # the writer applied JointTrack's varus-valgus rule to the symmetric trap
            candidates["network + varus–valgus twin rule"] = written[part]
        candidates["NFD fft"] = data / "FFT" / f"{part}_fft.jts"
        candidates["NFD fft_perfect"] = data / "FFT" / f"{part}_fft_perfect.jts"
        for name, path in candidates.items():
            r = score(truth, path, models[part], study.calibration, 1024, part)
            results[f"{part}/{name}"] = r
            table.append(row(name, part, r))
    text = "\n".join(table)
    print(text)
    net_z = {p: results[f"{p}/network (mask → pose)"]["z"]["mean"] for p in ("fem", "tib")}
    nfd_z = {p: results[f"{p}/NFD fft"]["z"]["mean"] for p in ("fem", "tib")}
    verdict = ", ".join(
        f"{p}: network z {net_z[p]:.1f} mm vs NFD fft {nfd_z[p]:.1f} mm "
        f"({'beats' if net_z[p] < nfd_z[p] else 'LOSES'})"
        for p in ("fem", "tib")
    )
    print(verdict)
    if args.markdown:
        body = "\n".join(
            [
                "## Pose from masks on kneel1 (benchmarks/pose_kneel1.py)",
                "",
                f"Network: `{Path(args.config).name}` trained only on renders of kneel1's STLs through its",
                "calibration (random knee poses), applied to the 3 true masks; NFD rows: JTML's",
                "Fourier-descriptor initial poses. Mean absolute errors over the 3 frames (trap-aware: per",
                "frame the better of the pose and its symmetric twin; varus–valgus twin rule: JointTrack's",
                "choice of the tibia twin with the smaller varus–valgus angle relative to the femur, applied",
                "by the prediction writer). In-plane 5 mm/5°: in-plane translation",
                "error ≤ 5 mm and geodesic ≤ 5°.",
                "",
                text,
                "",
                verdict,
                "",
                f"Machine: {machine()}. Wall time {total / 60:.1f} min (fit {fit_seconds / 60:.1f} min);",
                f"checkpoint `{ckpt}`; extra fit arguments: `{' '.join(extra) or 'none'}`.",
                "",
            ]
        )
        args.markdown.write_text(body)
        print(f"wrote {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
