"""`jtml labels` and `jtml index` through the real CLI entry point."""

from __future__ import annotations

import csv
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from jtml.cli import main
from jtml.data.index import read_index
from jtml.io import Calibration, read_mask, write_calibration, write_image, write_mask, write_poses


def _labels_args(study, out, parts=("fem", "tib")):
    stl = {"fem": "KR_right_7_fem.stl", "tib": "KR_right_6_tib.stl"}
    args = [
        "labels",
        "--images",
        str(study),
        "--calibration",
        str(study / "calibration.txt"),
        "--out",
        str(out),
    ]
    for p in parts:
        args += ["--model", f"{p}={study / stl[p]}", "--poses", f"{p}={study / (p + '.jts')}"]
    return args


def test_labels_reproduce_kneel1_hand_labels(kneel1, tmp_path, capsys):
    assert main(_labels_args(kneel1, tmp_path / "out")) == 0
    for part in ("fem", "tib"):
        written = sorted((tmp_path / "out" / part).iterdir())
        assert [p.name for p in written] == sorted(p.name for p in (kneel1 / "Labels" / part).iterdir())
        for path in written:
            ours = read_mask(path)
            truth = read_mask(kneel1 / "Labels" / part / path.name)
            assert ours.shape == (1024, 1024)
            assert int((ours != truth).sum()) == 0, path.name


def _copy_study(kneel1, dst):
    dst.mkdir()
    for name in (
        "AT_K1_V1_0160.tif",
        "AT_K1_V1_0170.tif",
        "calibration.txt",
        "KR_right_7_fem.stl",
        "fem.jts",
    ):
        shutil.copy(kneel1 / name, dst / name)
    return dst


@pytest.mark.parametrize(
    "mutate, problem",
    [
        (
            lambda d: (d / "fem.jts").write_text("JT_EULER_312\nh\n1,2,-1000,0,0,0\n"),
            "fem.jts: has 1 pose row",
        ),
        (
            lambda d: (d / "calibration.txt").write_text("JT_INTCALIB\n1198\n"),
            "calibration.txt: calibration has",
        ),
        (lambda d: (d / "KR_right_7_fem.stl").write_bytes(b""), "KR_right_7_fem.stl: STL file is empty"),
        (lambda d: (d / "fem.jts").unlink(), "fem.jts: pose file not found"),
        (
            lambda d: (d / "fem.jts").write_text("JT_EULER_312\nh\n0,0,-1000,0,0,0\n0,0,500,0,0,0\n"),
            "fem.jts: row 2 (AT_K1_V1_0170.tif): pose",
        ),
    ],
)
def test_labels_bad_input_one_error_nothing_written(kneel1, tmp_path, capsys, mutate, problem):
    study = _copy_study(kneel1, tmp_path / "study")
    mutate(study)
    args = _labels_args(study, tmp_path / "out", parts=("fem",))
    assert main(args) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln.lower()]
    assert len(err) == 1 and err[0].startswith("error: ") and problem in err[0], err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.tif"))


