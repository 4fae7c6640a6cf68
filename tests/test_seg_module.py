"""SegmentationModule: architectures, a real (tiny) fit, checkpoints, offline encoder weights, callback."""

from __future__ import annotations

import functools
import socket
import warnings
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from jtml.errors import JTMLError
from jtml.models.losses import build_loss
from jtml.models.segmentation import SegmentationModule

PARTS = ["fem", "tib"]
DEC3 = {"decoder_channels": [32, 16, 8]}
TINY = dict(encoder_name="tu-resnet18", encoder_depth=3, model_kwargs=DEC3)


_LOCAL = ("127.0.0.1", "::1", "localhost")
pytestmark = pytest.mark.filterwarnings("ignore:.*(does not have many workers|LeafSpec|log_every_n_steps).*")


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to reach a remote host (e.g. a weights download) fails loudly; local IPC still works."""
    connect, create_connection = socket.socket.connect, socket.create_connection

    def guarded_connect(self, address):
        if isinstance(address, tuple) and address[0] not in _LOCAL:
            raise AssertionError(f"network access attempted: {address}")
        return connect(self, address)

    def guarded_create_connection(address, *args, **kwargs):
        if address[0] not in _LOCAL:
            raise AssertionError(f"network access attempted: {address}")
        return create_connection(address, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    monkeypatch.setattr(socket, "create_connection", guarded_create_connection)


def synthetic(n: int, seed: int, with_mask: bool = True) -> list[dict]:
    """64² frames with a bright square (fem) and a brighter disc (tib), possibly overlapping."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    samples = []
    for i in range(n):
        y, x = torch.randint(6, 38, (2,), generator=g).tolist()
        cy, cx = torch.randint(14, 50, (2,), generator=g).tolist()
        mask = torch.zeros(2, 64, 64)
        mask[0, y : y + 20, x : x + 20] = 1
        mask[1] = (((yy - cy) ** 2 + (xx - cx) ** 2) <= 64).float()
        image = 0.3 * torch.randn(1, 64, 64, generator=g) + mask[0] + 2 * mask[1]
        s = {"image": image, "pixel_size": torch.tensor(0.4), "frame": f"{i:04d}", "study": "S1"}
        if with_mask:
            s["mask"] = mask
        samples.append(s)
    return samples


def loaders(batch_size: int = 4) -> tuple[DataLoader, DataLoader]:
    return (
        DataLoader(synthetic(16, 0), batch_size=batch_size, shuffle=True),
        DataLoader(synthetic(8, 1), batch_size=batch_size),
    )


def trainer(tmp_path: Path, **kwargs) -> pl.Trainer:
    defaults = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=True,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        num_sanity_val_steps=0,
    )
    return pl.Trainer(**{**defaults, **kwargs})


