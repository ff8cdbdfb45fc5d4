"""The table-file format: one embedding table's rows in one file, the same for the SSD tier and checkpoints.

A table file holds float32 rows ``[num_embeddings, dim + state_dim]`` -- each row's weights,
then its optimizer state -- row ``r`` at byte offset ``r * row_stride``, no header. Packed
files (checkpoints, and SSD working files by default) have ``row_stride = (dim + state_dim) * 4``;
an SSD working file may pad each row with zeros to a multiple of a sector (``row_stride``
recorded in its sidecar). Beside a working file, ``<path>.json`` (the *sidecar*) records
``num_embeddings``, ``dim``, ``state_dim``, ``dtype`` and, while the file is unchanged
since it was written, its ``sha256``; a checkpoint records the same checksum in its manifest.

This module owns the format and its checks: `stream_rows` writes a file (fsynced) while
hashing it, `read_table_file` loads one into any `TableStorage` while verifying it,
`verify_file` checks a file's size and sha256 against an expected ``{bytes, sha256}``, and
`check_bytes` does the same for bytes already in memory.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from tierec.errors import CheckpointError
from tierec.fsio import sha256_file

FORMAT = "tierec-table"
CHUNK_ROWS = 1 << 16  # rows per streamed block when writing or loading a whole file


def sidecar_path(path: str | os.PathLike) -> Path:
    p = Path(path)
    return p.with_name(p.name + ".json")


def read_sidecar(path: str | os.PathLike) -> dict | None:
    """The sidecar of table file ``path`` (None when there is none), checked for the shape keys."""
    side = sidecar_path(path)
    if not side.exists():
        return None
    try:
        meta = json.loads(side.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{side}: table sidecar is not valid JSON ({e}); delete it or recreate the table") from None
    if not isinstance(meta, dict) or not all(k in meta for k in ("num_embeddings", "dim", "state_dim")):
        raise CheckpointError(f"{side}: table sidecar lacks num_embeddings/dim/state_dim")
    return meta


def stream_rows(f, num_rows: int, block: Callable[[int, int], bytes]) -> str:
    """Write rows ``[0, num_rows)`` to the open binary file ``f`` in blocks of `CHUNK_ROWS`
    (``block(a, b)``: the bytes of rows [a, b)), fsync it; returns the sha256 of what was written."""
    h = hashlib.sha256()
    for a in range(0, num_rows, CHUNK_ROWS):
        buf = block(a, min(a + CHUNK_ROWS, num_rows))
        h.update(buf)
        f.write(buf)
    f.flush()
    os.fsync(f.fileno())
    return h.hexdigest()


def row_bytes_of(storage, a: int, b: int) -> bytes:
    """Rows [a, b) of a `TableStorage` as packed table-file bytes (weights | state, float32)."""
    w, s = storage.read_rows(a, b)
    return torch.cat([w.detach().float().cpu(), s.detach().float().cpu()], 1).contiguous().numpy().tobytes()


def write_table_file(path: Path, storage) -> dict:
    """Write a `TableStorage`'s rows as a packed table file at ``path``; returns {bytes, sha256}."""
    with open(path, "wb") as f:
        sha = stream_rows(f, storage.num_embeddings, lambda a, b: row_bytes_of(storage, a, b))
    return {"bytes": path.stat().st_size, "sha256": sha}


def _mismatch(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"{path}: {what}")


def check_size(path: Path, size: int, expect: dict) -> None:
    if size != expect["bytes"]:
        raise _mismatch(path, f"{size} bytes, manifest says {expect['bytes']} (truncated or not this checkpoint's)")


def check_bytes(path: Path, data: bytes, expect: dict) -> None:
    """``data`` (the content of ``path``) against ``expect`` = {bytes, sha256}."""
    check_size(path, len(data), expect)
    if hashlib.sha256(data).hexdigest() != expect["sha256"]:
        raise _mismatch(path, "sha256 does not match the checkpoint manifest (corrupt file)")


def verify_file(path: Path, expect: dict) -> None:
    """Check a file's size and sha256 against ``expect`` = {bytes, sha256} (streams the file)."""
    if not path.is_file():
        raise _mismatch(path, "listed in the checkpoint manifest but missing")
    check_size(path, path.stat().st_size, expect)
    if sha256_file(path) != expect["sha256"]:
        raise _mismatch(path, "sha256 does not match the checkpoint manifest (corrupt file)")


def read_table_file(path: Path, storage, expect: dict) -> None:
    """Load the packed table file ``path`` into ``storage`` (``write_rows``), verifying its size against the
    table's shape and ``expect`` and its sha256 as it reads (a mismatch: `CheckpointError`, naming it)."""
    n, d, s = storage.num_embeddings, storage.dim, storage.state_dim
    width = d + s
    if not path.is_file():
        raise _mismatch(path, "table file is missing")
    size = path.stat().st_size
    if size != n * width * 4:
        raise _mismatch(path, f"{size} bytes, expected {n * width * 4} ({n} rows x {width} float32); the file is "
                              "truncated or does not belong to this checkpoint")
    check_size(path, size, expect)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for a in range(0, n, CHUNK_ROWS):
            b = min(a + CHUNK_ROWS, n)
            raw = f.read((b - a) * width * 4)
            h.update(raw)
            rows = torch.from_numpy(np.frombuffer(raw, dtype=np.float32).reshape(b - a, width).copy())
            storage.write_rows(a, rows[:, :d], rows[:, d:])
    if h.hexdigest() != expect["sha256"]:
        raise _mismatch(path, "sha256 does not match the checkpoint manifest (corrupt table file)")
