"""Lightning overhead: the same model, data and optimizer for N steps through `jtml fit` vs a plain
PyTorch loop written only here.

`jtml fit` is run twice in a subprocess, for ``--short`` and ``--long`` steps; the difference of
the two wall times divided by the difference in steps is Lightning's time per step, with every
start-up cost (imports, data set-up, worker start, checkpoint at the end) cancelled out. The
plain loop times the same number of steps after the same warm-up, with the same DataLoader,
loss and optimizer. ``--repeats`` interleaves the three measurements and reports medians. Prints
one JSON line with ``lightning_overhead_pct``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "experiments" / "demo_seg.yaml"


def overrides(tmp: Path, size: int, batch: int) -> list[str]:
    synth = {"out": str(tmp / "study"), "frames": 64, "seed": 0, "size": size}
    return [
        "--trainer.default_root_dir", str(tmp / "runs"), "--trainer.logger", "false",
        "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0",
        "--trainer.enable_progress_bar", "false", "--trainer.max_epochs", "-1",
        "--data.init_args.synthetic", json.dumps(synth), "--data.init_args.image_size", str(size),
        "--data.init_args.batch_size", str(batch), "--data.init_args.num_workers", "1",
        "--data.init_args.val_fraction", "0.05", "--data.init_args.test_fraction", "0",
        "--model.init_args.lr_scheduler", "null",  # as the plain loop; an open-ended fit has no T_max
    ]  # fmt: skip


def lightning_fit(tmp: Path, steps: int, size: int, batch: int) -> float:
    cmd = [sys.executable, "-m", "jtml.cli", "fit", "--config", str(CONFIG), *overrides(tmp, size, batch)]
    t0 = time.perf_counter()
    proc = subprocess.run([*cmd, "--trainer.max_steps", str(steps)], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"jtml fit failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def plain_loop(tmp: Path, warmup: int, steps: int, size: int, batch: int) -> float:
    """The same network, loss, optimizer and DataLoader, driven by hand."""
    import yaml

    from jtml.data.segmentation import FluoroSegDataModule
    from jtml.models.losses import build_loss
    from jtml.models.segmentation import SegmentationModule

    spec = yaml.safe_load(CONFIG.read_text())
    torch.manual_seed(spec["seed_everything"])
    margs = spec["model"]["init_args"]
    model = SegmentationModule(
        parts=spec["data"]["init_args"]["parts"],  # linked to the model from data
        arch=margs["arch"],
        encoder_name=margs["encoder_name"],
        encoder_depth=margs["encoder_depth"],
        model_kwargs=margs["model_kwargs"],
    ).model
    loss_fn = build_loss(margs["loss"])
    opt = torch.optim.AdamW(model.parameters(), **margs["optimizer"]["init_args"])
    dargs = {**spec["data"]["init_args"], "synthetic": None, "studies": [str(tmp / "study")]}
    dargs.update(image_size=size, batch_size=batch, num_workers=1, val_fraction=0.05, test_fraction=0.0)
    dm = FluoroSegDataModule(**dargs)
    dm.setup("fit")
    loader = dm.train_dataloader()
    model.train()
    done, t0 = 0, 0.0
    while done < warmup + steps:
        for b in loader:
            if done == warmup:
                t0 = time.perf_counter()
            loss = loss_fn(model(b["image"]), b["mask"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            done += 1
            if done == warmup + steps:
                break
    return (time.perf_counter() - t0) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--short", type=int, default=5)
    parser.add_argument("--long", type=int, default=45)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats; medians are reported")
    args = parser.parse_args()
    pl_steps, plain_steps = [], []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        lightning_fit(tmp, 1, args.size, args.batch)  # generates the study once, warms caches
        for _ in range(args.repeats):  # interleaved, so a slow spell of the machine hits both sides
            short = lightning_fit(tmp, args.short, args.size, args.batch)
            long = lightning_fit(tmp, args.long, args.size, args.batch)
            pl_steps.append((long - short) / (args.long - args.short))
            plain_steps.append(plain_loop(tmp, args.short, args.long - args.short, args.size, args.batch))
    per_step_pl, per_step_plain = statistics.median(pl_steps), statistics.median(plain_steps)
    pct = 100.0 * (per_step_pl / per_step_plain - 1.0)
    pl_ms, plain_ms = round(per_step_pl * 1000, 1), round(per_step_plain * 1000, 1)
    print(
        f"{args.size}px batch {args.batch}, {args.long - args.short} timed steps x {args.repeats}: jtml fit "
        f"{pl_ms} ms/step, plain loop {plain_ms} ms/step (each repeat: jtml "
        f"{[round(1000 * t, 1) for t in pl_steps]}, plain {[round(1000 * t, 1) for t in plain_steps]})"
    )
    result = {"lightning_overhead_pct": round(pct, 2), "lightning_step_ms": pl_ms, "plain_step_ms": plain_ms}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
