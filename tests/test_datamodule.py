"""FluoroSegDataset / FluoroSegDataModule on tiny studies written to tmp_path (64–128 px)."""

from __future__ import annotations

import csv
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from jtml.data.index import build_index, write_index
from jtml.data.segmentation import FluoroSegDataModule, FluoroSegDataset
from jtml.errors import JTMLError
from jtml.io import Calibration, write_calibration, write_image, write_mask

PP = 0.5  # mm per pixel in the test calibrations
BACKGROUND = 200
IMPLANT = 40


def shapes(size: int, i: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Frame ``i``'s fem disc (left half) and tib rectangle (right half), as boolean masks."""
    yy, xx = np.mgrid[:size, :size]
    cy, cx, r = size * 0.35 + i, size * 0.3, size * 0.15
    disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    rect = np.zeros((size, size), bool)
    rect[int(size * 0.55) : int(size * 0.8), int(size * 0.55) + i : int(size * 0.9)] = True
    return disc, rect


def make_study(
    root: Path, name: str, frames: int = 4, size: int = 64, dtype=np.uint8, labels: bool = True
) -> Path:
    """A study in the lab layout: bright frames with a dark disc (fem) and a dark rectangle (tib)."""
    study = root / name
    study.mkdir(parents=True)
    scale = 257 if dtype == np.uint16 else 1  # 16-bit frames span the same range ×257
    for i in range(frames):
        disc, rect = shapes(size, i)
        img = np.full((size, size), BACKGROUND, np.int64)
        img[disc | rect] = IMPLANT
        frame = f"{name}_{i:04d}"
        write_image(study / f"{frame}.tif", (img * scale).astype(dtype))
        if labels:
            write_mask(study / "Labels" / "fem" / f"{frame}_label_fem.tif", disc)
            write_mask(study / "Labels" / "tib" / f"{frame}_label_tib.tif", rect)
    write_calibration(study / "calibration.txt", Calibration(pd=1000.0, pp=PP))
    return study


def rows_of(study: Path):
    return build_index([study], val=0.0, test=0.0, seed=0, split_by="frame")


def dm_kwargs(**kw):
    base = dict(image_size=64, train_transforms="none", batch_size=2, num_workers=0)
    base.update(kw)
    return base


# ------------------------------------------------------------------------------------ dataset


def test_sample_dict_shapes_dtypes_and_part_channels(tmp_path):
    study = make_study(tmp_path, "s1", size=64)
    ds = FluoroSegDataset(rows_of(study), ["fem", "tib"], image_size=64)
    sample = ds[1]
    assert sample["image"].shape == (1, 64, 64) and sample["image"].dtype == torch.float32
    assert sample["mask"].shape == (2, 64, 64) and sample["mask"].dtype == torch.float32
    assert float(sample["image"].min()) == 0.0 and float(sample["image"].max()) == 1.0  # minmax
    assert sample["pixel_size"].dtype == torch.float32 and sample["pixel_size"].shape == ()
    assert (sample["frame"], sample["study"], sample["index"]) == ("s1_0001", "s1", 1)
    disc, rect = shapes(64, 1)
    assert torch.equal(sample["mask"][0].bool(), torch.from_numpy(disc))  # fem -> channel 0
    assert torch.equal(sample["mask"][1].bool(), torch.from_numpy(rect))  # tib -> channel 1
    swapped = FluoroSegDataset(rows_of(study), ["tib", "fem"], image_size=64)[1]["mask"]
    assert torch.equal(swapped, sample["mask"].flip(0))
    # implants are dark on disk: dark pixels are exactly the union of the masks
    assert torch.equal(sample["image"][0] < 0.5, sample["mask"].amax(0).bool())


def test_pixel_size_scales_with_resize_not_crop(tmp_path):
    rows = rows_of(make_study(tmp_path, "s1", size=128))
    resized = FluoroSegDataset(rows, ["fem", "tib"], image_size=64)[0]
    assert resized["pixel_size"].item() == pytest.approx(PP * 128 / 64)
    assert set(resized["mask"].unique().tolist()) == {0.0, 1.0}
    cropped = FluoroSegDataset(rows, ["fem", "tib"], image_size=64, resize_mode="crop")[0]
    assert cropped["pixel_size"].item() == pytest.approx(PP)
    disc, _ = shapes(128, 0)
    assert torch.equal(cropped["mask"][0].bool(), torch.from_numpy(disc[32:96, 32:96]))


def test_invert_and_normalize_modes(tmp_path):
    rows = rows_of(make_study(tmp_path, "s1"))
    raw = FluoroSegDataset(rows, ["fem", "tib"], 64, normalize="none")[0]["image"]
    assert set(raw.unique().tolist()) == {IMPLANT, BACKGROUND}
    inv = FluoroSegDataset(rows, ["fem", "tib"], 64, normalize="none", invert=True)[0]["image"]
    assert torch.equal(inv, 255 - raw)
    ms = FluoroSegDataset(rows, ["fem", "tib"], 64, normalize="meanstd", mean=0.5, std=0.25)[0]["image"]
    assert torch.allclose(ms, (raw / 255 - 0.5) / 0.25, atol=1e-6)


def test_16bit_frames(tmp_path):
    rows = rows_of(make_study(tmp_path, "s16", size=96, dtype=np.uint16))
    raw = FluoroSegDataset(rows, ["fem", "tib"], 96, normalize="none")[0]
    assert set(raw["image"].unique().tolist()) == {IMPLANT * 257, BACKGROUND * 257}
    inv = FluoroSegDataset(rows, ["fem", "tib"], 96, normalize="none", invert=True)[0]["image"]
    assert torch.equal(inv, 65535 - raw["image"])
    mm = FluoroSegDataset(rows, ["fem", "tib"], 48, normalize="minmax", transform=None)[0]
    assert mm["image"].min() == 0 and mm["image"].max() == 1 and mm["mask"].shape == (2, 48, 48)
    # 16-bit frames go through augmentation as float32 in [0, 1]
    from jtml.data.transforms import lab_recipe

    aug = FluoroSegDataset(rows, ["fem", "tib"], 96, transform=lab_recipe(False, image_size=96, seed=0))
    for i in range(len(aug)):
        s = aug[i]
        assert torch.isfinite(s["image"]).all() and set(s["mask"].unique().tolist()) <= {0.0, 1.0}


def test_geometric_augmentation_keeps_image_and_mask_aligned(tmp_path):
    """Inverted frames show the implants bright on black, the fill of rotation and elastic warps;
    after rotation, flips and elastic, the bright pixels must still be the masked ones."""
    from jtml.data.transforms import build_transforms

    geo = [
        {"name": "Affine", "params": {"rotate": [-180, 180], "scale": [0.9, 1.1], "p": 1.0}},
        {"name": "HorizontalFlip", "params": {"p": 0.5}},
        {"name": "FastElasticTransform", "params": {"alpha": 40.0, "sigma": 12.0, "p": 1.0}},
    ]
    rows = rows_of(make_study(tmp_path, "s1", size=128))
    ds = FluoroSegDataset(
        rows, ["fem", "tib"], 128, invert=True, normalize="none", transform=build_transforms(geo, seed=3)
    )
    plain = FluoroSegDataset(rows, ["fem", "tib"], 128)
    for i in range(len(ds)):
        s = ds[i]
        union = s["mask"].amax(0).bool()
        assert set(s["mask"].unique().tolist()) == {0.0, 1.0}
        assert not torch.equal(s["mask"], plain[i]["mask"])  # it did move
        bright = s["image"][0] > 127
        iou = (bright & union).sum() / (bright | union).sum()
        assert iou > 0.95, f"sample {i}: image and mask disagree (IoU {iou:.3f})"


def test_lab_recipe_masks_stay_binary_and_workers_differ(tmp_path):
    from jtml.data.transforms import lab_recipe

    rows = rows_of(make_study(tmp_path, "s1", frames=1, size=64)) * 4  # one frame, four times
    ds = FluoroSegDataset(rows, ["fem", "tib"], 64, transform=lab_recipe(False, image_size=64))
    for _ in range(3):
        for i in range(len(ds)):
            m = ds[i]["mask"]
            assert set(m.unique().tolist()) <= {0.0, 1.0}
    import cv2

    # OpenCV's thread pool running in the parent must not deadlock forked workers (it did when
    # workers called cv2.setNumThreads); the timeout turns a hang into a failure
    cv2.GaussianBlur(np.zeros((1024, 1024), np.float32), (0, 0), 5)
    torch.manual_seed(0)  # worker seeds derive from it: deterministic, not flaky
    loader = torch.utils.data.DataLoader(ds, batch_size=1, num_workers=2, timeout=60)
    epochs = [torch.cat([b["image"] for b in loader]) for _ in range(2)]
    # worker 0 serves samples 0, 2 and worker 1 samples 1, 3: a shared augmentation stream would
    # make them pairwise equal; re-forked workers would repeat the previous epoch. (Any single
    # pair can be equal by chance when every transform of the recipe happens to be skipped.)
    assert not (torch.equal(epochs[0][0], epochs[0][1]) and torch.equal(epochs[0][2], epochs[0][3]))
    assert not torch.equal(epochs[0], epochs[1])


# ------------------------------------------------------------------------------------ datamodule


def test_fit_batches_from_several_studies_split_by_study(tmp_path):
    studies = [str(make_study(tmp_path, f"s{i}", frames=4)) for i in range(5)]
    dm = FluoroSegDataModule(
        studies=studies, **dm_kwargs(train_transforms="lab", val_fraction=0.2, test_fraction=0.2)
    )
    dm.setup("fit")
    splits = {}
    for r in dm.rows:
        splits.setdefault(r.study, set()).add(r.split)
    assert all(len(v) == 1 for v in splits.values()), splits  # no study straddles splits
    assert sorted(next(iter(v)) for v in splits.values()) == ["test", "train", "train", "train", "val"]
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 1, 64, 64) and batch["image"].dtype == torch.float32
    lo, hi = batch["image"].amin((1, 2, 3)), batch["image"].amax((1, 2, 3))  # minmax per augmented frame
    assert torch.allclose(lo, torch.zeros(2), atol=1e-6) and torch.allclose(hi, torch.ones(2), atol=1e-6)
    assert batch["mask"].shape == (2, 2, 64, 64) and set(batch["mask"].unique().tolist()) <= {0.0, 1.0}
    assert batch["pixel_size"].shape == (2,) and torch.allclose(batch["pixel_size"], torch.tensor(PP))
    assert len(batch["frame"]) == 2 and isinstance(batch["frame"][0], str)
    assert dm.parts == ["fem", "tib"] and len(dm.val_dataset) == 4
    assert dm.train_dataloader().drop_last and not dm.val_dataloader().drop_last
    # val: deterministic and complete, every frame exactly once
    runs = [[f for b in dm.val_dataloader() for f in b["frame"]] for _ in range(2)]
    assert runs[0] == runs[1] and sorted(runs[0]) == sorted(r.frame for r in dm.rows if r.split == "val")
    assert not dm.val_dataloader().dataset.transform


