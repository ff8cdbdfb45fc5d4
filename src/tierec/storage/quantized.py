"""Quantized row files: a table's weights in fp32, fp16, bf16, row-wise int8 or int4, read by the SSD tier as they are.

A *row file* (``tables/<name>.rows`` of a serving export, `tierec.inference.export`) holds a table's
weights only (no optimizer state), one packed row per ID, row ``r`` at byte ``r * row_bytes``, no header,
little-endian. Each row is encoded by a `RowCodec`:

=======  ===============================================================  ===================  =========
dtype    row layout (bytes)                                               row_bytes             dim 64
=======  ===============================================================  ===================  =========
fp32     D x float32                                                      4 D                   256
fp16     D x float16, zero-padded to a multiple of 4 bytes                4 ceil(D / 2)         128
bf16     D x bfloat16, zero-padded to a multiple of 4 bytes               4 ceil(D / 2)         128
int8     D x uint8 code, padded to 4 bytes, float32 scale, float32 bias   4 ceil(D / 4) + 8     72
int4     ceil(D / 2) bytes of two 4-bit codes (element 2i in the low      4 ceil(D / 8) + 8     40
         nibble), padded to 4 bytes, float32 scale, float32 bias
=======  ===============================================================  ===================  =========

int8 / int4 are FBGEMM's fused row-wise quantization (min/max affine per row): ``bias = min(row)``,
``scale = (max(row) - min(row)) / (2^bits - 1)``, ``code = round((x - bias) / scale)`` and back
``x' = code * scale + bias``; so ``|x - x'| <= scale / 2`` per element (plus float32 rounding of the
arithmetic, ~1e-7 relative), and a row's minimum is exact. A constant row has scale 0 and is exact.
The scale and bias sit at the end of the row (FBGEMM's fused layout: ``[codes | scale | bias]``), so one
read brings a row and its parameters together. fp16 / bf16 round to nearest even (torch's casts).

Every ``row_bytes`` is a multiple of 4, so a row is ``words = row_bytes / 4`` 32-bit words: the SSD
tier (`tierec.storage.ssd.SsdTable`, `tierec.storage.multifile.read_many`) and the DRAM cache
(`tierec.storage.cache.CachedTable`) move a quantized row as ``words`` opaque float32 values -- only
copies (gathers, scatters), never arithmetic, so the bits pass through unchanged -- and `RowCodec.decode`
turns the gathered words into float32 weights after the gather. A cache of N bytes thus holds
``256 / 72 = 3.6x`` more int8 rows of dim 64 than fp32 rows.

A row file is checked against its manifest entry chunk by chunk (``chunk_rows`` rows per sha256;
``sha256`` is the digest of the chunk digests, as row sets of checkpoints do): `RowFileWriter` writes
and hashes, `verify_row_file` checks, `read_row_file` loads while checking, `open_row_file` opens
one read-only as an `SsdTable` of ``words`` columns.
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tierec.errors import CheckpointError, ConfigError
from tierec.storage.ssd import SsdTable

ROW_DTYPES = ("fp32", "fp16", "bf16", "int8", "int4")
CHUNK_ROWS = 1 << 20  # rows per sha256 of a row file
READ_ROWS = 1 << 16  # rows per read when streaming a row file


@dataclass(frozen=True)
class RowCodec:
    """How a table's float32 rows of ``dim`` values are stored as ``dtype`` (module doc: the layouts)."""

    dtype: str
    dim: int

    def __post_init__(self):
        if self.dtype not in ROW_DTYPES:
            raise ConfigError(f"row dtype must be one of {', '.join(ROW_DTYPES)}, got {self.dtype!r}")
        if self.dim < 1:
            raise ConfigError(f"row dim must be >= 1, got {self.dim}")
        if sys.byteorder != "little":
            raise ConfigError("quantized row files are little-endian; this machine is big-endian")

    @property
    def bits(self) -> int:
        return {"fp32": 32, "fp16": 16, "bf16": 16, "int8": 8, "int4": 4}[self.dtype]

    @property
    def affine(self) -> bool:
        """True for the row-wise integer codes (a scale and a bias per row)."""
        return self.dtype in ("int8", "int4")

    @property
    def code_words(self) -> int:
        """32-bit words of a row's values (codes), before the scale and bias."""
        return math.ceil(self.dim * self.bits / 32)

    @property
    def words(self) -> int:
        """32-bit words per row: what the SSD tier and the cache move per row."""
        return self.code_words + (2 if self.affine else 0)

    @property
    def row_bytes(self) -> int:
        return 4 * self.words

    @property
    def identity(self) -> bool:
        """fp32: the words are the weights themselves."""
        return self.dtype == "fp32"

    # ------------------------------------------------------------------ encode / decode
    def encode(self, rows: torch.Tensor) -> torch.Tensor:
        """float32 rows [n, dim] -> their stored words (float32 [n, words], bit patterns of the layout)."""
        x = rows.detach().to("cpu", torch.float32).contiguous()
        n, D = x.shape
        if D != self.dim:
            raise ValueError(f"rows of {D} values, codec of dim {self.dim}")
        out = torch.zeros(n, self.words, dtype=torch.float32)
        if self.dtype == "fp32":
            out.copy_(x)
            return out
        if self.dtype in ("fp16", "bf16"):
            half = x.to(torch.float16 if self.dtype == "fp16" else torch.bfloat16)
            out.view(torch.int16)[:, :D] = half.view(torch.int16)
            return out
        levels = (1 << self.bits) - 1
        lo, hi = x.min(1).values, x.max(1).values
        scale = (hi - lo) / levels
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.round((x - lo[:, None]) / safe[:, None]).clamp_(0, levels).to(torch.uint8)
        codes = out[:, : self.code_words].view(torch.uint8)  # [n, 4 * code_words]
        if self.dtype == "int8":
            codes[:, :D] = q
        else:
            if D % 2:
                q = torch.cat([q, torch.zeros(n, 1, dtype=torch.uint8)], 1)
            codes[:, : q.shape[1] // 2] = q[:, 0::2] | (q[:, 1::2] << 4)
        out[:, -2], out[:, -1] = scale, lo
        return out

    def decode(self, words: torch.Tensor) -> torch.Tensor:
        """Stored words (float32 [n, words], as `encode` made them) -> float32 rows [n, dim] (fresh)."""
        D = self.dim
        if self.dtype == "fp32":
            return words if words.shape[1] == D else words[:, :D].contiguous()
        w = words.contiguous()
        if self.dtype in ("fp16", "bf16"):
            return w.view(torch.float16 if self.dtype == "fp16" else torch.bfloat16)[:, :D].to(torch.float32)
        codes = w[:, : self.code_words].contiguous().view(torch.uint8)
        if self.dtype == "int8":
            q = codes[:, :D]
        else:
            half = codes[:, : math.ceil(D / 2)]
            q = torch.stack([half & 0xF, half >> 4], 2).reshape(w.shape[0], 2 * half.shape[1])[:, :D]
        return torch.addcmul(w[:, -1:], q.to(torch.float32), w[:, -2:-1])

    def max_error(self, words: torch.Tensor) -> torch.Tensor:
        """float32 [n]: the largest ``|x - decode(encode(x))|`` the layout allows per element of each row
        (int8 / int4: scale / 2 -- exact arithmetic; fp16 / bf16: half a unit in the last place of the row's
        largest value; fp32: 0)."""
        if self.affine:
            return words[:, -2] / 2
        if self.dtype == "fp32":
            return torch.zeros(words.shape[0])
        big = self.decode(words).abs().max(1).values
        mant, tiny = (10, 2.0**-25) if self.dtype == "fp16" else (7, 0.0)  # fp16 subnormals: a fixed step of 2^-24
        half_ulp = torch.exp2(torch.floor(torch.log2(big.clamp(min=1e-38))) - mant - 1)
        return torch.where(big > 0, half_ulp.clamp(min=tiny), torch.zeros_like(big))


# ---------------------------------------------------------------------- the file and its checks
class RowFileWriter:
    """Writes the row file ``path`` from float32 rows given in row order (`add`), encoding them with ``codec``
    and hashing them one `CHUNK_ROWS` chunk at a time; `finish` fsyncs it and returns its manifest entry."""

    def __init__(self, path: Path, codec: RowCodec, num_rows: int):
        self.path, self.codec, self.num_rows = path, codec, int(num_rows)
        self._f = open(path, "wb")
        self._root = hashlib.sha256()
        self._chunk = hashlib.sha256()
        self.chunks: list[str] = []
        self.rows = 0

    def add(self, rows: torch.Tensor) -> None:
        """The next float32 rows [k, dim] (a chunk's boundary may fall inside them)."""
        data = self.codec.encode(rows).numpy()
        a = 0
        while a < data.shape[0]:
            take = min(data.shape[0] - a, CHUNK_ROWS - self.rows % CHUNK_ROWS)
            raw = data[a : a + take].tobytes()
            self._chunk.update(raw)
            self._f.write(raw)
            self.rows += take
            a += take
            if self.rows % CHUNK_ROWS == 0:
                self._close_chunk()

    def _close_chunk(self) -> None:
        digest = self._chunk.hexdigest()
        self.chunks.append(digest)
        self._root.update(digest.encode())
        self._chunk = hashlib.sha256()

    def finish(self) -> dict:
        if self.rows != self.num_rows:
            raise ValueError(f"{self.path}: {self.rows} rows written, {self.num_rows} expected")
        if self.rows % CHUNK_ROWS:
            self._close_chunk()
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        return {"bytes": self.path.stat().st_size, "sha256": self._root.hexdigest(), "rows": self.rows,
                "row_dtype": self.codec.dtype, "row_bytes": self.codec.row_bytes, "chunk_rows": CHUNK_ROWS,
                "chunks": self.chunks}

    def close(self) -> None:
        self._f.close()


def _check_entry(path: Path, expect: dict, codec: RowCodec, num_rows: int) -> None:
    """The manifest entry against the table's shape, and the file's size against both."""
    try:
        ok = (int(expect["rows"]) == num_rows and expect["row_dtype"] == codec.dtype
              and int(expect["row_bytes"]) == codec.row_bytes and int(expect["chunk_rows"]) > 0
              and len(expect["chunks"]) == math.ceil(num_rows / int(expect["chunk_rows"])))
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise CheckpointError(f"{path}: its manifest entry does not describe {num_rows} rows of {codec.dtype} "
                              f"({codec.row_bytes} B each) in chunks; the export manifest is corrupt")
    if not path.is_file():
        raise CheckpointError(f"{path}: listed in the export manifest but missing")
    size = path.stat().st_size
    if size != num_rows * codec.row_bytes:
        raise CheckpointError(f"{path}: {size} bytes, expected {num_rows * codec.row_bytes} ({num_rows} rows x "
                              f"{codec.row_bytes} B of {codec.dtype}); truncated or not this export's")


def iter_row_file(path: Path, expect: dict, codec: RowCodec, num_rows: int) -> Iterator[tuple[int, torch.Tensor]]:
    """(first row, stored words float32 [k, words]) of row file ``path``, `READ_ROWS` rows at a time, each
    chunk's sha256 checked as its last rows are read (a mismatch: `CheckpointError` naming the chunk)."""
    _check_entry(path, expect, codec, num_rows)
    step, rb = int(expect["chunk_rows"]), codec.row_bytes
    with open(path, "rb") as f:
        for j, digest in enumerate(expect["chunks"]):
            a0, b0 = j * step, min((j + 1) * step, num_rows)
            h = hashlib.sha256()
            for a in range(a0, b0, READ_ROWS):
                b = min(a + READ_ROWS, b0)
                raw = f.read((b - a) * rb)
                h.update(raw)
                if len(raw) != (b - a) * rb or (b == b0 and h.hexdigest() != digest):
                    raise CheckpointError(f"{path}: chunk {j} (rows {a0}..{b0 - 1}) does not match its sha256 in "
                                          "the export manifest (corrupt row file)")
                yield a, torch.from_numpy(np.frombuffer(raw, dtype=np.float32).reshape(b - a, codec.words).copy())


def verify_row_file(path: Path, expect: dict, codec: RowCodec, num_rows: int) -> None:
    """Check row file ``path`` against its manifest entry (size, then every chunk's sha256)."""
    for _ in iter_row_file(path, expect, codec, num_rows):
        pass


def read_row_file(path: Path, expect: dict, codec: RowCodec, num_rows: int, out: torch.Tensor) -> None:
    """Load row file ``path`` (stored words) into ``out`` (float32 [num_rows, words]), checked as it is read."""
    for a, words in iter_row_file(path, expect, codec, num_rows):
        out[a : a + words.shape[0]] = words


def open_row_file(path: Path, expect: dict, codec: RowCodec, num_rows: int, *, verify: bool = True,
                  direct_io: bool = False) -> SsdTable:
    """Row file ``path`` read-only as an `SsdTable` of ``codec.words`` float32 columns (the stored words; no
    state): the SSD tier reads the rows as stored, `RowCodec.decode` makes weights of them after the gather.
    ``verify``: check every chunk first; else only the size."""
    if verify:
        verify_row_file(path, expect, codec, num_rows)
    else:
        _check_entry(path, expect, codec, num_rows)
    return SsdTable(path, num_rows, codec.words, 0, readonly=True, direct_io=direct_io)
