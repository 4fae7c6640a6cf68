"""Read a W&B offline run back from disk: its config, metric history and summary.

W&B stores an offline run as ``run-<id>.wandb``: a LevelDB-style log (32 KiB blocks, 7-byte
record headers) of protobuf ``Record`` messages, after a 7-byte ``:W&B`` file header. This
reader lets ``jtml runs`` and the tests inspect offline runs without uploading or mocking.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jtml.errors import JTMLError

_BLOCK = 32 * 1024
_FILE_HEADER = struct.Struct("<4sHB")  # ident, magic, version
_RECORD_HEADER = struct.Struct("<IHB")  # crc32c, length, type
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


@dataclass
class OfflineRun:
    """What one offline run logged."""

    path: Path
    run_id: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)

    def series(self, key: str) -> list[tuple[int, float]]:
        """``(step, value)`` pairs of a scalar metric, in logging order."""
        return [(int(h.get("_step", i)), h[key]) for i, h in enumerate(self.history) if key in h]


def _records(data: bytes, source: Path) -> list[bytes]:
    ident, magic, _version = _FILE_HEADER.unpack_from(data, 0)
    if ident != b":W&B" or magic != 0xBEE1:
        raise JTMLError("not a W&B run file (bad header)", source)
    out: list[bytes] = []
    pos, pending = _FILE_HEADER.size, b""
    while pos + _RECORD_HEADER.size <= len(data):
        left_in_block = _BLOCK - pos % _BLOCK
        if left_in_block < _RECORD_HEADER.size:  # block trailer padding
            pos += left_in_block
            continue
        _crc, length, kind = _RECORD_HEADER.unpack_from(data, pos)
        pos += _RECORD_HEADER.size
        chunk = data[pos : pos + length]
        pos += length
        if kind == 0 and length == 0:  # zero padding at the end of a block
            continue
        if kind == _FULL:
            out.append(chunk)
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            out.append(pending + chunk)
            pending = b""
    return out


def _item_value(item: Any) -> Any:
    return json.loads(item.value_json) if item.value_json else None


def read_offline_run(run_dir: str | Path) -> OfflineRun:
    """Parse ``run_dir/run-*.wandb`` (an ``offline-run-…`` folder)."""
    from wandb.proto import wandb_internal_pb2 as pb

    run_dir = Path(run_dir)
    files = sorted(run_dir.glob("run-*.wandb"))
    if not files:
        raise JTMLError("no run-*.wandb file: not a W&B offline run folder", run_dir)
    run = OfflineRun(path=run_dir)
    for raw in _records(files[0].read_bytes(), files[0]):
        rec = pb.Record()
        try:
            rec.ParseFromString(raw)
        except Exception:  # a torn last record of a killed run: stop there
            break
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            run.run_id = rec.run.run_id
            for item in rec.run.config.update:
                run.config[item.key] = _item_value(item)
        elif kind == "config":
            for item in rec.config.update:
                run.config[item.key] = _item_value(item)
        elif kind == "history":
            row = {}
            for item in rec.history.item:
                key = item.key or "/".join(item.nested_key)
                row[key] = _item_value(item)
            run.history.append(row)
        elif kind == "summary":
            for item in rec.summary.update:
                key = item.key or "/".join(item.nested_key)
                run.summary[key] = _item_value(item)
    return run