def test_single_study_splits_by_frame(tmp_path):
    study = make_study(tmp_path, "only", frames=6)
    dm = FluoroSegDataModule(studies=[str(study)], **dm_kwargs(val_fraction=0.2, test_fraction=0.2))
    dm.setup("fit")
    counts = {s: sum(r.split == s for r in dm.rows) for s in ("train", "val", "test")}
    assert counts == {"train": 4, "val": 1, "test": 1}


def test_setup_reports_every_bad_file_at_once(tmp_path):
    study = make_study(tmp_path, "s1", frames=5)
    rows = build_index([study], val=0.2, test=0.2, seed=0, split_by="frame")
    index = tmp_path / "index.csv"
    write_index(index, rows)
    train = [r for r in rows if r.split == "train"]
    gone_frame, gone_mask, bad_mask = train[0].image, train[1].masks["tib"], train[2].masks["fem"]
    gone_frame.unlink()
    gone_mask.unlink()
    write_mask(bad_mask, np.zeros((32, 40), np.uint8))
    dm = FluoroSegDataModule(index=str(index), **dm_kwargs())
    with pytest.raises(JTMLError) as err:
        dm.setup("fit")
    msg = str(err.value)
    assert "3 problem(s)" in msg and str(index) in msg
    for path in (gone_frame, gone_mask, bad_mask):
        assert str(path) in msg
    assert "40x32" in msg  # the size mismatch says what it is


