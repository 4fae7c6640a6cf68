"""Frames and masks: 8/16-bit TIFF (incl. LZW), PNG, JPEG, read and written with OpenCV.

Frames are returned as 2-D grayscale arrays in their stored depth (uint8 or uint16).
Masks are returned as uint8 {0, 1}; they are written the lab's way: uint8 {0, 255}, LZW TIFF.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from jtml.errors import JTMLError
from jtml.io.atomic import atomic_write

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp")
_TIFF_LZW = 5
# Decoding errors become one JTMLError naming the file; OpenCV's own log lines would only add noise.
cv2.setLogLevel(0)  # 0 = silent


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files directly in ``folder``, in file-name order (the order pose rows follow)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise JTMLError("image folder not found", folder)
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
    )


def _decode(path: Path) -> np.ndarray:
    if not path.is_file():
        raise JTMLError("image file not found", path)
    data = np.fromfile(path, dtype=np.uint8)
    if data.size == 0:
        raise JTMLError("image file is empty", path)
    img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if img is None or img.size == 0:
        raise JTMLError("cannot decode image (corrupt, truncated or not an image)", path)
    if img.ndim == 3:
        if img.shape[2] == 4:
            img = cv2.cvtColor(img, cv2.COLOR_BGRA2GRAY)
        elif img.shape[2] == 3:
            img = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
        else:
            img = img[..., 0]
    if img.dtype not in (np.uint8, np.uint16):
        raise JTMLError(f"unsupported pixel type {img.dtype}; expected 8- or 16-bit grayscale", path)
    return np.ascontiguousarray(img)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read a frame as a 2-D uint8/uint16 array (colour files are converted to gray)."""
    return _decode(Path(path))


def read_mask(path: str | os.PathLike, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Read a binary mask as uint8 {0, 1}; ``shape`` (H, W) is the frame it must match."""
    path = Path(path)
    img = _decode(path)
    if shape is not None and tuple(img.shape) != tuple(shape):
        raise JTMLError(
            f"mask size {img.shape[1]}x{img.shape[0]} differs from its frame's {shape[1]}x{shape[0]}", path
        )
    values = np.unique(img)
    if len(values) > 2 or (len(values) == 2 and values[0] != 0):
        shown = ", ".join(str(v) for v in values[:6]) + (", ..." if len(values) > 6 else "")
        raise JTMLError(f"mask is not binary: values {{{shown}}}; expected {{0, 255}} or {{0, 1}}", path)
    return (img > 0).astype(np.uint8)


def write_image(path: str | os.PathLike, image: np.ndarray) -> None:
    """Write a grayscale frame (TIFF gets LZW) atomically."""
    path = Path(path)
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise JTMLError(f"unsupported image suffix {path.suffix!r}", path)
    params: list[int] = []
    if path.suffix.lower() in (".tif", ".tiff"):
        params = [cv2.IMWRITE_TIFF_COMPRESSION, _TIFF_LZW]
    ok, buf = cv2.imencode(path.suffix, np.ascontiguousarray(image), params)
    if not ok:
        raise JTMLError("cannot encode image", path)
    with atomic_write(path) as tmp:
        buf.tofile(tmp)


def write_mask(path: str | os.PathLike, mask: np.ndarray) -> None:
    """Write a mask in the lab's label format: uint8 {0, 255}, LZW-compressed TIFF."""
    write_image(path, np.where(np.asarray(mask) > 0, 255, 0).astype(np.uint8))
