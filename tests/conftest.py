"""Shared fixtures. Real-data tests read ``$JTML_TEST_DATA/kneel1`` and skip clearly without it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(scope="session")
def kneel1() -> Path:
    """The real JointTrack study (3 frames, femur + tibia); skips when JTML_TEST_DATA is unset."""
    root = os.environ.get("JTML_TEST_DATA")
    if not root:
        pytest.skip(
            "JTML_TEST_DATA is not set: real-data test skipped (set it to the folder holding kneel1/)"
        )
    path = Path(root) / "kneel1"
    if not path.is_dir():
        pytest.skip(f"JTML_TEST_DATA={root} has no kneel1/ folder")
    return path