def test_index_errors_missing_column_unknown_part_empty_val(tmp_path):
    study = make_study(tmp_path, "s1", frames=5)
    index = tmp_path / "index.csv"
    write_index(index, build_index([study], val=0.0, test=0.2, seed=0, split_by="frame"))
    with pytest.raises(JTMLError, match=r"the val split is empty \(train 4, val 0, test 1\)"):
        FluoroSegDataModule(index=str(index), **dm_kwargs()).setup("fit")
    dm = FluoroSegDataModule(index=str(index), **dm_kwargs())
    dm.setup("test")  # test alone is fine
    assert len(dm.test_dataset) == 1
    with pytest.raises(JTMLError, match=r"unknown part\(s\) \['pat'\]"):
        FluoroSegDataModule(index=str(index), **dm_kwargs(parts=["fem", "pat"])).setup("fit")
    with pytest.raises(JTMLError, match=r"unknown part\(s\) \['pat'\]"):
        FluoroSegDataModule(studies=[str(study)], **dm_kwargs(parts=["pat"])).setup("fit")
    with open(index, newline="") as fh:
        recs = list(csv.DictReader(fh))
    broken = tmp_path / "broken.csv"
    with open(broken, "w", newline="") as fh:
        cols = [c for c in recs[0] if c != "calibration"]
        w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(recs)
    with pytest.raises(JTMLError, match=r"missing column\(s\) \['calibration'\]"):
        FluoroSegDataModule(index=str(broken), **dm_kwargs()).setup("fit")


