"""`jtml track` end to end on a small `jtml synth --sequence` study with tiny networks (one-step
fits of the demo YAMLs): every output, checked against independent computations; registration
improving on the network's pose where the masks are true; a SIGKILL halfway and a resumed run equal
to an uninterrupted one; each bad input one error line, exit 2, nothing written; and the pieces
(SE(3) smoothing, the journal, stage files) on their own."""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import io
import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from jtml.cli import main
from jtml.errors import JTMLError
from jtml.geometry import Camera, pose_to_matrix, render_silhouette
from jtml.io import read_calibration, read_image, read_mask, read_poses, read_stl, write_poses
from jtml.sim.synth import generate_study
from jtml.track.journal import JOURNAL_NAME, PARTIAL_NAME, Journal
from jtml.track.settings import load_stages
from jtml.track.smoothing import rotation_mean, smooth_poses

ROOT = Path(__file__).resolve().parents[1]
FRAMES, SIZE = 6, 128
PARTS = ("fem", "tib")
# A registration budget that keeps each run to seconds on 2 cores (the defaults take minutes).
TINY = """\
stages:
  - {range: [8, 8, 30, 12, 12, 12], scale: 0.5, population: 6, generations: 2}
  - {range: [1.5, 1.5, 6, 3, 3, 3], population: 4, generations: 2, edge_weight: 0.05}
"""
SMALL = """\
stages:
  - {range: [10, 10, 40, 15, 15, 15], scale: 0.5, population: 8, generations: 6}
  - {range: [2, 2, 10, 3, 3, 3], population: 6, generations: 5, edge_weight: 0.05}
"""


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def _fit(config: str, root: Path, *extra: str) -> Path:
    config = str(ROOT / "experiments" / config)
    code, out, err = _run(["fit", "--config", config, "--trainer.fast_dev_run", "1",
                           "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
                           "--trainer.default_root_dir", str(root), *extra])  # fmt: skip
    assert code == 0, err[-3000:]
    return Path(json.loads(out.strip().splitlines()[-1])["checkpoint"])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A 6-frame right-knee sequence at 128 px, a one-step segmentation and pose network, stage files."""
    tmp = tmp_path_factory.mktemp("track")
    study = generate_study(tmp / "seq", frames=FRAMES, seed=3, size=SIZE, sequence=True, progress=False)
    seg = _fit("demo_seg.yaml", tmp / "runs", "--data.init_args.synthetic", "null",
               "--data.init_args.studies", f"[{study}]", "--data.init_args.image_size", "64",
               "--data.init_args.batch_size", "2", "--data.init_args.num_workers", "0")  # fmt: skip
    pose = _fit("demo_pose.yaml", tmp / "runs", "--data.init_args.synthetic", "null",
                "--data.init_args.image_size", str(SIZE), "--data.init_args.train_samples", "8",
                "--data.init_args.val_samples", "4", "--data.init_args.batch_size", "4",
                "--data.init_args.num_workers", "0", "--data.init_args.roi_size", "32",
                "--model.init_args.backbone", "resnet10t", "--model.init_args.head_hidden", "32")  # fmt: skip
    (tmp / "tiny.yaml").write_text(TINY)
    (tmp / "small.yaml").write_text(SMALL)
    return {"tmp": tmp, "study": study, "seg": seg, "pose": pose}


def _args(
    s: dict, out: Path, *extra: str, seg: bool = True, stages: str = "tiny.yaml", parts: tuple = PARTS
) -> list[str]:
    study = s["study"]
    segmentation = ["--seg", str(s["seg"])] if seg else []
    models = [a for p in parts for a in ("--model", f"{p}={study / f'{p}.stl'}")]
    return ["track", "--study", str(study), "--pose", str(s["pose"]), *segmentation, *models,
            "--stages", str(s["tmp"] / stages), "--out", str(out), *extra]  # fmt: skip


def _report(out: Path) -> list[dict[str, str]]:
    with open(out / "report.csv", newline="") as f:
        return list(csv.DictReader(f))


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    return float((a & b).sum() / max((a | b).sum(), 1))


@pytest.fixture(scope="module")
def reference(setup):
    """One uninterrupted track (segmentation → pose network → registration) of the study."""
    out = setup["tmp"] / "reference"
    code, stdout, err = _run(_args(setup, out))
    assert code == 0, err[-3000:]
    return out, json.loads(stdout.strip().splitlines()[-1]), err


# -- the outputs ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_track_writes_every_output(setup, reference):
    from jtml import api
    from jtml.kinematics import FLEXION, knee_kinematics

    out, summary, err = reference
    study = setup["study"]
    frames = sorted(study.glob("*.tif"))
    (record,) = summary["studies"]
    assert record["frames"] == FRAMES and record["side"] == "right"  # the pose checkpoint's data side
    assert "side right (the pose checkpoint's data side)" in err and f"tracked {study.name}" in err
    assert not (out / PARTIAL_NAME).exists()  # the journal goes once the outputs are in
    # The masks are the segmentation network's, as `jtml predict` / api.Segmenter compute them.
    segmenter = api.Segmenter.from_checkpoint(setup["seg"])
    expected = segmenter([read_image(f) for f in frames])
    calib = read_calibration(study / "calibration.txt")
    camera = Camera.from_calibration(calib, SIZE, SIZE)
    poser = api.PoseEstimator.from_checkpoint(setup["pose"])
    report = {(r["frame"], r["part"]): r for r in _report(out)}
    assert sorted(report) == sorted((f.stem, p) for f in frames for p in PARTS)
    from jtml.registration.costs import SilhouetteTarget

    written = {
        p: np.stack([read_mask(out / "masks" / p / f"{f.stem}_label_{p}.tif") for f in frames]) for p in PARTS
    }
    for part in PARTS:
        masks = written[part]
        np.testing.assert_array_equal(masks, expected[part])
        # the network's poses: PoseModule.estimate on those masks (NaN where a mask is empty: .jtak)
        (net_file,) = out.glob(f"{part}_network.jt*")
        network = read_poses(net_file, n_frames=FRAMES, allow_missing=True)
        np.testing.assert_allclose(network, poser(masks, calib, part=part), rtol=0, atol=1e-9)
        (pose_file,) = out.glob(f"{part}.jt*")
        poses = read_poses(pose_file, n_frames=FRAMES, allow_missing=True)
        mesh = read_stl(study / f"{part}.stl")
        for i, frame in enumerate(frames):
            row = report[(frame.stem, part)]
            assert row["review"] in ("0", "1") and row["start"] in ("network", "previous", "")
            if not np.isfinite(poses[i]).all():
                assert row["cost"] == "" and row["review"] == "1" and row["reason"]
                continue
            # the reported IoU is the written pose's silhouette against the mask the search used: with
            # --seg the written mask refined by the frame (the other parts' masks excluded), binary
            others = np.logical_or.reduce([written[q][i] > 0 for q in PARTS if q != part])
            used = SilhouetteTarget.from_frame(read_image(frame), masks[i], others).mask
            render = render_silhouette(mesh, poses[i], camera)
            assert float(row["iou"]) == pytest.approx(_iou(render, used), abs=1e-9)
            assert i > 0 or row["start"] == "network"  # the first frame has no previous one
            costs = dict(kv.split("=") for kv in row["start_costs"].split())
            assert (
                float(row["cost"]) <= min(float(c) for c in costs.values()) + 1e-12
                or row["twin_rule"] != "cost"
            )
    # kinematics.csv: jtml.kinematics on the written poses, the right knee, with both models
    fem = read_poses(next(out.glob("fem.jt*")), allow_missing=True)
    tib = read_poses(next(out.glob("tib.jt*")), allow_missing=True)
    table = knee_kinematics(fem, tib, "right", fem_model=read_stl(study / "fem.stl"),
                            tib_model=read_stl(study / "tib.stl"))  # fmt: skip
    with open(out / "kinematics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == FRAMES and set(table) <= set(rows[0])
    for i, row in enumerate(rows):
        for column, values in table.items():
            if math.isfinite(values[i]):
                assert float(row[column]) == pytest.approx(values[i], abs=1e-6), column
            else:
                assert row[column] == ""
    assert FLEXION in rows[0]
    for plot in ("rotations.png", "translations.png", "grood_suntay.png", "condyles.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    flagged = sum(any(report[(f.stem, p)]["review"] == "1" for p in PARTS) for f in frames)
    assert record["frames_flagged"] == flagged
    assert json.loads((out / "track.json").read_text())["fingerprint"] == record["fingerprint"]
    # a second run into the finished folder is refused, and leaves it as it was
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    code, _, err = _run(_args(setup, out))
    assert code == 2 and "not empty" in err and "--overwrite" in err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def _centres(poses: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Where each pose puts the model's bounding-box centre (camera frame, mm)."""
    c = (vertices.min(axis=0) + vertices.max(axis=0)) / 2
    T = pose_to_matrix(torch.from_numpy(poses)).numpy()
    return T[:, :3, :3] @ c + T[:, :3, 3]


