"""Train DataLoader throughput at 1024²: jtml's default lab recipe vs the exact-elastic one.

Generates a synthetic 1024² study in a temporary folder (``jtml.sim.synth``), runs
``FluoroSegDataModule``'s train loader for each recipe after a warm-up (worker start, first
batches) and prints samples/s side by side with the CPU time per sample of the loader's
processes (what the loader costs, whatever else the cores run), then one JSON line. The exact
elastic costs seconds per frame, so it runs fewer batches.

    python benchmarks/loader.py [--batches 40] [--exact-batches 5] [--workers 2] [--batch-size 4]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def make_study(out: Path, frames: int, size: int) -> Path:
    from jtml.sim.synth import generate_study

    return generate_study(out, frames=frames, seed=0, size=size)


def _cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of these processes so far (Linux /proc; 0 elsewhere)."""
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            pass
    return total


def measure(study: Path, recipe: str, args: argparse.Namespace, batches: int) -> tuple[float, float]:
    """(samples/s, CPU seconds per sample over the loader's processes)."""
    from jtml.data.segmentation import FluoroSegDataModule

    dm = FluoroSegDataModule(
        studies=[str(study)],
        image_size=args.size,
        train_transforms=recipe,
        batch_size=args.batch_size,
        num_workers=args.workers,
        persistent_workers=True,
        val_fraction=0.2,
        test_fraction=0.0,
    )
    dm.setup("fit")
    need = (batches + args.warmup) * args.batch_size
    rows = dm.train_dataset.rows
    dm.train_dataset.rows = (rows * (need // len(rows) + 1))[: need + args.batch_size]  # one long epoch
    it = iter(dm.train_dataloader())
    for _ in range(args.warmup):
        next(it)
    pids = [os.getpid(), *(w.pid for w in getattr(it, "_workers", []))]
    cpu0, start = _cpu_seconds(pids), time.perf_counter()
    for _ in range(batches):
        batch = next(it)
    elapsed, cpu = time.perf_counter() - start, _cpu_seconds(pids) - cpu0
    assert batch["image"].shape == (args.batch_size, 1, args.size, args.size)
    del it
    samples = batches * args.batch_size
    return samples / elapsed, cpu / samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=40, help="timed batches, default recipe (40)")
    parser.add_argument("--exact-batches", type=int, default=5, help="timed batches, exact elastic (5)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed batches first (3)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--size", type=int, default=1024, help="frame and network size (1024)")
    parser.add_argument("--frames", type=int, default=16, help="frames in the synthetic study (16)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="jtml-loader-") as tmp:
        study = make_study(Path(tmp) / "bench", args.frames, args.size)
        fast, fast_cpu = measure(study, "lab", args, args.batches)
        exact, exact_cpu = measure(study, "lab_exact", args, min(args.exact_batches, args.batches))
    print(
        f"train loader, {args.size}² frames, batch {args.batch_size}, "
        f"{args.workers} workers, {os.cpu_count()} CPUs"
    )
    # CPU per sample is what the loader costs; samples/s also depends on what else the cores run.
    print(f"  {'recipe':<28}{'samples/s':>10}{'CPU ms/sample':>15}")
    print(f"  {'lab (fast elastic, default)':<28}{fast:>10.1f}{1000 * fast_cpu:>15.0f}")
    print(f"  {'lab_exact (exact elastic)':<28}{exact:>10.2f}{1000 * exact_cpu:>15.0f}")
    print(
        json.dumps(
            {"loader_samples_per_s": round(fast, 2), "loader_exact_elastic_samples_per_s": round(exact, 2)}
        )
    )


if __name__ == "__main__":
    main()