def test_bad_transform_list_fails_at_construction():
    with pytest.raises(JTMLError, match=r"train_transforms\[0\] Affine: .*'mode'"):
        FluoroSegDataModule(studies=["x"], train_transforms=[{"name": "Affine", "params": {"mode": 0}}])


def test_predict_without_masks(tmp_path):
    study = make_study(tmp_path, "unlabelled", frames=3, size=96, labels=False)
    dm = FluoroSegDataModule(studies=[str(study)], **dm_kwargs(parts=["fem"], predict_split="all"))
    # the parts must exist somewhere: a pose file names the part without any labels
    (study / "fem.jts").write_text("JT_EULER_312\nx, y, z, zr, xr, yr\n" + "0,0,-1000,0,0,0\n" * 3)
    dm.setup("predict")
    batches = list(dm.predict_dataloader())
    assert sum(len(b["frame"]) for b in batches) == 3
    assert all("mask" not in b for b in batches)
    assert batches[0]["image"].shape == (2, 1, 64, 64)
    assert batches[0]["pixel_size"][0].item() == pytest.approx(PP * 96 / 64)


def _fake_synth(monkeypatch, calls):
    def generate_study(out: Path, frames: int, seed: int, size: int = 1024, models=None, calibration=None):
        calls.append((out, frames, seed, size))
        make_study(out.parent, out.name, frames=frames, size=size)
        return out

    module = types.ModuleType("jtml.sim.synth")
    module.generate_study = generate_study
    monkeypatch.setitem(sys.modules, "jtml.sim.synth", module)


def test_synthetic_study_is_generated_once_in_prepare_data(tmp_path, monkeypatch):
    calls = []
    _fake_synth(monkeypatch, calls)
    out = tmp_path / "synthetic" / "demo"
    synthetic = {"out": str(out), "frames": 5, "seed": 1, "size": 64}
    dm = FluoroSegDataModule(synthetic=synthetic, **dm_kwargs())
    assert dm.studies == [str(out)]
    dm.prepare_data()
    dm.prepare_data()
    dm.setup("fit")
    assert len(calls) == 1 and calls[0][1:] == (5, 1, 64)
    assert len(dm.rows) == 5 and {r.split for r in dm.rows} == {"train", "val", "test"}  # by frame
    # an index the user names is their data: a missing one is an error naming it, nothing is
    # generated or written (829f297 wrote it over a new synthetic study and trained on that)
    index = tmp_path / "idx" / "index.csv"
    synthetic2 = {"out": str(tmp_path / "synthetic" / "demo2"), "frames": 4, "seed": 2, "size": 64}
    with pytest.raises(JTMLError, match="index CSV not found") as e:
        FluoroSegDataModule(index=str(index), synthetic=synthetic2, **dm_kwargs()).setup("fit")
    assert str(index) in str(e.value)
    assert not index.exists() and not index.parent.exists() and len(calls) == 1
    # an existing index wins over the YAML's synthetic study, which is neither used nor generated
    write_index(index, dm.rows)
    dm2 = FluoroSegDataModule(index=str(index), synthetic=synthetic2, **dm_kwargs())
    dm2.prepare_data()
    dm2.setup("fit")
    assert dm2.studies == [] and len(dm2.rows) == 5 and len(calls) == 1
    assert not Path(synthetic2["out"]).exists()
    with pytest.raises(JTMLError, match="synthetic: "):
        FluoroSegDataModule(synthetic={"out": str(tmp_path / "x"), "frame": 3}, **dm_kwargs()).prepare_data()