def reference_scores(model: SegmentationModule, loader: DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-part Dice and IoU (means over images, both-empty = 1) of ``model`` on ``loader``, by
    torchmetrics rather than jtml's ``DiceIoU``: the independent reference for ``val/dice_*``."""
    from torchmetrics.functional.segmentation import dice_score, mean_iou

    model.eval()
    with torch.no_grad():
        pred = torch.cat([(model(b["image"]).sigmoid() > model.threshold).long() for b in loader])
    model.train()
    target = torch.cat([b["mask"] for b in loader]).long()
    n = len(PARTS)
    dice = dice_score(pred, target, num_classes=n, average="none", input_format="one-hot").nan_to_num(1.0)
    iou = mean_iou(pred, target, num_classes=n, per_class=True, input_format="one-hot")
    return dice.mean(dim=0), torch.where(iou < 0, 1.0, iou).mean(dim=0)  # NaN / -1: both empty


def mean_loss(model: SegmentationModule, loader: DataLoader) -> float:
    model.eval()
    with torch.no_grad():
        loss = sum(model._loss(b)[0].item() for b in loader) / len(loader)
    model.train()  # Lightning keeps the modules' mode at fit start
    return loss


# -- architectures -------------------------------------------------------------------------------------------

ARCHS = [
    ("Unet", "resnet18", {"decoder_channels": [32, 16, 8]}),
    ("FPN", "resnet18", {"decoder_pyramid_channels": 32, "decoder_segmentation_channels": 32}),
    ("DeepLabV3Plus", "resnet18", {"decoder_channels": 32}),
    ("UnetPlusPlus", "resnet18", {"decoder_channels": [32, 16, 8]}),
    ("Segformer", "resnet18", {"decoder_segmentation_channels": 32}),
    ("Unet", "tu-hrnet_w18_small", {"decoder_channels": [32, 16, 8]}),
]


@pytest.mark.parametrize(("arch", "encoder", "kwargs"), ARCHS, ids=[f"{a}-{e}" for a, e, _ in ARCHS])
def test_architectures_build_for_grayscale_64px(arch, encoder, kwargs):
    model = SegmentationModule(PARTS, arch=arch, encoder_name=encoder, encoder_depth=3, model_kwargs=kwargs)
    model.eval()
    with torch.no_grad():
        logits = model(torch.randn(2, 1, 64, 64))
    assert logits.shape == (2, 2, 64, 64)
    assert torch.isfinite(logits).all()


def test_channels_last_matches():
    torch.manual_seed(0)
    a = SegmentationModule(PARTS, **TINY).eval()
    b = SegmentationModule(PARTS, channels_last=True, **TINY).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), atol=1e-5, rtol=1e-5)


