"""Video files (any container and codec FFmpeg decodes: MP4, AVI, MKV, MOV...) → 8-bit gray frames.

Read with PyAV (FFmpeg's libraries, shipped in its wheel). Frames come in decoding-output order
(presentation order), each converted by FFmpeg to 8-bit gray (``VideoFrame.to_ndarray(format="gray")``:
the luma plane; a gray video's own values). Times are each frame's ``pts × time_base`` in seconds.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import av
import numpy as np

from jtml.errors import JTMLError

PIXEL_RULE = "FFmpeg's conversion of each decoded frame to 8-bit gray (to_ndarray(format='gray'))"


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


class VideoSource:
    """The first video stream of a file: its properties now, its frames when iterated."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise JTMLError("video file not found", self.path)
        with self._open() as container:
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            self._info: dict[str, Any] = {
                "container": container.format.name,
                "codec": stream.codec_context.name,
                "rows": stream.codec_context.height,
                "columns": stream.codec_context.width,
                "pixel_format": stream.codec_context.pix_fmt,
                "fps": float(rate) if rate else None,
                "time_base": str(stream.time_base) if stream.time_base else None,
                "declared_frames": stream.frames or None,  # the container's count; 0 (unknown) → None
            }

    def _open(self) -> av.container.InputContainer:
        try:
            container = av.open(str(self.path))
        except (av.FFmpegError, UnicodeDecodeError) as e:
            raise JTMLError(f"cannot open the video: {_one_line(e)}", self.path) from None
        if not container.streams.video:
            container.close()
            raise JTMLError("the file holds no video stream", self.path)
        return container

    def info(self) -> dict[str, Any]:
        """What import.json records about the source: container, codec, size, fps, time base."""
        return dict(self._info)

    def frames(self, keep: Callable[[int], bool]) -> Iterator[tuple[int, np.ndarray | None, float | None]]:
        """Decode every frame; yield ``(index, gray uint8 or None, time_s)``, converting only the
        frames ``keep(index)`` asks for, so the count of the source's frames is exact."""
        with self._open() as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            try:
                for i, frame in enumerate(container.decode(stream)):
                    image = np.ascontiguousarray(frame.to_ndarray(format="gray")) if keep(i) else None
                    yield i, image, frame.time
            except av.FFmpegError as e:
                raise JTMLError(f"cannot decode the video: {_one_line(e)}", self.path) from None


__all__ = ["PIXEL_RULE", "VideoSource"]
