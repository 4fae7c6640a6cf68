"""What a run records about where it came from: git commit, dirty flag, package versions."""

from __future__ import annotations

import platform
import subprocess
from importlib import metadata
from pathlib import Path

PACKAGES = (
    "jtml",
    "torch",
    "torchvision",
    "pytorch-lightning",
    "torchmetrics",
    "segmentation-models-pytorch",
    "timm",
    "albumentations",
    "wandb",
    "numpy",
    "opencv-python-headless",
    "trimesh",
)


def git_info(cwd: str | Path | None = None) -> dict[str, object]:
    """``{"sha": …, "dirty": …}`` of the source tree jtml runs from (None outside git)."""
    cwd = Path(cwd) if cwd else Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return {"sha": None, "dirty": None}
    return {"sha": sha, "dirty": bool(status.strip())}


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out