@pytest.mark.slow
def test_registration_improves_on_the_networks_pose_where_the_masks_are_true(setup):
    """``--masks`` (the study's true labels) skips segmentation: every registered pose's silhouette
    fits its mask at least as well as the network's, and the model comes closer to the truth: its
    centre nearer in median, in-plane within half the network's distance for at least one part (a
    one-step network's poses can be ~1 m off in depth and far off in rotation, beyond any search's
    reach: only the fit and the in-plane position can be asked of it then)."""
    study, out = setup["study"], setup["tmp"] / "true_masks"
    code, _, err = _run(_args(setup, out, "--masks", str(study / "Labels"), seg=False, stages="small.yaml"))
    assert code == 0, err[-3000:]
    assert not (out / "masks").exists()  # given masks are not written again
    camera = Camera.from_calibration(read_calibration(study / "calibration.txt"), SIZE, SIZE)
    frames = sorted(study.glob("*.tif"))
    report = {(r["frame"], r["part"]): r for r in _report(out)}
    gains, starts, halved = [], set(), []
    for part in PARTS:
        mesh = read_stl(study / f"{part}.stl")
        truth = read_poses(study / f"{part}.jts")
        network = read_poses(next(out.glob(f"{part}_network.jt*")), allow_missing=True)
        tracked = read_poses(next(out.glob(f"{part}.jt*")), allow_missing=True)
        assert np.isfinite(tracked).all() and np.isfinite(network).all()  # true masks are never empty
        for i, frame in enumerate(frames):
            mask = read_mask(study / "Labels" / part / f"{frame.stem}_label_{part}.tif")
            before = _iou(render_silhouette(mesh, network[i], camera), mask)
            after = _iou(render_silhouette(mesh, tracked[i], camera), mask)
            assert after >= before - 1e-9, (part, i, before, after)
            gains.append(after - before)
            starts.add(report[(frame.stem, part)]["start"])
        c_true = _centres(truth, mesh.vertices)
        d_net, d_reg = (_centres(p, mesh.vertices) - c_true for p in (network, tracked))
        assert np.median(np.linalg.norm(d_reg, axis=1)) <= np.median(np.linalg.norm(d_net, axis=1)), part
        inplane_net, inplane = (np.median(np.hypot(d[:, 0], d[:, 1])) for d in (d_net, d_reg))
        assert inplane < inplane_net, (part, inplane_net, inplane)
        halved.append(inplane < 0.5 * inplane_net)
    assert any(halved)  # where the network's rotation is near enough, the silhouette pins the position
    assert np.mean(gains) > 0.1
    assert "previous" in starts  # the sequence carries poses from frame to frame