def test_compile_option_fits_compiled_and_checkpoints_load_uncompiled(tmp_path):
    """``compile`` (here with the quick ``aot_eager`` backend; GPUs use the default inductor):
    Lightning's fit runs the compiled network, and its checkpoint loads into an eager module."""
    torch.manual_seed(0)
    model = SegmentationModule(PARTS, compile={"backend": "aot_eager"}, **TINY)
    train, val = loaders()
    t = trainer(tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=1)
    torch._dynamo.reset()
    t.fit(model, train, val)
    assert model.model._compiled_call_impl is not None  # nn.Module.compile, in place
    from torch._dynamo.utils import counters

    assert counters["stats"]["unique_graphs"] >= 1  # dynamo really traced the network
    (ckpt,) = tmp_path.rglob("*.ckpt")
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert not any("_orig_mod" in k for k in state)
    eager = SegmentationModule(PARTS, **TINY).eval()
    eager.load_state_dict(state)
    model.eval()
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), eager(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(JTMLError, match="compile"):
        SegmentationModule(PARTS, compile="yes", **TINY)


def test_bad_arch_is_a_jtml_error():
    with pytest.raises(JTMLError, match="NoSuchNet"):
        SegmentationModule(PARTS, arch="NoSuchNet")


# -- losses --------------------------------------------------------------------------------------------------


def test_loss_specs():
    assert build_loss("bce").names == ["bce"]
    combo = build_loss("0.7*dice + 0.3*focal")
    assert combo.names == ["dice", "focal"] and combo.weights == [0.7, 0.3]
    listed = build_loss([{"name": "dice", "weight": 2}, {"name": "bce", "pos_weight": [3.0, 1.0]}])
    assert listed.weights == [2.0, 1.0]
    assert listed.losses[1].pos_weight.shape == (2, 1, 1)
    logits, target = torch.zeros(1, 2, 4, 4), torch.ones(1, 2, 4, 4)
    # BCE of logit 0 is ln 2; pos_weight scales positives per part: mean of 3·ln2 and 1·ln2.
    bce = build_loss([{"name": "bce", "pos_weight": [3.0, 1.0]}])(logits, target)
    assert bce.item() == pytest.approx(2 * torch.log(torch.tensor(2.0)).item(), rel=1e-5)
    with pytest.raises(JTMLError, match="unknown loss"):
        build_loss("dice+nope")
    with pytest.raises(JTMLError, match="cannot parse"):
        build_loss("dice++bce")


# -- training, checkpoints -----------------------------------------------------------------------------------


def test_plateau_in_min_mode_on_a_dice_metric_is_warned_about():
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau
    model = SegmentationModule(PARTS, lr_scheduler=plateau, **TINY)  # mode min, monitor val/dice_mean
    with pytest.warns(UserWarning, match="set mode: max"):
        conf = model.configure_optimizers()
    assert conf["lr_scheduler"]["monitor"] == "val/dice_mean"
    model = SegmentationModule(PARTS, lr_scheduler=functools.partial(plateau, mode="max"), **TINY)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.configure_optimizers()


def test_fit_lowers_loss_logs_metrics_and_checkpoint_roundtrip(tmp_path):
    torch.manual_seed(0)
    train, val = loaders()
    model = SegmentationModule(
        PARTS,
        loss="dice+bce",
        optimizer=functools.partial(torch.optim.Adam, lr=3e-3),
        lr_scheduler=functools.partial(torch.optim.lr_scheduler.ReduceLROnPlateau, mode="max", patience=5),
        **TINY,
    )
    before, (untrained, _) = mean_loss(model, train), reference_scores(model, val)
    t = trainer(tmp_path, max_steps=40)
    t.fit(model, train, val)
    after, (trained, trained_iou) = mean_loss(model, train), reference_scores(model, val)
    assert after < 0.5 * before, (before, after)

    m = t.callback_metrics
    for key in ("train/loss_step", "train/loss_epoch", "val/loss", "val/dice_mean", "val/iou_mean"):
        assert key in m, sorted(m)
    # The last validation ran on the final weights: the logged per-part scores are the reference's.
    for i, part in enumerate(PARTS):
        assert m[f"val/dice_{part}"].item() == pytest.approx(trained[i].item(), abs=1e-5), part
        assert m[f"val/iou_{part}"].item() == pytest.approx(trained_iou[i].item(), abs=1e-5), part
    assert m["val/dice_mean"].item() == pytest.approx((m["val/dice_fem"] + m["val/dice_tib"]).item() / 2)
    # Each part learnt. Measured over 4 seeds: untrained 0.00-0.21 (about "all foreground"), after 40
    # steps 0.70-0.93 (this seed: 0.83, 0.84), a gain of >= 0.51; demand 0.4 over this run's own start.
    assert (trained > untrained + 0.4).all(), (untrained.tolist(), trained.tolist())
    assert m["val/dice_mean"].item() > 0.7

    # Test stage: Dice/IoU plus boundary distances in px and mm (pixel_size 0.4).
    (res,) = t.test(model, val, verbose=False)
    for key in ("test/dice_fem", "test/hd_fem_px", "test/hd95_tib_mm", "test/hd_mean_mm", "test/loss"):
        assert key in res
    assert res["test/hd_fem_mm"] == pytest.approx(res["test/hd_fem_px"] * 0.4, rel=1e-5)

    # The checkpoint loads with the torch default weights_only=True (no pickled classes in hparams) ...
    ckpt = t.checkpoint_callback.best_model_path
    assert ckpt and "optimizer" not in torch.load(ckpt, weights_only=True)["hyper_parameters"]
    # ... and restores identical outputs without touching the network.
    loaded = SegmentationModule.load_from_checkpoint(ckpt).eval()
    model.eval()
    x = torch.stack([s["image"] for s in synthetic(3, 5)])
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert loaded.parts == PARTS and loaded.hparams.encoder_name == "tu-resnet18"

    # predict: probabilities plus frame ids, batches without masks.
    preds = t.predict(loaded, DataLoader(synthetic(5, 2, with_mask=False), batch_size=4))
    assert [p["probs"].shape for p in preds] == [(4, 2, 64, 64), (1, 2, 64, 64)]
    assert preds[0]["frame"] == ["0000", "0001", "0002", "0003"] and preds[1]["study"] == ["S1"]
    # ... which are the network's sigmoid on those frames, in order.
    frames = torch.stack([s["image"] for s in synthetic(5, 2, with_mask=False)])
    with torch.no_grad():
        torch.testing.assert_close(torch.cat([p["probs"] for p in preds]), loaded(frames).sigmoid())


def test_mask_part_count_mismatch_is_clear():
    model = SegmentationModule(["fem"], **TINY)
    batch = synthetic(1, 0)[0]
    batch = {"image": batch["image"][None], "mask": batch["mask"][None]}
    with pytest.raises(JTMLError, match="parts"):
        model._loss(batch)


# -- offline encoder weights ---------------------------------------------------------------------------------


def test_hub_weights_refused_offline():
    with pytest.raises(JTMLError, match="offline") as err:
        SegmentationModule(PARTS, encoder_name="resnet18", encoder_weights="imagenet")
    assert "encoder_weights: /path/to/encoder.pth" in str(err.value)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_local_encoder_weights_load(tmp_path, suffix):
    torch.manual_seed(1)
    source = SegmentationModule(PARTS, encoder_name="resnet18", encoder_depth=3, model_kwargs=DEC3)
    path = tmp_path / f"encoder{suffix}"
    state = source.model.encoder.state_dict()
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)

    torch.manual_seed(2)
    model = SegmentationModule(
        PARTS, encoder_name="resnet18", encoder_depth=3, model_kwargs=DEC3, encoder_weights=str(path)
    )
    key = "conv1.weight"
    assert not torch.equal(model.model.encoder.state_dict()[key], state[key])  # not loaded yet
    model.load_encoder_weights()
    for k, v in model.model.encoder.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_wrong_or_missing_encoder_file_names_it(tmp_path):
    wrong = tmp_path / "resnet34_encoder.pth"
    torch.save(SegmentationModule(PARTS, encoder_name="resnet34").model.encoder.state_dict(), wrong)
    model = SegmentationModule(PARTS, encoder_name="resnet18", encoder_weights=str(wrong))
    with pytest.raises(JTMLError) as err:
        model.load_encoder_weights()
    assert str(wrong) in str(err.value) and "do not match" in str(err.value)

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(JTMLError, match="cannot read") as err:
        model.load_encoder_weights(garbage)
    assert str(garbage) in str(err.value)

    missing = tmp_path / "missing.pth"
    with pytest.raises(JTMLError, match="not found") as err:
        SegmentationModule(PARTS, encoder_weights=str(missing)).load_encoder_weights()
    assert str(missing) in str(err.value)


