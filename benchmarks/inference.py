"""Inference speed at 1024² on the CPU: `jtml predict`'s model path and the exported TorchScript model.

- ``predict_fps``: frames/s of ``trainer.predict`` (the LightningModule's ``predict_step``: forward +
  sigmoid) on preprocessed 1024² batches, demo architecture (``experiments/demo_seg.yaml``: Unet,
  resnet18, depth 3), untrained weights (speed only). Data loading and mask writing are not included.
- ``export_fps``: frames/s of the TorchScript model from ``jtml export --size 1024`` (its preprocessing
  included: the demo checkpoint here has image_size 1024, so no resize) on 1×1×1024×1024 raw frames.

Each is timed after one warm-up pass. Prints progress lines, then one JSON line. About a minute.

    .venv/bin/python benchmarks/inference.py [--frames 6] [--batch-size 2]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
import yaml
from torch.utils.data import DataLoader

from jtml.deploy.segmentation import export_segmentation
from jtml.models.segmentation import SegmentationModule

DEMO = Path(__file__).resolve().parents[1] / "experiments" / "demo_seg.yaml"
SIZE = 1024


def _demo_module() -> SegmentationModule:
    spec = yaml.safe_load(DEMO.read_text())
    # parts: under data, linked to the model
    args = {"parts": spec["data"]["init_args"]["parts"], **spec["model"]["init_args"]}
    keep = ("parts", "arch", "encoder_name", "encoder_depth", "model_kwargs", "loss")
    return SegmentationModule(**{k: args[k] for k in keep if k in args})


def _batches(frames: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [
        {"image": torch.rand(1, SIZE, SIZE, generator=g), "frame": f"f{i:03d}", "study": "bench", "index": i}
        for i in range(frames)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=2)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    module = _demo_module().eval()
    loader = DataLoader(_batches(args.frames), batch_size=args.batch_size, num_workers=0)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.predict(module, DataLoader(_batches(1), batch_size=1), return_predictions=False)  # warm-up
    t0 = time.perf_counter()
    trainer.predict(module, loader, return_predictions=False)
    predict_s = time.perf_counter() - t0
    predict_fps = args.frames / predict_s
    print(f"trainer.predict: {args.frames} frames of {SIZE}² in {predict_s:.2f} s", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "demo.ckpt"
        trainer.save_checkpoint(ckpt)
        out = Path(tmp) / "seg.pt"
        t0 = time.perf_counter()
        export_segmentation(ckpt, "torchscript", out, size=SIZE)
        export_s = time.perf_counter() - t0
        model = torch.jit.load(str(out))
    frames = [255.0 * b["image"][None] for b in _batches(args.frames)]
    with torch.no_grad():
        model(frames[0])  # warm-up (the first TorchScript calls optimise the graph)
        model(frames[0])
        t0 = time.perf_counter()
        for x in frames:
            model(x)
        run_s = time.perf_counter() - t0
    export_fps = args.frames / run_s
    print(f"TorchScript: {args.frames} frames of {SIZE}² in {run_s:.2f} s (export took {export_s:.1f} s)")
    result = {
        "predict_fps": round(predict_fps, 3),
        "export_fps": round(export_fps, 3),
        "frames": args.frames,
        "size": SIZE,
        "batch_size": args.batch_size,
        "torch_threads": torch.get_num_threads(),
        "arch": "Unet/resnet18/depth3 (demo_seg)",
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