@pytest.mark.slow
def test_backward_pass_and_se3_smoothing(setup):
    """The tibia alone (its model renders fast), forward, then forward + backward with smoothing."""

    def track(out: Path, *extra: str) -> str:
        argv = _args(setup, out, "--masks", str(setup["study"] / "Labels"), *extra, seg=False, parts=("tib",))
        code, stdout, err = _run(argv)
        assert code == 0, err[-3000:]
        return stdout

    forward_out, out = setup["tmp"] / "tib_forward", setup["tmp"] / "tib_backward"
    track(forward_out)
    stdout = track(out, "--backward", "--smooth", "3")
    assert not (out / "kinematics.csv").exists()  # the femur is not tracked: no kinematics, no side needed
    registered = read_poses(next(out.glob("tib_registered.jt*")), allow_missing=True)
    smoothed = read_poses(next(out.glob("tib.jt*")), allow_missing=True)
    np.testing.assert_allclose(smoothed, smooth_poses(registered, 3), atol=1e-9)
    assert not np.allclose(smoothed, registered)
    forward = {r["frame"]: r for r in _report(forward_out)}
    report = _report(out)
    assert [r["part"] for r in report] == ["tib"] * FRAMES
    for r in report:
        # the backward pass keeps a frame's forward result unless its own search fits better
        before = forward[r["frame"]]
        assert r["start"] in ("network", "previous", "next")
        if r["start"] != "next":
            assert {k: v for k, v in r.items() if k != "seconds"} == {
                k: v for k, v in before.items() if k != "seconds"
            }
        else:
            assert before["cost"] == "" or float(r["cost"]) < float(before["cost"])
    assert report[-1]["start"] != "next"  # the last frame has no next one
    record = json.loads(stdout.strip().splitlines()[-1])["studies"][0]
    assert record["smooth"] == 3 and record["this_run"]["tracked_frames"] == 2 * FRAMES - 1