def test_trainer_fit_and_predict(tmp_path):
    import pytorch_lightning as pl

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 2, 3, padding=1)

        def training_step(self, batch, _):
            return torch.nn.functional.binary_cross_entropy_with_logits(
                self.conv(batch["image"]), batch["mask"]
            )

        def validation_step(self, batch, _):
            self.log("val_loss", self.training_step(batch, _), batch_size=len(batch["frame"]))

        def predict_step(self, batch, _):
            return self.conv(batch["image"]).shape

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    studies = [str(make_study(tmp_path, f"s{i}", frames=3)) for i in range(3)]
    dm = FluoroSegDataModule(studies=studies, **dm_kwargs(train_transforms="lab", test_fraction=0.3))
    trainer = pl.Trainer(
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(Tiny(), datamodule=dm)
    assert trainer.state.finished
    shapes_ = trainer.predict(Tiny(), datamodule=dm)
    assert [tuple(s) for s in shapes_] == [(2, 2, 64, 64), (1, 2, 64, 64)]


def test_real_kneel1(kneel1):
    from jtml.io import read_mask

    dm = FluoroSegDataModule(studies=[str(kneel1)], **dm_kwargs(image_size=256, val_fraction=0.34))
    dm.setup("fit")
    s = dm.val_dataset[0]
    assert s["pixel_size"].item() == pytest.approx(0.373 * 4, rel=1e-3)
    for channel, part in enumerate(("fem", "tib")):
        label = read_mask(kneel1 / "Labels" / part / f"{s['frame']}_label_{part}.tif")
        # a pixel of the 4x smaller mask is the part when at least half its 4x4 block is
        small = label.reshape(256, 4, 256, 4).mean(axis=(1, 3)) >= 0.5
        assert small.sum() > 500
        assert torch.equal(s["mask"][channel], torch.from_numpy(small).float())


def test_studies_split_that_misses_the_request_is_announced(tmp_path, capsys):
    """3 studies asked 0.2/0.1 become thirds: said on stderr (once), as `jtml index` says it."""
    studies = [str(make_study(tmp_path, f"s{i}", frames=2)) for i in range(3)]
    dm = FluoroSegDataModule(studies=studies, **dm_kwargs(val_fraction=0.2, test_fraction=0.1))
    dm.setup("fit")
    dm.setup("fit")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "warning: the split differs from the one asked for" in err[0]
    assert "train 33.3% (asked 70%)" in err[0]
    five = [str(make_study(tmp_path, f"t{i}", frames=2)) for i in range(10)]
    FluoroSegDataModule(studies=five, **dm_kwargs(val_fraction=0.2, test_fraction=0.1)).setup("fit")
    assert capsys.readouterr().err == ""


class _AtEpoch:
    """What a DataModule sees of its Trainer when it builds a loader: the current epoch."""

    def __init__(self, epoch: int) -> None:
        self.current_epoch = epoch


@pytest.mark.parametrize("workers", [0, 2])
def test_epoch_batches_depend_on_seed_and_epoch_only(tmp_path, monkeypatch, workers):
    """Epoch 1's training batches (order, augmentation, random crop) from a loader that went through
    epoch 0 equal those of a loader built fresh at epoch 1, as after a resume; epochs differ."""
    monkeypatch.setenv("PL_GLOBAL_SEED", "7")
    study = make_study(tmp_path, "s", frames=8, size=80)
    kw = dm_kwargs(train_transforms="lab", resize_mode="crop", val_fraction=0.25, test_fraction=0.0)
    kw.update(num_workers=workers, persistent_workers=False)

    def epochs(start: int, n: int) -> list[list[torch.Tensor]]:
        dm = FluoroSegDataModule(studies=[str(study)], **kw)
        dm.setup("fit")
        dm.trainer = _AtEpoch(start)
        loader, out = dm.train_dataloader(), []
        for epoch in range(start, start + n):
            loader.sampler.set_epoch(epoch)  # as Lightning's fit loop does
            out.append([torch.cat([b["image"], b["mask"]], 1) for b in loader])
        return out

    straight, resumed = epochs(0, 2), epochs(1, 1)
    assert len(straight[1]) == 3 and all(
        torch.equal(a, b) for a, b in zip(straight[1], resumed[0], strict=True)
    )
    assert not torch.equal(straight[0][0], straight[1][0])
