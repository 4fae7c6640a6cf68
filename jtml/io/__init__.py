"""File formats: JointTrack calibration and pose files, STL models, images and masks."""

from jtml.io.atomic import atomic_write, staged_dir
from jtml.io.calibration import Calibration, read_calibration, write_calibration
from jtml.io.images import (
    IMAGE_SUFFIXES,
    list_images,
    read_image,
    read_mask,
    write_image,
    write_mask,
)
from jtml.io.mesh import read_stl, write_stl
from jtml.io.poses import POSE_COLUMNS, read_poses, write_poses

__all__ = [
    "IMAGE_SUFFIXES",
    "POSE_COLUMNS",
    "Calibration",
    "atomic_write",
    "list_images",
    "read_calibration",
    "read_image",
    "read_mask",
    "read_poses",
    "read_stl",
    "staged_dir",
    "write_calibration",
    "write_image",
    "write_mask",
    "write_poses",
    "write_stl",
]