def test_fit_applies_encoder_file_and_checkpoint_survives_its_deletion(tmp_path):
    torch.manual_seed(3)
    enc_path = tmp_path / "enc.pth"
    reference = SegmentationModule(PARTS, **TINY).model.encoder.state_dict()
    torch.save(reference, enc_path)
    train, val = loaders()
    frozen = functools.partial(torch.optim.SGD, lr=0.0)  # lr 0: parameters stay exactly as loaded
    model = SegmentationModule(PARTS, encoder_weights=str(enc_path), optimizer=frozen, **TINY)
    t = trainer(tmp_path / "a", max_steps=1, limit_val_batches=1)
    t.fit(model, train, val)
    for name, p in model.model.encoder.named_parameters():
        assert torch.equal(p.detach(), reference[name]), name
    ckpt = t.checkpoint_callback.best_model_path

    enc_path.unlink()  # the checkpoint alone must be enough from now on
    loaded = SegmentationModule.load_from_checkpoint(ckpt)
    assert loaded.hparams.encoder_weights == str(enc_path)
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), loaded.eval()(x))
    # Fine-tuning the loaded model, and resuming a fresh one from the checkpoint, never reread the file.
    trainer(tmp_path / "b", max_steps=1, limit_val_batches=1).fit(loaded.train(), train, val)
    fresh = SegmentationModule(PARTS, encoder_weights=str(enc_path), optimizer=frozen, **TINY)
    trainer(tmp_path / "c", max_steps=2, limit_val_batches=1).fit(fresh, train, val, ckpt_path=ckpt)
    # A fresh fit without a checkpoint does need it, and says which file is missing.
    with pytest.raises(JTMLError, match="enc.pth"):
        trainer(tmp_path / "d", max_steps=1).fit(
            SegmentationModule(PARTS, encoder_weights=str(enc_path), **TINY), train, val
        )


# -- config --------------------------------------------------------------------------------------------------


