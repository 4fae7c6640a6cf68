"""The GPU fit benchmark runs anywhere (here on the CPU, tiny): its FLOP count and MFU arithmetic."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _gpu_fit():
    spec = importlib.util.spec_from_file_location("gpu_fit", ROOT / "benchmarks" / "gpu_fit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_fit_benchmark_smoke_on_cpu():
    gpu_fit = _gpu_fit()
    config = ROOT / "experiments" / "demo_seg.yaml"
    small, large = (gpu_fit.train_flops(config, 2, s) for s in (64, 128))
    assert small > 0 and large == pytest.approx(4 * small, rel=0.02)  # convolutions scale with pixels
    args = ["--accelerator", "cpu", "--size", "64", "--batch", "2", "--steps", "2", "--warmup", "1"]
    out = gpu_fit.main([*args, "--precision", "32-true", "--config", str(config), "--workers", "0",
                        "--peak-tflops", "2"])  # fmt: skip
    assert out["train_gflop_per_step"] == pytest.approx(small / 1e9, abs=0.06)
    steps_per_s = out["gpu_images_per_s"] / 2
    expected = 100 * out["train_gflop_per_step"] * 1e9 * steps_per_s / 2e12
    assert out["gpu_mfu_pct"] == pytest.approx(expected, rel=0.05, abs=0.06)
    assert gpu_fit.peak_tflops("NVIDIA H100 PCIe", None) == 756.0
    assert gpu_fit.peak_tflops("NVIDIA H100 80GB HBM3", None) == 989.0
    assert gpu_fit.peak_tflops("cpu", None) is None
