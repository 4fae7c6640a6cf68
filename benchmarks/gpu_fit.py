"""Fit throughput of a segmentation experiment's network on one accelerator: images/s and MFU.

Builds the experiment's ``SegmentationModule`` from its YAML (default: the lab's JTML HRNet,
``experiments/jtml_hrnet_seg.yaml``, 1024²) and runs Lightning's ``fit`` on in-memory batches
(random frames, random masks: the data loader is measured by ``loader.py``, this is the network
and the GPU), with the YAML-level speed options: ``--precision bf16-mixed``, ``--channels-last``,
``--compile``. Steps after ``--warmup`` are timed with the device synchronised.

Model FLOP utilisation (MFU) = model FLOPs per training step (forward + backward, counted once
with ``torch.utils.flop_counter.FlopCounterMode`` at the timed batch size) × steps/s ÷ the device's
dense bf16 peak (H100 SXM / H200: 989 TFLOP/s, H100 PCIe: 756, A100: 312; ``--peak-tflops`` for
others). Prints one line per setting, then one JSON line (``gpu_images_per_s``, ``gpu_mfu_pct``).

    python benchmarks/gpu_fit.py [--config experiments/jtml_hrnet_seg.yaml] [--size 1024] [--batch 8]
        [--steps 30] [--precision bf16-mixed] [--channels-last] [--compile] [--accelerator gpu]
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
import yaml
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode

from jtml.models.segmentation import SegmentationModule

ROOT = Path(__file__).resolve().parents[1]
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0}


class RandomBatches(Dataset):
    """A few fixed random frames and masks, cycled: the network's cost, not the loader's."""

    def __init__(self, n: int, size: int, parts: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.images = torch.rand(8, 1, size, size, generator=g)
        self.masks = (torch.rand(8, parts, size, size, generator=g) > 0.5).float()
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i % 8], "mask": self.masks[i % 8]}


class StepTimer(pl.Callback):
    """Wall time of the training steps after ``warmup``, with the accelerator synchronised."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.seconds, self.steps = warmup, 0.0, 0.0, 0

    @staticmethod
    def _sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        if batch_idx == self.warmup:
            self._sync()
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        if batch_idx >= self.warmup:
            self._sync()
            self.seconds, self.steps = time.perf_counter() - self.start, batch_idx - self.warmup + 1


def build_module(config: Path, channels_last: bool, compile: bool) -> SegmentationModule:
    spec = yaml.safe_load(config.read_text())
    # parts: under data, linked to the model
    args = {"parts": spec["data"]["init_args"]["parts"], **spec["model"]["init_args"]}
    keep = ("parts", "arch", "encoder_name", "encoder_depth", "model_kwargs", "loss")
    return SegmentationModule(
        **{k: args[k] for k in keep if k in args}, channels_last=channels_last, compile=compile
    )


def train_flops(config: Path, batch: int, size: int) -> float:
    """FLOPs of one forward + backward of the network at this batch size (counted on the CPU)."""
    net = build_module(config, channels_last=False, compile=False).model
    with FlopCounterMode(display=False) as counter:
        net(torch.rand(batch, 1, size, size)).float().mean().backward()
    return float(counter.get_total_flops())


def peak_tflops(name: str, override: float | None) -> float | None:
    if override:
        return override
    for key, value in PEAK_BF16_TFLOPS.items():  # "H100 PCIe" before "H100"
        if key in name:
            return value
    return None


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "experiments" / "jtml_hrnet_seg.yaml")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30, help="timed steps")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps (compile, cudnn autotune)")
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--accelerator", default="gpu")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--peak-tflops", type=float, help="the device's dense peak for --precision")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.backends.cudnn.benchmark = True
    torch.set_float32_matmul_precision("high")
    torch.manual_seed(0)
    module = build_module(args.config, args.channels_last, args.compile)
    parts = len(module.parts)
    flops = train_flops(args.config, args.batch, args.size)
    timer = StepTimer(args.warmup)
    trainer = pl.Trainer(
        accelerator=args.accelerator, devices=1, precision=args.precision, max_steps=args.warmup + args.steps,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, callbacks=[timer],
    )  # fmt: skip
    data = RandomBatches((args.warmup + args.steps) * args.batch, args.size, parts)
    loader = DataLoader(data, batch_size=args.batch, num_workers=args.workers, pin_memory=True)
    trainer.fit(module, loader)
    steps_per_s = timer.steps / timer.seconds
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    peak = peak_tflops(device, args.peak_tflops)
    mfu = 100.0 * flops * steps_per_s / (peak * 1e12) if peak else None
    flags = [args.precision] + ["channels_last"] * args.channels_last + ["compile"] * args.compile
    options = ", ".join(flags)
    print(
        f"{device}: {args.config.stem} at {args.size}², batch {args.batch}, {options}: "
        f"{steps_per_s * args.batch:.1f} images/s, {flops / 1e9 / args.batch:.1f} GFLOP per image per step, "
        f"MFU {'n/a' if mfu is None else f'{mfu:.1f} %'}",
        flush=True,
    )
    result = {
        "gpu_images_per_s": round(steps_per_s * args.batch, 2),
        "gpu_mfu_pct": None if mfu is None else round(mfu, 1),
        "device": device,
        "config": args.config.name,
        "size": args.size,
        "batch": args.batch,
        "options": options,
        "train_gflop_per_step": round(flops / 1e9, 1),
    }
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