def test_wandb_gets_the_kinematics_and_iou_curves_per_frame(setup):
    """``--wandb``: the offline W&B run (in OUT/wandb) holds every kinematics.csv column and each
    part's IoU of report.csv, one point per frame at step = frame, and the plots."""
    from jtml.kinematics import FLEXION, INTERNAL
    from jtml.runs.wandb_offline import read_offline_run

    out = setup["tmp"] / "wandb"
    argv = _args(setup, out, "--masks", str(setup["study"] / "Labels"), "--wandb", "jtml-test", seg=False)
    code, stdout, err = _run(argv)
    assert code == 0, err[-3000:]
    (folder,) = (out / "wandb").glob("offline-run-*")
    run = read_offline_run(folder)
    with open(out / "kinematics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for column in (FLEXION, INTERNAL):
        steps = [h["trainer/global_step"] for h in run.history if f"kinematics/{column}" in h]
        values = [h[f"kinematics/{column}"] for h in run.history if f"kinematics/{column}" in h]
        assert steps == list(range(FRAMES))
        np.testing.assert_allclose(values, [float(r[column]) for r in rows], atol=1e-6)
    report = _report(out)
    for part in PARTS:
        series = [h[f"registration/{part}_iou"] for h in run.history if f"registration/{part}_iou" in h]
        np.testing.assert_allclose(series, [float(r["iou"]) for r in report if r["part"] == part], atol=1e-12)
    assert (
        run.summary["frames_flagged"]
        == json.loads(stdout.strip().splitlines()[-1])["studies"][0]["frames_flagged"]
    )
    assert any("kinematics/plots/count" in h for h in run.history)
    assert run.config["side"] == "right" and run.config["studies"] == [str(setup["study"])]


# -- resume after SIGKILL ---------------------------------------------------------------------------------

_KILLER = """
import os, signal, sys
from jtml.track import journal
append, count = journal.Journal.append, [0]
def killing_append(self, record):
    append(self, record)
    count[0] += 1
    if count[0] == {after}:
        os.kill(os.getpid(), signal.SIGKILL)  # uncatchable, like a pre-empted or OOM-killed job
journal.Journal.append = killing_append
from jtml.cli.main import main
sys.exit(main({argv!r}))
"""


@pytest.mark.slow
def test_a_killed_run_resumes_redoes_no_finished_frame_and_equals_an_uninterrupted_run(
    setup, reference, monkeypatch
):
    out = setup["tmp"] / "killed"
    argv = _args(setup, out)
    half = FRAMES // 2
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(_KILLER.format(after=half, argv=argv))],
                          capture_output=True, text=True, timeout=600, env=env)  # fmt: skip
    assert proc.returncode == -9, proc.stderr[-3000:]
    journal = out / PARTIAL_NAME / JOURNAL_NAME
    lines = journal.read_text().splitlines()
    assert len(lines) == 1 + half  # the header and the finished frames; no final output yet
    assert not (out / "fem.jts").exists() and not (out / "report.csv").exists()
    with open(journal, "a") as f:  # a kill in the middle of a line leaves it torn: it is dropped
        f.write('{"pass": "forward", "frame": 3, "par')
    # Run it again (in this process) and watch which frames it registers: frame i is seeded seed + i.
    import jtml.track.module as module

    registered: list[int] = []
    refine = module.refine_with_twin

    def spy(renderer, target, start, stages, seed, *args, **kwargs):
        registered.append(seed)
        return refine(renderer, target, start, stages, seed, *args, **kwargs)

    monkeypatch.setattr(module, "refine_with_twin", spy)
    code, stdout, err = _run(argv)
    assert code == 0, err[-3000:]
    assert sorted(set(registered)) == list(range(half, FRAMES))  # no finished frame redone
    this_run = json.loads(stdout.strip().splitlines()[-1])["studies"][0]["this_run"]
    assert this_run["resumed_frames"] == half and this_run["tracked_frames"] == FRAMES - half
    assert not (out / PARTIAL_NAME).exists()
    ref = reference[0]
    files = sorted(p.relative_to(ref) for p in ref.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    for rel in files:
        if rel.name == "report.csv":  # equal but for the seconds the searches took
            strip = [{k: v for k, v in r.items() if k != "seconds"} for r in _report(out)]
            assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in _report(ref)]
        elif rel.name == "track.json":
            a, b = (json.loads((d / rel).read_text()) for d in (out, ref))
            for d in (a, b):
                d.pop("this_run"), d.pop("out"), d.get("inputs", {}).pop("study", None)
            assert a == b
        elif rel.suffix in (".jts", ".jtak"):  # equal to 1e-6 (another process, another sum order)
            np.testing.assert_allclose(read_poses(out / rel), read_poses(ref / rel), rtol=0, atol=1e-6)
        elif rel.suffix not in (".png", ".csv"):  # plots: matplotlib may stamp metadata
            assert (out / rel).read_bytes() == (ref / rel).read_bytes(), rel
        elif rel.suffix == ".csv":  # kinematics.csv: from those poses
            a, b = (np.genfromtxt(d / rel, delimiter=",", skip_header=1) for d in (out, ref))
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-6, equal_nan=True)


