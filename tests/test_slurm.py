"""`jtml slurm` prints a valid sbatch script for multi-node DDP with SLURM auto-requeue."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from jtml.cli import main

DEMO = Path(__file__).resolve().parents[1] / "experiments" / "demo_seg.yaml"


def test_sbatch_script(tmp_path, capsys):
    args = ["slurm", "--config", str(DEMO), "--nodes", "2", "--gpus-per-node", "4", "--partition", "gpu"]
    assert main([*args, "--account", "lab", "--mem", "64G", "--", "--trainer.max_epochs", "50"]) == 0
    script = capsys.readouterr().out
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash"
    for option in (
        "--nodes=2",
        "--ntasks-per-node=4",
        "--gpus-per-node=4",
        "--signal=SIGUSR1@90",
        "--requeue",
        "--open-mode=append",
        "--partition=gpu",
        "--account=lab",
        "--mem=64G",
        "--time=24:00:00",
    ):
        assert f"#SBATCH {option}" in lines, option
    assert any(ln.startswith("#SBATCH --output=") for ln in lines)
    (srun,) = [ln for ln in lines if ln.startswith("srun ")]
    assert srun.startswith(f"srun jtml fit --config {DEMO}")
    for part in ("--trainer.num_nodes 2", "--trainer.devices 4", "--trainer.strategy ddp"):
        assert part in srun
    assert "--trainer.accelerator gpu" in srun and "--ckpt_path last" in srun
    assert srun.endswith("--trainer.max_epochs 50")
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    subprocess.run([bash, "-n", str(path)], check=True)


def test_missing_config_is_named(tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    assert main(["slurm", "--config", str(missing), "--nodes", "1", "--gpus-per-node", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and str(missing) in err[0]


SWEEP = Path(__file__).resolve().parents[1] / "experiments" / "sweeps" / "demo_seg_sweep.yaml"


def _sweep_args(parameters: dict, choice: int) -> list[str]:
    """What `wandb agent` passes as ${args} (``--key=value``) for one point of the sweep."""
    import math

    args = []
    for key, spec in parameters.items():
        if "value" in spec:
            value = spec["value"]
        elif "values" in spec:
            value = spec["values"][choice % len(spec["values"])]
        else:
            assert spec["distribution"] == "log_uniform_values"
            value = math.exp((math.log(spec["min"]) + math.log(spec["max"])) / 2)
        args.append(f"--{key}={value}")
    return args


def test_sweep_runs_one_configuration_offline(tmp_path, capsys):
    import json

    import yaml

    sweep = yaml.safe_load(SWEEP.read_text())
    assert sweep["program"] == "jtml" and sweep["metric"]["name"] == "val/dice_mean"
    command = sweep["command"]
    assert command[0] == "${program}" and command[-1] == "${args}" and command[1] == "fit"
    config = Path(__file__).resolve().parents[1] / command[command.index("--config") + 1]
    assert config.is_file()
    keys = set(sweep["parameters"])
    assert {"model.init_args", "model.init_args.optimizer.init_args.lr"} <= keys
    args = _sweep_args(sweep["parameters"], choice=1)  # encoder depth 4
    synth = {"out": str(tmp_path / "synth"), "frames": 8, "seed": 0, "size": 64}
    tiny = [
        "--trainer.default_root_dir", str(tmp_path / "runs"), "--trainer.max_epochs", "1",
        "--trainer.max_steps", "1", "--trainer.limit_val_batches", "1",
        "--data.init_args.synthetic", json.dumps(synth), "--data.init_args.image_size", "64",
        "--data.init_args.batch_size", "2", "--data.init_args.num_workers", "0",
        "--data.init_args.val_fraction", "0.25", "--data.init_args.test_fraction", "0.25",
    ]  # fmt: skip
    argv = [*command[1:-1], *args, *tiny]
    argv[argv.index("--config") + 1] = str(config)
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    recorded = yaml.safe_load((Path(summary["run_dir"]) / "config.yaml").read_text())
    model = recorded["model"]["init_args"]
    assert model["encoder_depth"] == 4 and len(model["model_kwargs"]["decoder_channels"]) == 4
    assert model["optimizer"]["init_args"]["lr"] == pytest.approx(0.003, rel=1e-6)  # log-midpoint
    import torch

    ckpt = torch.load(summary["checkpoint"], map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 1 and ckpt["optimizer_states"][0]["state"]  # one optimizer step ran
