"""STL implant models (mm) through trimesh, validated so a bad file fails with its name."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import trimesh

from jtml.errors import JTMLError
from jtml.io.atomic import atomic_write


def read_stl(path: str | os.PathLike) -> trimesh.Trimesh:
    """Load an STL (binary or ASCII) without merging or repairing: vertices stay as in the file."""
    path = Path(path)
    if not path.is_file():
        raise JTMLError("STL file not found", path)
    if path.stat().st_size == 0:
        raise JTMLError("STL file is empty", path)
    try:
        mesh = trimesh.load_mesh(path, file_type="stl", process=False)
    except Exception as e:  # trimesh raises a zoo of types for corrupt files
        raise JTMLError(f"cannot parse STL: {e}", path) from None
    if isinstance(mesh, trimesh.Scene):
        geoms = list(mesh.geometry.values())
        mesh = trimesh.util.concatenate(geoms) if geoms else trimesh.Trimesh()
    if mesh.faces is None or len(mesh.faces) == 0:
        raise JTMLError("STL has no triangles", path)
    if not np.isfinite(mesh.vertices).all():
        raise JTMLError("STL has NaN or infinite vertex coordinates", path)
    return mesh


def write_stl(path: str | os.PathLike, mesh: trimesh.Trimesh) -> None:
    """Write a binary STL atomically."""
    with atomic_write(path) as tmp:
        tmp.write_bytes(trimesh.exchange.stl.export_stl(mesh))
