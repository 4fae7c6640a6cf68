"""`jtml refine` and its Lightning component: the dataset of frames, RegistrationModule under
`trainer.predict`, the writer's files, bad input, and 1 vs 2 DDP processes giving the same poses.

A tiny synthetic study (128², 3 frames) and a tiny search budget keep these tests about plumbing;
the search's accuracy is tested in tests/test_registration.py and measured by benchmarks/refine.py.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
import yaml

from jtml.cli import main
from jtml.data.registration import RegistrationDataModule, check_model, perturbed_starts
from jtml.errors import JTMLError
from jtml.geometry import Camera, SilhouetteRenderer, euler312_to_matrix, geodesic_angle
from jtml.io import read_calibration, read_poses, read_stl, write_mask, write_poses, write_stl
from jtml.registration.frame import RegistrationConfig, register_frame
from jtml.sim.synth import generate_study

PARTS = ("fem", "tib")
TINY = {  # a few generations: the plumbing, not the accuracy
    "stages": [
        {"range": [4, 4, 20, 8, 8, 8], "scale": 0.5, "population": 8, "generations": 4},
        {"range": [1, 1, 5, 2, 2, 2], "population": 6, "generations": 3},
    ]
}


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("refine")
    out = generate_study(root / "study", frames=3, seed=3, size=128, progress=False)
    for i, part in enumerate(PARTS):
        starts = perturbed_starts(read_poses(out / f"{part}.jts"), 1.0, 5.0, 2.0, seed=i)
        write_poses(root / f"{part}_start.jts", starts)
    config = {"model": {"class_path": "jtml.models.registration.RegistrationModule", "init_args": TINY}}
    (root / "tiny.yaml").write_text(yaml.safe_dump(config))
    return out


def _args(study: Path, out: Path, *extra: str, init: dict[str, Path] | None = None) -> list[str]:
    root = study.parent
    init = init or {p: root / f"{p}_start.jts" for p in PARTS}
    args = ["refine", "--study", str(study), "--calibration", str(study / "calibration.txt"), "--masks",
            str(study / "Labels"), "--out", str(out), "--config", str(root / "tiny.yaml")]  # fmt: skip
    for part, path in init.items():
        args += ["--model", f"{part}={study / f'{part}.stl'}", "--init", f"{part}={path}"]
    return [*args, *extra]


def _report(out: Path) -> list[dict[str, str]]:
    with (out / "report.csv").open() as fh:
        return list(csv.DictReader(fh))


def test_refine_writes_poses_report_and_overlays(study, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_args(study, out, "--overlays", "all")) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["frames"] == 3 and summary["refined"] == 6 and summary["not_refined"] == 0
    rows = _report(out)
    assert [(r["frame_row"], r["part"]) for r in rows] == [(str(i), p) for i in (1, 2, 3) for p in PARTS]
    keys = ("cost", "iou", "evaluations", "iterations", "seconds", "chose_twin", "ambiguity", "hit_bounds")
    assert all(key in rows[0] for key in (*keys, "outliers", "review", "refined", "reason"))
    assert all(r["refined"] == "1" and r["reason"] == "" and float(r["iou"]) > 0.5 for r in rows)
    assert all(int(r["evaluations"]) > 0 and int(r["iterations"]) > 0 for r in rows)
    assert all(r["varus_valgus"] != "" for r in rows if r["part"] == "tib")  # the tibia next to its femur
    for part in PARTS:
        poses = read_poses(out / f"{part}.jts", n_frames=3)
        # what the report says is what the pose file holds
        mine = [r for r in rows if r["part"] == part]
        got = np.array(
            [[float(r[c]) for c in ("x_tran", "y_tran", "z_tran", "z_rot", "x_rot", "y_rot")] for r in mine]
        )
        np.testing.assert_allclose(got, poses, rtol=1e-5, atol=1e-4)
        assert not np.allclose(poses, read_poses(study.parent / f"{part}_start.jts"))  # refined, not copied
    assert sorted(p.name for p in (out / "overlays").iterdir()) == [f"synth_000{i}.png" for i in range(3)]
    # an existing output is never mixed with a new run's
    assert main(_args(study, out)) == 2
    assert "not empty" in capsys.readouterr().err


def test_a_frame_that_cannot_be_refined_is_a_not_optimized_row_with_its_reason(study, tmp_path, capsys):
    """Frame 2's femur start is behind the source, frame 3's tibia start misses the image, frame 1's
    femur mask is empty: three explicit not-refined rows, NOT_OPTIMIZED in a .jtak, exit 0."""
    root = tmp_path / "study"
    generate_study(root, frames=3, seed=3, size=128, progress=False)
    write_mask(root / "Labels" / "fem" / "synth_0000_label_fem.tif", np.zeros((128, 128), np.uint8))
    fem, tib = (read_poses(study.parent / f"{p}_start.jts") for p in PARTS)
    fem[1, 2] = 50.0  # in front of the source
    tib[2, 0] = 4000.0  # far outside the field of view
    write_poses(tmp_path / "fem.jts", fem)
    write_poses(tmp_path / "tib.jts", tib)
    out = tmp_path / "out"
    args = _args(root, out, init={"fem": tmp_path / "fem.jts", "tib": tmp_path / "tib.jts"})
    args[args.index("--config") + 1] = str(study.parent / "tiny.yaml")
    assert main(args) == 0
    capsys.readouterr()
    rows = {(r["frame_row"], r["part"]): r for r in _report(out)}
    assert rows[("1", "fem")]["reason"] == "the mask is empty"
    assert "behind the X-ray source" in rows[("2", "fem")]["reason"]
    assert "misses the image" in rows[("3", "tib")]["reason"]
    bad = {("1", "fem"), ("2", "fem"), ("3", "tib")}
    assert all(rows[k]["refined"] == "0" and rows[k]["x_tran"] == "" for k in bad)
    assert all(r["refined"] == "1" for k, r in rows.items() if k not in bad)
    for part in PARTS:
        assert not (out / f"{part}.jts").exists()
        poses = read_poses(out / f"{part}.jtak", n_frames=3)
        missing = [int(k[0]) - 1 for k in bad if k[1] == part]
        assert np.isnan(poses[missing]).all() and np.isfinite(np.delete(poses, missing, axis=0)).all()
    assert len(list((out / "overlays").iterdir())) == 3  # every frame has a flagged part


def test_bad_input_is_one_error_and_nothing_is_written(study, tmp_path, capsys):
    out = tmp_path / "out"
    short = tmp_path / "short.jts"
    write_poses(short, read_poses(study.parent / "fem_start.jts")[:2])
    assert main(_args(study, out, init={"fem": short})) == 2
    err = capsys.readouterr().err
    assert "short.jts" in err and "2 pose row(s) but the study has 3 frame(s)" in err
    # a model with a hole
    mesh = read_stl(study / "fem.stl")
    holed = tmp_path / "holed.stl"
    write_stl(holed, trimesh.Trimesh(mesh.vertices, mesh.faces[1:], process=False))
    with pytest.raises(JTMLError, match="not watertight"):
        check_model(holed)
    args = _args(study, out, init={"fem": study.parent / "fem_start.jts"})
    args[args.index("--model") + 1] = f"fem={holed}"
    assert main(args) == 2
    assert "holed.stl" in capsys.readouterr().err
    args = _args(study, out)
    args[args.index("--masks") + 1] = str(tmp_path / "nowhere")
    assert main(args) == 2
    assert "mask folder not found" in capsys.readouterr().err
    assert (
        main([*_args(study, out, init={"fem": study.parent / "fem_start.jts"}), "--model", "tib=x.stl"]) == 2
    )
    assert "differ" in capsys.readouterr().err
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text(yaml.safe_dump({"model": {"init_args": {"stages": [{"range": [1, 1, 1]}]}}}))
    args = _args(study, out)
    args[args.index("--config") + 1] = str(bad_yaml)
    assert main(args) == 2
    assert "6 positive numbers" in capsys.readouterr().err
    assert not out.exists()


def test_datamodule_reports_per_frame_problems_instead_of_failing(study, tmp_path):
    labels = tmp_path / "labels"
    for part in PARTS:
        (labels / part).mkdir(parents=True)
    write_mask(labels / "fem" / "synth_0001_label_fem.tif", np.ones((128, 128), np.uint8))
    (labels / "fem" / "synth_0002_label_fem.tif").write_bytes(b"not a tiff")
    dm = RegistrationDataModule(
        str(study), init={p: str(study.parent / f"{p}_start.jts") for p in PARTS}, masks=str(labels)
    )
    dm.setup("predict")
    items = [dm.predict_dataset[i] for i in range(3)]
    assert items[0]["masks"]["fem"] is None and "no mask file" in items[0]["problems"]["fem"]
    assert items[1]["masks"]["fem"].shape == (128, 128) and "fem" not in items[1]["problems"]
    assert "cannot decode" in items[2]["problems"]["fem"]
    assert items[1]["starts"]["tib"].shape == (6,) and items[1]["models"]["fem"].endswith("fem.stl")
    with pytest.raises(JTMLError, match="either as init"):
        RegistrationDataModule(str(study))


def test_register_frame_on_arrays(study):
    """The API the pose writer calls: renderers, masks and start poses in, a result per part out; it
    refines (the cost falls from the start's), and a missing mask or start is a reason, not a pose."""
    calib = read_calibration(study / "calibration.txt")
    camera = Camera.from_calibration(calib, 128, 128)
    renderers = {p: SilhouetteRenderer(read_stl(study / f"{p}.stl"), camera) for p in PARTS}
    truth = {p: read_poses(study / f"{p}.jts")[0] for p in PARTS}
    masks = {p: renderers[p].render(truth[p]) for p in PARTS}
    starts = {p: read_poses(study.parent / f"{p}_start.jts")[0] for p in PARTS}
    config = RegistrationConfig.from_dict({**TINY, "priors": False})  # the image cost alone falls
    results = register_frame(renderers, masks, starts, config)
    assert list(results) == list(PARTS)
    for part in PARTS:
        r = results[part]
        assert r.refined and np.isfinite(r.pose).all() and r.evaluations > 0
        from jtml.registration.costs import SilhouetteTarget

        start_cost = SilhouetteTarget.from_mask(masks[part]).costs(renderers[part], starts[part][None], 0.05)
        assert r.cost < start_cost["cost"][0]
    assert np.isfinite(results["tib"].varus_valgus) and np.isfinite(results["tib"].offset)  # reported anyway
    joint = register_frame(renderers, masks, starts, RegistrationConfig.from_dict(TINY))
    assert joint["tib"].prior > 0 and np.isnan(joint["fem"].varus_valgus)
    again = register_frame(renderers, masks, starts, config)
    assert all(np.array_equal(again[p].pose, results[p].pose) for p in PARTS)  # seeded
    partial = register_frame(
        renderers, {"fem": None, "tib": masks["tib"]}, {**starts, "tib": np.full(6, np.nan)}, config
    )
    assert (
        partial["fem"].reason == "no mask for this frame"
        and partial["tib"].reason == "no start pose for this frame"
    )
    assert not partial["fem"].refined and np.isnan(partial["tib"].pose).all()


def test_refine_yaml_holds_the_default_settings():
    """`jtml refine` without --config and with experiments/refine.yaml register the same way."""
    from jtml.cli.refine import load_settings

    path = Path(__file__).resolve().parents[1] / "experiments" / "refine.yaml"
    from jtml.models.registration import RegistrationModule

    module = RegistrationModule(**load_settings(str(path)))
    assert module.config == RegistrationConfig() and module.cpu_threads == 1


def test_perturbed_starts_stay_within_their_bounds():
    truth = np.tile([10.0, -20.0, -1000.0, 30.0, -5.0, 8.0], (200, 1))
    starts = perturbed_starts(truth, 5.0, 40.0, 10.0, seed=0)
    d = starts - truth
    assert np.abs(d[:, :2]).max() <= 5.0 and np.abs(d[:, 2]).max() <= 40.0 and np.abs(d[:, :3]).max() > 30
    geo = np.degrees(
        geodesic_angle(euler312_to_matrix(starts[:, 3:]), euler312_to_matrix(truth[:, 3:])).numpy()
    )
    assert geo.max() <= 10.0 + 1e-9 and geo.max() > 8.0


@pytest.mark.slow
def test_two_ddp_processes_write_the_same_poses_as_one(study, tmp_path):
    """`jtml refine --devices 2 --strategy ddp` (gloo, CPU) in a subprocess: Lightning relaunches the
    command per rank, the ranks split the frames, rank zero gathers and writes — the same poses as
    one process, since every frame's search is seeded by the frame alone."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    outs = {}
    for devices in (1, 2):
        out = tmp_path / f"out{devices}"
        args = _args(study, out, "--accelerator", "cpu", "--devices", str(devices), "--strategy",
                     "ddp" if devices > 1 else "auto")  # fmt: skip
        proc = subprocess.run(
            [sys.executable, "-m", "jtml.cli", *args], capture_output=True, text=True, timeout=600, env=env
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        summaries = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        assert len(summaries) == 1, proc.stdout  # rank zero alone reports
        outs[devices] = out
    for part in PARTS:
        one, two = (read_poses(outs[d] / f"{part}.jts", n_frames=3) for d in (1, 2))
        assert np.array_equal(one, two), (one, two)
    r1, r2 = _report(outs[1]), _report(outs[2])
    assert [(r["frame_row"], r["part"], r["cost"]) for r in r1] == [
        (r["frame_row"], r["part"], r["cost"]) for r in r2
    ]


def test_renders_on_the_module_device_match_the_numpy_api(study):
    """The batched render (what registration evaluates) is the numpy API's render, pixel for pixel."""
    camera = Camera.from_calibration(read_calibration(study / "calibration.txt"), 128, 128)
    renderer = SilhouetteRenderer(read_stl(study / "fem.stl"), camera)
    poses = perturbed_starts(np.tile(read_poses(study / "fem.jts")[:1], (16, 1)), 10.0, 80.0, 30.0, seed=1)
    win = renderer.render_windows(torch.as_tensor(poses))
    for i, pose in enumerate(poses):
        mask, x0, y0 = renderer.render_window(pose)
        h, w = int(win.heights[i]), int(win.widths[i])
        assert (int(win.x0[i]), int(win.y0[i]), h, w) == (x0, y0, *mask.shape)
        assert np.array_equal(win.masks[i, :h, :w].numpy(), mask) and not win.masks[i, h:].any()


def test_the_module_takes_every_registration_setting_with_its_default():
    """RegistrationModule's arguments (the YAML's model keys) mirror RegistrationConfig's: a setting
    added to one and not the other, or a default that drifts, fails here."""
    import dataclasses
    import inspect

    from jtml.models.registration import RegistrationModule

    params = inspect.signature(RegistrationModule.__init__).parameters
    for f in dataclasses.fields(RegistrationConfig):
        assert f.name in params, f.name
        if f.name != "stages":
            assert params[f.name].default == f.default, f.name
    assert set(params) - {f.name for f in dataclasses.fields(RegistrationConfig)} == {"self", "cpu_threads"}