def test_builds_from_yaml_with_jsonargparse():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(SegmentationModule, "model")
    cfg = parser.parse_string(
        """
model:
  parts: [fem, tib]
  arch: FPN
  encoder_name: tu-resnet18
  encoder_depth: 3
  model_kwargs: {decoder_pyramid_channels: 32, decoder_segmentation_channels: 32}
  loss: [{name: dice, weight: 0.5}, {name: bce}]
  optimizer: {class_path: torch.optim.SGD, init_args: {lr: 0.01, momentum: 0.9}}
  lr_scheduler: {class_path: torch.optim.lr_scheduler.ReduceLROnPlateau, init_args: {mode: max}}
"""
    )
    model = parser.instantiate_classes(cfg).model
    assert isinstance(model, SegmentationModule) and model.loss_fn.names == ["dice", "bce"]
    conf = model.configure_optimizers()
    assert isinstance(conf["optimizer"], torch.optim.SGD) and conf["optimizer"].defaults["lr"] == 0.01
    assert conf["lr_scheduler"]["monitor"] == "val/dice_mean"
    assert isinstance(conf["lr_scheduler"]["scheduler"], torch.optim.lr_scheduler.ReduceLROnPlateau)


# -- W&B overlays --------------------------------------------------------------------------------------------


def test_wandb_overlays_written_offline(tmp_path, monkeypatch):
    import wandb
    from PIL import Image
    from pytorch_lightning.loggers import WandbLogger

    from jtml.callbacks.images import WandbSegmentationImages, label_map

    for key, value in {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_DIR": str(tmp_path),
        "WANDB_CACHE_DIR": str(tmp_path / "cache"),
        "WANDB_CONFIG_DIR": str(tmp_path / "config"),
        "WANDB_DATA_DIR": str(tmp_path / "data"),
    }.items():
        monkeypatch.setenv(key, value)

    torch.manual_seed(0)
    train, val = loaders()
    logger = WandbLogger(mode="offline", save_dir=str(tmp_path), project="jtml-test")
    try:
        t = trainer(tmp_path, max_epochs=1, logger=logger, callbacks=[WandbSegmentationImages(num_images=3)])
        t.fit(SegmentationModule(PARTS, **TINY), train, val)
    finally:
        wandb.finish()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    media = runs[0] / "files" / "media" / "images"
    overlays = sorted((media / "val").glob("overlays_*.png"))
    masks = sorted((media / "mask" / "val").glob("overlays_*.mask.png"))
    assert len(overlays) == 3, list(media.rglob("*"))
    assert len(masks) == 6  # prediction + ground truth per image

    # The logged frames are the first 3 validation samples: display image and ground-truth label map match.
    first = synthetic(8, 1)[:3]
    shown = [np.asarray(Image.open(f)) for f in overlays]
    label_maps = [np.asarray(Image.open(f)) for f in masks]
    for s in first:
        img = s["image"][0].numpy()
        expected = np.round((img - img.min()) / (img.max() - img.min()) * 255).astype(np.uint8)
        assert any(np.array_equal(expected, x) for x in shown)
        gt = label_map(s["mask"].numpy())
        assert set(np.unique(gt)) == {0, 1, 2, 3} or set(np.unique(gt)) == {0, 1, 2}
        assert any(np.array_equal(gt, m) for m in label_maps)
    assert all(set(np.unique(m)) <= {0, 1, 2, 3} for m in label_maps)


def test_overlay_callback_is_inert_without_wandb(tmp_path):
    from jtml.callbacks.images import WandbSegmentationImages, label_map

    cb = WandbSegmentationImages(num_images=2)
    train, val = loaders()
    trainer(tmp_path, max_steps=1, logger=False, callbacks=[cb]).fit(
        SegmentationModule(PARTS, **TINY), train, val
    )
    assert cb._images == []
    masks = torch.zeros(2, 3, 3)
    masks[0, 0, :2] = 1
    masks[1, 0, 1:] = 1
    assert label_map(masks.numpy()).tolist() == [[1, 3, 2], [0, 0, 0], [0, 0, 0]]