# -- bad input ------------------------------------------------------------------------------------------


def _refused(argv: list[str], out: Path, *needles: str) -> str:
    code, _, err = _run(argv)
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error:")]
    assert code == 2 and len(lines) == 1, err[-2000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not out.exists()  # nothing written
    return lines[0]


def test_a_side_that_is_not_left_or_right_is_refused_before_any_file_is_read(tmp_path):
    argv = ["track", "--study", str(tmp_path / "nowhere"), "--pose", str(tmp_path / "none.ckpt"),
            "--seg", str(tmp_path / "none.ckpt"), "--model", "fem=x.stl", "--side", "up",
            "--out", str(tmp_path / "out")]  # fmt: skip
    _refused(argv, tmp_path / "out", "side must be 'left' or 'right'", "'up'")


@pytest.mark.slow
def test_bad_input_is_one_error_exit_2_and_nothing_written(setup, tmp_path):
    study = setup["study"]
    out = tmp_path / "out"
    # checkpoints of the wrong kind
    wrong = _args(setup, out)
    wrong[wrong.index("--seg") + 1] = str(setup["pose"])
    _refused(wrong, out, str(setup["pose"]), "--seg takes a segmentation", "this is a pose")
    wrong = _args(setup, out)
    wrong[wrong.index("--pose") + 1] = str(setup["seg"])
    _refused(wrong, out, "--pose takes a pose", "this is a segmentation")
    # a start-pose file with fewer rows than frames
    short = tmp_path / "short.jts"
    write_poses(short, read_poses(study / "fem.jts")[:-1])
    _refused(
        _args(setup, out, "--init", f"fem={short}"), out, str(short), f"but the study has {FRAMES} frame"
    )
    # no side given, and a pose checkpoint that records none it could default to
    ckpt = torch.load(setup["pose"], map_location="cpu", weights_only=True)
    ckpt["datamodule_hyper_parameters"]["side"] = "both"
    both = tmp_path / "both.ckpt"
    torch.save(ckpt, both)
    no_side = _args(setup, out)
    no_side[no_side.index("--pose") + 1] = str(both)
    _refused(no_side, out, "--side left|right is required", "'both'")
    # frames of another size than the others (the calibration's)
    odd = tmp_path / "odd"
    shutil.copytree(study, odd)
    frames = sorted(odd.glob("*.tif"))
    import cv2

    cv2.imwrite(str(frames[2]), np.zeros((96, 96), np.uint8))
    odd_args = _args(setup, out)
    odd_args[odd_args.index("--study") + 1] = str(odd)
    _refused(odd_args, out, str(frames[2]), "frame is 96x96", f"is {SIZE}x{SIZE}")
    # a calibration whose principal point misses the frames: made for frames of another size
    far = tmp_path / "calibration.txt"
    calib = read_calibration(study / "calibration.txt")
    far.write_text(f"JT_INTCALIB\n{calib.pd}\n{calib.pp * SIZE}\n0\n{calib.pp}\n")
    _refused(_args(setup, out, "--calibration", str(far)), out, str(far), "outside the 128x128 frames")
    # a mask folder without one of the frames' masks
    labels = tmp_path / "labels"
    shutil.copytree(study / "Labels", labels)
    missing = sorted((labels / "tib").glob("*.tif"))[4]
    missing.unlink()
    _refused(_args(setup, out, "--masks", str(labels), seg=False), out, str(missing), "no tib mask")
    # the study folder as --out (its true poses would be overwritten), even with --overwrite
    code, _, err = _run(_args(setup, study, "--overwrite"))
    assert code == 2 and "is the study folder itself" in err
    # a journal of other settings is not continued (nor silently replaced)
    other = tmp_path / "other"
    Journal(other, "another run's fingerprint", FRAMES).open()
    code, _, err = _run(_args(setup, other))
    assert code == 2 and "interrupted `jtml track` with other inputs" in err


# -- the pieces ------------------------------------------------------------------------------------------


def test_smoothing_averages_rotations_on_so3_not_euler_angles():
    # z_rot 175, 179, -179, 177 degrees lie within 5 degrees of 180: averaging the angles would put
    # frame 2 at about 59 degrees; the chordal mean keeps every frame near 180.
    poses = np.zeros((5, 6))
    poses[:, 2] = -1000.0
    poses[:, 3] = [175.0, 179.0, -179.0, 177.0, 0.0]
    poses[:, 0] = [0.0, 1.0, 2.0, 3.0, 0.0]
    poses[4] = np.nan
    out = smooth_poses(poses, 3)
    assert np.isnan(out[4]).all()  # a gap stays a gap, and is left out of its neighbour's window
    # window means on the circle (-179 is 181)
    np.testing.assert_allclose(np.mod(out[:4, 3], 360.0), [177.0, 535 / 3, 179.0, 179.0], atol=0.01)
    np.testing.assert_allclose(out[:4, 0], [0.5, 1.0, 2.0, 2.5])
    np.testing.assert_allclose(out[:4, [1, 2, 4, 5]], poses[:4, [1, 2, 4, 5]], atol=1e-9)
    np.testing.assert_allclose(smooth_poses(poses, 0), poses, equal_nan=True)
    with pytest.raises(JTMLError, match="odd"):
        smooth_poses(poses, 4)
    # the chordal mean of rotations about one axis, symmetric about 20 degrees, is the one by 20
    angles = np.radians([10.0, 20.0, 30.0])
    R = np.stack([[[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]] for a in angles])
    np.testing.assert_allclose(rotation_mean(R), R[1], atol=1e-12)


def test_journal_drops_a_torn_line_and_refuses_other_settings(tmp_path):
    journal = Journal(tmp_path, "fp", 3)
    assert journal.state() == "absent" and journal.open() == []
    journal.append({"pass": "forward", "frame": 0, "parts": {}})
    journal.append({"pass": "forward", "frame": 1, "parts": {"fem": {"pose": [0.1, 1 / 3, -1e3, 0, 0, 0]}}})
    with pytest.raises(JTMLError, match="out of order"):
        journal.append({"pass": "forward", "frame": 3, "parts": {}})
    with open(journal.path, "a") as f:
        f.write('{"pass": "forward", "fra')
    again = Journal(tmp_path, "fp", 3)
    assert again.state() == "same"
    records = again.open()
    assert [r["frame"] for r in records] == [0, 1]
    assert records[1]["parts"]["fem"]["pose"][1] == 1 / 3  # floats come back exact
    assert journal.path.read_text().endswith("}\n")  # the torn tail was cut off
    again.append({"pass": "forward", "frame": 2, "parts": {}})
    again.append({"pass": "backward", "frame": 1, "parts": {}})  # after the forward pass: N-2 down to 0
    assert [(r["pass"], r["frame"]) for r in Journal(tmp_path, "fp", 3).open()][-2:] == [
        ("forward", 2),
        ("backward", 1),
    ]
    assert Journal(tmp_path, "other", 3).state() == "other"
    with pytest.raises(JTMLError, match="other inputs or settings"):
        Journal(tmp_path, "other", 3).open()
    assert Journal(tmp_path, "other", 3).open(restart=True) == []


def test_stage_files_and_their_errors(tmp_path):
    good = tmp_path / "stages.yaml"
    good.write_text(TINY)
    stages = load_stages(good)
    assert [s.population for s in stages] == [6, 4] and stages[1].edge_weight == 0.05
    assert [s.generations for s in stages] == [2, 2] and stages[0].scale == 0.5
    listed = tmp_path / "stages.json"
    listed.write_text(json.dumps([{"range": [1, 1, 1, 1, 1, 1], "generations": 2}]))
    assert load_stages(listed)[0].generations == 2
    for text, needle in (("stages: 3", "list of stages"), ("- {range: [1, 2]}", "6 positive numbers"),
                         ("- {range: [1, 1, 1, 1, 1, 1], speed: 2}", "known keys")):  # fmt: skip
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        with pytest.raises(JTMLError, match=needle) as e:
            load_stages(bad)
        assert str(bad) in str(e.value)


def test_benchmark_parses_its_arguments(capsys):
    spec = importlib.util.spec_from_file_location("track_benchmark", ROOT / "benchmarks" / "track.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    with pytest.raises(SystemExit) as e:
        bench.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in (
        "--frames",
        "--work",
        "--seg-config",
        "--pose-config",
        "--seg-ckpt",
        "--pose-ckpt",
        "--fast",
    ):
        assert flag in text
    args = bench.parse_args(["--work", "w", "--frames", "12"])
    assert args.frames == 12 and args.work == Path("w")


def _tibia_beside(femur: np.ndarray, flexion: float, varus: float) -> np.ndarray:
    """A tibia pose row at ``flexion``/``varus`` (°) relative to ``femur``: R_fem · Rz · Rx."""
    from jtml.geometry import euler312_to_matrix, matrix_to_euler312

    R_f = euler312_to_matrix(torch.as_tensor(femur[3:]))
    R_rel = euler312_to_matrix(torch.tensor([flexion, varus, 0.0], dtype=torch.float64))
    return np.array([*femur[:3] + [5.0, -40.0, 3.0], *matrix_to_euler312(R_f @ R_rel).numpy()])


@pytest.mark.parametrize(
    ("part", "vv_pose", "vv_twin", "ambiguity", "femur", "reference", "expect"),
    [
        ("tib", 4.0, 0.5, 0.95, True, False, ("twin", "varus-valgus")),  # nearer 0 by 3.5° > varus_sigma
        ("tib", 2.5, 0.0, 0.95, True, False, ("pose", "cost")),  # by 2.5° only: the cost decides
        ("tib", 6.0, 0.0, 0.5, True, False, ("pose", "cost")),  # not ambiguous: the cost decides
        ("tib", 6.0, 0.0, 0.95, False, True, ("twin", "continuity")),  # no femur: the previous pose
        ("fem", 0.0, 0.0, 0.95, False, True, ("twin", "continuity")),
        ("fem", 0.0, 0.0, 0.95, False, False, ("pose", "undecided")),
    ],
)
def test_track_twin_choice_takes_the_varus_valgus_rule_only_with_a_margin(
    part, vv_pose, vv_twin, ambiguity, femur, reference, expect
):
    from jtml.registration.search import RefineResult, TwinResult
    from jtml.track.module import REGISTRATION, choose_twin

    assert REGISTRATION.varus_sigma == 3.0  # the margin the cases above straddle
    fem = np.array([2.0, -3.0, -900.0, 20.0, 4.0, -6.0])
    pose, twin = _tibia_beside(fem, 40.0, vv_pose), _tibia_beside(fem, 52.0, vv_twin)
    result = TwinResult(
        best=RefineResult(pose, 0.10, 0.97, 10, 0.1, False),
        other=RefineResult(twin, 0.11, 0.96, 10, 0.1, False),
        chose_twin=False,
        ambiguity=ambiguity,
        review=False,
    )
    previous = twin + np.array([0, 0, 0, 1.0, 0, 0]) if reference else None  # 1° from the twin
    chosen, rule = choose_twin(part, result, 0.8, fem if femur else None, previous)
    assert (("twin" if chosen is result.other else "pose"), rule) == expect
