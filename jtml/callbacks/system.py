"""Callbacks about the machine a run uses rather than about the model."""

from __future__ import annotations

import os

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn

__all__ = ["CPUThreads", "cpu_has_bf16"]


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX), as oneDNN sees it."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch built without oneDNN
        return False


class CPUThreads(pl.Callback):
    """Set torch's intra-op CPU threads for a CPU run: ``num_threads``, or by default the cores
    left after the DataLoader workers (at least 1).

    Why: PyTorch's OpenMP threads spin at every barrier. When they share the cores with the data
    workers (or other jobs), a thread that loses its core stalls all others — on a 2-core machine
    with one worker, 2 threads trained 3–8× slower than 1 in our measurements. It also warns when
    the run asks for bf16 on a CPU that only emulates it (the pose YAMLs' ``bf16-mixed`` is ~2×
    faster with AVX512-BF16/AMX and ~9× slower without).
    """

    def __init__(self, num_threads: int | None = None) -> None:
        super().__init__()
        if num_threads is not None and num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {num_threads}")
        self.num_threads = num_threads
        self._previous: int | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if pl_module.device.type != "cpu":
            return
        n = self.num_threads
        if n is None:
            workers = int(getattr(trainer.datamodule, "num_workers", 0) or 0) if trainer.datamodule else 0
            n = max(1, (os.cpu_count() or 1) - workers)
        self._previous = torch.get_num_threads()
        torch.set_num_threads(n)
        rank_zero_info(f"torch CPU threads: {n}")
        precision = str(getattr(trainer, "precision", ""))
        if precision.startswith("bf16") and not cpu_has_bf16():
            rank_zero_warn(
                f"precision {precision} on a CPU without bf16 instructions (AVX512-BF16/AMX): bf16 is "
                "emulated, ~9x slower than float32 on a 2-core AMD EPYC without AVX-512 (demo_pose "
                "steps 8 s vs 0.9 s); pass --trainer.precision 32-true"
            )

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Give the process its thread count back: a later run in the same process (a notebook,
        the test suite) must not inherit this run's set-up, or it would not reproduce its own
        stand-alone results (thread count changes the float summation order)."""
        if self._previous is not None:
            torch.set_num_threads(self._previous)
            self._previous = None