def test_cli_help_and_unknown_command():
    out = subprocess.run([sys.executable, "-m", "jtml.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "labels" in out.stdout and "fit" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "jtml.cli", "frobnicate"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown command" in bad.stderr


def _tiny_study(root, name, frames=3, size=32):
    d = root / name
    d.mkdir(parents=True)
    write_calibration(d / "calibration.txt", Calibration(1198.0, 0.0, 0.0, 0.373 * 1024 / size))
    rows = []
    for i in range(frames):
        img = np.full((size, size), 200, np.uint8)
        img[8:16, 8 + i : 16 + i] = 40
        write_image(d / f"{name}_{i:04d}.tif", img)
        mask = img < 100
        write_mask(d / "Labels" / "fem" / f"{name}_{i:04d}_label_fem.tif", mask)
        rows.append([i, 0.0, -1000.0, 0.0, 0.0, 0.0])
    write_poses(d / "fem.jts", np.array(rows))
    return d


def test_index_splits_by_study(tmp_path, capsys):
    studies = [_tiny_study(tmp_path, f"subject{i}") for i in range(5)]
    out = tmp_path / "index.csv"
    args = ["index", "--studies", *map(str, studies), "--out", str(out), "--val", "0.2", "--test", "0.2"]
    assert main([*args, "--seed", "3"]) == 0
    rows = read_index(out, parts=["fem"])
    assert len(rows) == 15
    by_study: dict[str, set[str]] = {}
    for r in rows:
        by_study.setdefault(r.study, set()).add(r.split)
        assert r.image.is_file() and r.masks["fem"].is_file() and r.calibration.is_file()
        assert r.poses["fem"][2] == -1000.0
    assert all(len(s) == 1 for s in by_study.values()), by_study  # no subject straddles splits
    assert sorted(next(iter(s)) for s in by_study.values()) == ["test", "train", "train", "train", "val"]
    # paths are relative to the CSV's folder so the index travels with its data
    with open(out) as fh:
        first = next(csv.DictReader(fh))
    assert not first["image"].startswith("/")
    # same seed, same split; the frame split mixes a study's frames across splits
    assert main([*args, "--seed", "3", "--out", str(tmp_path / "again.csv")]) == 0
    assert [r.split for r in read_index(tmp_path / "again.csv")] == [r.split for r in rows]
    assert main([*args, "--split-by", "frame", "--out", str(tmp_path / "frames.csv")]) == 0
    frame_rows = read_index(tmp_path / "frames.csv")
    assert any(len({r.split for r in frame_rows if r.study == s}) > 1 for s in by_study)


_SPLIT_LINE = re.compile(
    r"^  (train|val|test) +(\d+) frames? \(([\d.]+)%, asked ([\d.]+)%\) from (\d+) stud(?:y|ies)(?:: (.*))?$"
)


def _index_report(args: list[str], capsys) -> tuple[dict[str, dict], list[str], list]:
    """Run `jtml index`; its stderr split report parsed per split, its warning lines, the CSV rows."""
    assert main(args) == 0
    err = capsys.readouterr().err.splitlines()
    report = {}
    for line in err:
        if m := _SPLIT_LINE.match(line):
            names = dict(re.fullmatch(r"(\S+) \((\d+)\)", n).groups() for n in (m[6] or "").split(", ") if n)
            report[m[1]] = {
                "frames": int(m[2]),
                "percent": float(m[3]),
                "asked": float(m[4]),
                "studies": {k: int(v) for k, v in names.items()},
            }
    assert sorted(report) == ["test", "train", "val"], err
    return report, [ln for ln in err if "warning" in ln.lower()], read_index(args[args.index("--out") + 1])


def _frames_per_split(rows) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {s: {} for s in ("train", "val", "test")}
    for r in rows:
        out[r.split][r.study] = out[r.split].get(r.study, 0) + 1
    return out


def test_index_reports_the_split_made_and_warns_when_it_misses_the_request(tmp_path, capsys):
    """3 studies cannot be split 70/20/10 by study: the report shows thirds and one warning line;
    10 equal studies can, and then there is no warning (split by study or by frame)."""
    studies = [_tiny_study(tmp_path, f"subject{i}") for i in range(10)]
    req = ["--val", "0.2", "--test", "0.1"]

    def index(chosen, out, *extra):
        return _index_report(
            ["index", "--studies", *map(str, chosen), "--out", str(out), *req, *extra], capsys
        )

    report, warnings, rows = index(studies[:3], tmp_path / "three.csv")
    truth = _frames_per_split(rows)
    for split, asked in (("train", 70), ("val", 20), ("test", 10)):
        assert report[split]["studies"] == truth[split] and len(truth[split]) == 1  # one whole study each
        assert report[split]["frames"] == 3 and report[split]["percent"] == 33.3
        assert report[split]["asked"] == asked
    assert len(warnings) == 1 and warnings[0].startswith("warning: ")
    # train and test are off by more than half a study (1/6 of the frames); val (33 vs 20 %) is not
    assert "train 33.3% (asked 70%)" in warnings[0] and "test 33.3% (asked 10%)" in warnings[0]
    assert "val " not in warnings[0] and "3 studies" in warnings[0]

    for split_by in ("study", "frame"):
        out = tmp_path / f"ten-{split_by}.csv"
        report, warnings, rows = index(studies, out, "--split-by", split_by)
        assert warnings == [], warnings
        truth = _frames_per_split(rows)
        for split, frames in (("train", 21), ("val", 6), ("test", 3)):
            assert report[split]["frames"] == frames == sum(truth[split].values())
            assert report[split]["studies"] == truth[split]  # every study of the split, with its frames
        if split_by == "frame":
            assert any(len(names) > 1 for names in truth.values())  # frames of one study are shared out

    # one study of 3 frames split by frame: each frame is a third of the data
    _, warnings, _ = index(studies[:1], tmp_path / "one.csv", "--split-by", "frame")
    assert len(warnings) == 1 and "test 33.3% (asked 10%)" in warnings[0] and "3 frames" in warnings[0]

    # 10 studies, one of them long: the right number of studies, but not of frames
    long = _tiny_study(tmp_path, "long", frames=12)
    report, warnings, rows = index([long, *studies[:9]], tmp_path / "long.csv")
    split_of_long = next(r.split for r in rows if r.study == "long")
    assert report[split_of_long]["studies"]["long"] == 12
    assert len(warnings) == 1 and f"{split_of_long} " in warnings[0]


def test_index_bad_input(tmp_path, capsys):
    good = _tiny_study(tmp_path, "ok")
    (tmp_path / "empty").mkdir()
    assert (
        main(["index", "--studies", str(good), str(tmp_path / "empty"), "--out", str(tmp_path / "i.csv")])
        == 2
    )
    assert "empty: study folder holds no frames" in capsys.readouterr().err
    assert not (tmp_path / "i.csv").exists()
    (good / "fem.jts").write_text("JT_EULER_312\nh\n0,0,-1000,0,0,0\n")
    assert main(["index", "--studies", str(good), "--out", str(tmp_path / "i.csv")]) == 2
    assert "fem.jts: has 1 pose row(s) but the study has 3 frame(s)" in capsys.readouterr().err


def test_synth_then_labels_reproduces_synthetic_masks(tmp_path):
    """The generator and the renderer agree: `jtml labels` on a synthetic study re-creates its masks."""
    study = tmp_path / "synth"
    assert main(["synth", "--out", str(study), "--frames", "4", "--seed", "1", "--size", "256"]) == 0
    args = ["labels", "--images", str(study), "--calibration", str(study / "calibration.txt")]
    for part in ("fem", "tib"):
        args += [
            "--model",
            f"{part}={study / (part + '.stl')}",
            "--poses",
            f"{part}={study / (part + '.jts')}",
        ]
    assert main([*args, "--out", str(tmp_path / "labels")]) == 0
    for part in ("fem", "tib"):
        written = sorted((tmp_path / "labels" / part).iterdir())
        assert len(written) == 4
        for path in written:
            ours, theirs = read_mask(path), read_mask(study / "Labels" / part / path.name)
            assert ours.sum() > 50 and int((ours != theirs).sum()) == 0


def test_index_over_two_synthetic_studies_splits_by_study(tmp_path):
    for seed in (1, 2):
        assert (
            main(
                [
                    "synth",
                    "--out",
                    str(tmp_path / f"s{seed}"),
                    "--frames",
                    "3",
                    "--seed",
                    str(seed),
                    "--size",
                    "64",
                ]
            )
            == 0
        )
    out = tmp_path / "index.csv"
    assert (
        main(
            [
                "index",
                "--studies",
                str(tmp_path / "s1"),
                str(tmp_path / "s2"),
                "--out",
                str(out),
                "--val",
                "0.5",
                "--test",
                "0",
            ]
        )
        == 0
    )
    rows = read_index(out, parts=["fem", "tib"])
    splits = {s: {r.split for r in rows if r.study == s} for s in ("s1", "s2")}
    assert sorted(next(iter(v)) for v in splits.values()) == ["train", "val"] and all(
        len(v) == 1 for v in splits.values()
    )
    assert all(r.models["fem"].name == "fem.stl" and r.poses["tib"] is not None for r in rows)
