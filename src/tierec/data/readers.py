"""Streaming readers for raw recommendation data: Criteo, libSVM / libFM, MovieLens.

Every reader streams its input in blocks of ``block_size`` bytes (constant
memory whatever the input size), parses each block with vectorised pyarrow /
numpy code, and yields `Block` objects: a `Chunk` of already-preprocessed rows
(hashed categorical IDs, log-transformed dense values) plus the 1-based input
line number of every row. With ``raw_ids=True`` the IDs are raw: the full 64-bit
hashes, never reduced into a table (`tierec.data.hashing.hash_strings_raw`). See
``docs/data.md`` for the formats and rules.

    reader = open_reader("train.txt", "criteo-tsv", num_embeddings=1_000_000)
    reader.schema                      # tierec Schema of the rows it yields
    for block in reader:               # Block(chunk, lines)
        ...
    reader.stats                       # rows read, bad rows skipped

Malformed rows raise `DataError` ("file:line: what was wrong") unless
``skip_bad_rows=True``, which drops and counts them. Blank lines (empty or
whitespace only) are skipped everywhere and still count for line numbers. An
input that cannot be read or decompressed (truncated or corrupt .gz/.bz2/.xz/.zst)
raises `DataError` naming the file, wherever in the stream it breaks. Missing or
empty inputs, bad sizes and unknown formats raise `TierecError`.
"""

from __future__ import annotations

import bz2
import gzip
import io
import logging
import lzma
import os
import re
import sys
import zlib
from collections.abc import Callable, Generator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

from tierec.data.dataset import Chunk, Schema, SparseFeature, default_label_names
from tierec.data.hashing import encode_ints, encode_strings, hash_strings, log1p_dense, missing_strings
from tierec.errors import ConfigError, DataError, TierecError

log = logging.getLogger(__name__)

# Distinct values of C1..C26 in the Criteo Kaggle (Display Advertising Challenge) train set.
CRITEO_KAGGLE_CARDINALITIES = [
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194,
    27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
]
CRITEO_DENSE = [f"I{i}" for i in range(1, 14)]
CRITEO_SPARSE = [f"C{i}" for i in range(1, 27)]
CRITEO_COLUMNS = ["label", *CRITEO_DENSE, *CRITEO_SPARSE]

FORMATS = ("criteo-tsv", "criteo-csv", "libsvm", "libfm", "movielens")
DEFAULT_NUM_EMBEDDINGS = 1_000_000  # default table size (and cap on the Criteo cardinalities)
DEFAULT_BLOCK_SIZE = 2 << 20  # bytes of input parsed at a time (two blocks in flight for CSV/TSV)
SESSION_MODULUS = (1 << 63) - 1  # session IDs are hash_strings(user, 2**63 - 1)
MAX_EXAMPLES = 5  # bad-row messages kept for the manifest
MAX_LINE_BYTES = 1 << 28  # a longer "line" is not text
_WHITESPACE = b" \t\r\n\v\f"  # a line of only these is blank

_FLOAT_RE = r"^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?$"
_UINT_RE = r"^[0-9]{1,18}$"


# --------------------------------------------------------------------------- public types
@dataclass
class Block:
    """Rows parsed from one block of input."""

    chunk: Chunk
    lines: np.ndarray  # int64 [n]: 1-based line number of each row in the input (header counted)


@dataclass
class ReadStats:
    rows_read: int = 0  # good rows yielded
    bad_rows: int = 0  # malformed rows skipped (only with skip_bad_rows)
    bad_row_examples: list[str] = field(default_factory=list)  # the first few, "line N: reason"
    bytes_read: int = 0


# --------------------------------------------------------------------------- helpers
def ids_to_jagged(ids: np.ndarray, present: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One ID per row -> (values, offsets) with length 0 for missing rows. ``present``: bool [n], the rows
    that hold an ID; default ``ids >= 0`` (-1 meaning missing), which raw IDs (any int64) cannot use."""
    if present is None:
        present = ids >= 0
    offsets = np.zeros(len(ids) + 1, np.int64)
    np.cumsum(present, out=offsets[1:])
    return ids[present].astype(np.int64, copy=False), offsets


def take_rows(chunk: Chunk, mask: np.ndarray) -> Chunk:
    """The rows of ``chunk`` where the boolean ``mask`` is true, in order."""
    sp = {}
    for k, (v, o) in chunk.sparse.items():
        lens = np.diff(o)
        keep = lens[mask]
        offs = np.zeros(len(keep) + 1, np.int64)
        np.cumsum(keep, out=offs[1:])
        sp[k] = (v[np.repeat(mask, lens)], offs)
    s = chunk.session[mask] if chunk.session is not None else None
    return Chunk(chunk.label[mask], chunk.dense[mask], sp, s)


def _np(arr: pa.Array | pa.ChunkedArray) -> np.ndarray:
    return arr.to_numpy(zero_copy_only=False)


def _parse_floats(col: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """String array -> (float64 values, NaN where null or bad; bool mask of bad values).

    A value is bad unless it is a finite decimal number (``1``, ``-2.5``, ``3e4``);
    nulls (empty fields) are missing, not bad.
    """
    try:
        x = _np(pc.cast(col, pa.float64()))
        bad = np.zeros(len(col), bool)
    except pa.ArrowInvalid:
        ok = pc.fill_null(pc.match_substring_regex(col, _FLOAT_RE), True)
        bad = ~_np(ok).astype(bool)
        x = _np(pc.cast(pc.if_else(ok, col, pa.scalar(None, col.type)), pa.float64()))
    if len(x):
        nonfinite = ~np.isfinite(x) & ~_np(col.is_null()).astype(bool)
        if nonfinite.any():
            bad |= nonfinite
            x = np.where(nonfinite, np.nan, x)
    return x.astype(np.float64, copy=False), bad


def _parse_uints(col: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """String array (no nulls) -> (int64 values, 0 where bad; bool mask of values that are not 0..10**18-1)."""
    try:
        x = _np(pc.cast(col, pa.int64()))
        bad = x < 0
    except pa.ArrowInvalid:
        ok = pc.match_substring_regex(col, _UINT_RE)  # at most 18 digits: always fits in int64
        bad = ~_np(ok).astype(bool)
        x = _np(pc.cast(pc.if_else(ok, col, pa.scalar("0", col.type)), pa.int64()))
    x = np.where(bad, 0, x).astype(np.int64, copy=False)
    return x, bad


def _quote(s) -> str:
    s = "" if s is None else str(s)
    return repr(s if len(s) <= 40 else s[:40] + "...")


class _BadRows:
    """Per-row validation results of one block: boolean masks plus how to describe each."""

    def __init__(self, n: int):
        self.n = n
        self.checks: list[tuple[np.ndarray, Callable[[int], str]]] = []

    def add(self, mask: np.ndarray, describe: Callable[[int], str]) -> None:
        if mask.any():
            self.checks.append((mask, describe))

    @property
    def mask(self) -> np.ndarray:
        m = np.zeros(self.n, bool)
        for c, _ in self.checks:
            m |= c
        return m

    def describe(self, i: int) -> str:
        for c, d in self.checks:
            if c[i]:
                return d(i)
        raise AssertionError("row is not bad")

    def __bool__(self) -> bool:
        return bool(self.checks)


class _CountingReader(io.RawIOBase):
    """Counts the bytes read from the underlying (compressed) file, for the progress bar."""

    def __init__(self, f):
        self.f, self.count = f, 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        k = self.f.readinto(b)
        self.count += k or 0
        return k

    def close(self) -> None:
        self.f.close()
        super().close()


class _ZstdReader(io.RawIOBase):
    """A zstd stream of one or more frames. Ending inside a frame raises EOFError, and zstandard's
    errors become OSError (its ``stream_reader`` reads a truncated frame as a clean end and stops
    after the first frame)."""

    def __init__(self, raw: io.RawIOBase):
        import zstandard

        self.raw, self.dctx, self.error = raw, zstandard.ZstdDecompressor(), zstandard.ZstdError
        self.obj: zstandard.ZstdDecompressionObj | None = None  # the frame being decompressed
        self.out = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while not self.out:
            data = self.raw.read(1 << 20)
            if not data:
                if self.obj is not None and not self.obj.eof:
                    raise EOFError("compressed file ended before the end of a zstd frame")
                return 0
            parts = []
            try:
                while data:
                    if self.obj is None or self.obj.eof:
                        self.obj = self.dctx.decompressobj()
                    parts.append(self.obj.decompress(data))
                    data = self.obj.unused_data if self.obj.eof else b""
            except self.error as e:
                raise OSError(str(e)) from None
            self.out = memoryview(b"".join(parts))
        n = min(len(b), len(self.out))
        b[:n] = self.out[:n]
        self.out = self.out[n:]
        return n


_COMPRESSION = {".gz": "gzip", ".bz2": "bzip2", ".xz": "xz", ".lzma": "xz", ".zst": "zstd", ".zstd": "zstd"}
# What a damaged input raises while it is read (gzip.BadGzipFile, bz2's "Invalid data stream" and
# zstd errors are OSErrors; truncated streams raise EOFError).
_READ_ERRORS = (OSError, EOFError, zlib.error, lzma.LZMAError)


def _open_input(path: Path) -> tuple[io.BufferedIOBase, _CountingReader]:
    """Open ``path`` for binary reading, decompressing .gz/.bz2/.xz/.zst; returns (file, byte counter).
    Close both (a gzip/bz2/xz file does not close the file under it)."""
    raw = _CountingReader(open(path, "rb"))
    kind = _COMPRESSION.get(path.suffix.lower())
    if kind == "gzip":
        return gzip.GzipFile(fileobj=io.BufferedReader(raw), mode="rb"), raw
    if kind == "bzip2":
        return bz2.BZ2File(io.BufferedReader(raw)), raw
    if kind == "xz":
        return lzma.LZMAFile(io.BufferedReader(raw)), raw
    if kind == "zstd":
        return io.BufferedReader(_ZstdReader(raw), 1 << 20), raw
    return io.BufferedReader(raw, 1 << 20), raw


def _check_input(path) -> Path:
    p = Path(path)
    if not p.exists():
        raise TierecError(f"{p}: no such file")
    if p.is_dir():
        raise TierecError(f"{p}: is a directory, expected a file")
    if p.stat().st_size == 0:
        raise TierecError(f"{p}: empty input (no data rows)")
    return p


def parse_table_sizes(spec) -> list[Any] | tuple[Any, ...] | dict[Any, Any] | None:
    """``--table-sizes``: a list, a ``{name: size}`` dict, a comma list (``"1000,20,..."`` or
    ``"C1=1000,C2=20"``), or a YAML/JSON file holding a list or a mapping. The sizes are not checked
    here (`resolve_table_sizes` does)."""
    if spec is None or isinstance(spec, (list, tuple, dict)):
        return spec
    s = str(spec).strip()
    if os.path.exists(s):
        import yaml

        try:
            data = yaml.safe_load(Path(s).read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{s}: not valid YAML/JSON ({str(e).splitlines()[0]})") from None
        if not isinstance(data, (list, dict)):
            raise ConfigError(f"{s}: table sizes must be a list of sizes or a mapping feature -> size")
        return data
    parts = [t.strip() for t in s.split(",") if t.strip()]
    if not parts:
        raise ConfigError(f"--table-sizes {spec!r}: empty")
    try:
        if all("=" in t for t in parts):
            return {k.strip(): int(v) for k, v in (t.split("=", 1) for t in parts)}
        return [int(t) for t in parts]
    except ValueError:
        raise ConfigError(f"--table-sizes {spec!r}: neither a file nor a comma-separated list of integers "
                          "(or NAME=SIZE pairs)") from None


def resolve_table_sizes(names: list[str], table_sizes=None, num_embeddings: int | None = None,
                        defaults: list[int] | None = None) -> list[int]:
    """Size of each sparse feature's table.

    Precedence: ``table_sizes`` (list in feature order, or dict by name, or a spec for
    `parse_table_sizes`) > ``defaults`` capped by ``num_embeddings`` > ``num_embeddings``
    (default `DEFAULT_NUM_EMBEDDINGS`).
    """
    if num_embeddings is not None and int(num_embeddings) <= 0:
        raise ConfigError(f"--num-embeddings must be > 0, got {num_embeddings}")
    cap = int(num_embeddings) if num_embeddings is not None else DEFAULT_NUM_EMBEDDINGS
    if defaults is not None:
        sizes = [min(int(d), cap) for d in defaults]
    else:
        sizes = [cap] * len(names)
    given = parse_table_sizes(table_sizes)
    if isinstance(given, (list, tuple)):
        if len(given) != len(names):
            raise ConfigError(f"--table-sizes has {len(given)} sizes but there are {len(names)} sparse features "
                              f"({', '.join(names[:5])}{', ...' if len(names) > 5 else ''})")
        sizes = list(given)
    elif isinstance(given, dict):
        unknown = [k for k in given if k not in names]
        if unknown:
            raise ConfigError(f"--table-sizes names unknown sparse feature(s) {', '.join(map(str, unknown))} "
                              f"(known: {', '.join(names)})")
        sizes = [given.get(n, s) for n, s in zip(names, sizes, strict=True)]
    out = []
    for n, s in zip(names, sizes, strict=True):
        try:
            s = int(s)
        except (TypeError, ValueError):
            raise ConfigError(f"table size of {n!r} is not an integer: {s!r}") from None
        if s <= 0:
            raise ConfigError(f"table size of {n!r} must be > 0, got {s}")
        out.append(s)
    return out


ID_ENCODINGS = ("hash", "identity")  # --id-encoding: the format's hash, or IDs that are rows already
AUTO_SIZE = (1 << 62)  # identity tables without a given size: sized max ID + 1 when the input is read


def resolve_encodings(names: list[str], spec, hashed: str) -> list[str]:
    """``--id-encoding``: ``hash`` (the format's: ``hashed``), ``identity``, or ``NAME=ENC,...`` pairs
    (others hash), or a ``{name: enc}`` dict -> one `tierec.data.dataset.ENCODINGS` entry per feature."""
    if spec is None:
        return [hashed] * len(names)
    if isinstance(spec, str) and "=" not in spec:
        spec = spec.strip()
        if spec not in ID_ENCODINGS:
            raise ConfigError(f"--id-encoding must be {' or '.join(ID_ENCODINGS)} (or NAME=ENC,...), got {spec!r}")
        return [hashed if spec == "hash" else "identity"] * len(names)
    pairs = spec if isinstance(spec, dict) else dict(t.split("=", 1) for t in str(spec).split(",") if t.strip())
    pairs = {str(k).strip(): str(v).strip() for k, v in pairs.items()}
    for k, v in pairs.items():
        if k not in names:
            raise ConfigError(f"--id-encoding names unknown sparse feature {k!r} (known: {', '.join(names)})")
        if v not in ID_ENCODINGS:
            raise ConfigError(f"--id-encoding {k}={v}: must be {' or '.join(ID_ENCODINGS)}")
    return [hashed if pairs.get(n, "hash") == "hash" else "identity" for n in names]


def sized_explicitly(names: list[str], table_sizes, num_embeddings) -> list[bool]:
    """Which features got a table size from ``--table-sizes`` or ``--num-embeddings`` (not a default)."""
    if num_embeddings is not None:
        return [True] * len(names)
    given = parse_table_sizes(table_sizes)
    if isinstance(given, dict):
        return [n in given for n in names]
    return [given is not None] * len(names)


# --------------------------------------------------------------------------- base reader
class Reader:
    """Base class: streams ``path`` as `Block`s; subclasses implement `_blocks`."""

    format = ""

    def __init__(self, path, *, skip_bad_rows: bool = False, block_size: int = DEFAULT_BLOCK_SIZE,
                 max_rows: int | None = None, progress: bool = True, raw_ids: bool = False):
        self.path = _check_input(path)
        self.raw = bool(raw_ids)  # raw IDs: unreduced 64-bit hashes (identity: the integers), not rows
        self.skip_bad_rows = bool(skip_bad_rows)
        if int(block_size) <= 0:
            raise ConfigError(f"block size must be > 0, got {block_size}")
        self.block_size = int(block_size)
        if max_rows is not None and int(max_rows) <= 0:
            raise ConfigError(f"--max-rows must be > 0, got {max_rows}")
        self.max_rows = int(max_rows) if max_rows is not None else None
        self.progress = progress
        self.stats = ReadStats()
        self.schema: Schema  # set by subclasses
        self._counter: _CountingReader | None = None
        self.sizes: list[int] = []
        self.encodings: list[str] = []
        self.max_id: list[int] = []

    # -- sparse IDs
    def _setup_ids(self, names: list[str], sizes: list[int], hashed: str, id_encoding, explicit: list[bool]) -> None:
        """Per feature: its encoding (`resolve_encodings`) and table size; an ``identity`` feature
        without a given size is sized by its largest ID when the input has been read (`table_sizes`)."""
        self.encodings = resolve_encodings(names, id_encoding, hashed)
        self.auto_size = [e == "identity" and not x for e, x in zip(self.encodings, explicit, strict=True)]
        self.sizes = [AUTO_SIZE if a else n for a, n in zip(self.auto_size, sizes, strict=True)]
        self.max_id = [-1] * len(names)

    def _features(self, names: list[str], sides: list[str] | None = None) -> list[SparseFeature]:
        sides = sides or ["item"] * len(names)
        return [SparseFeature(n, s if s != AUTO_SIZE else 1, side=side, encoding=e, raw=self.raw)
                for n, s, side, e in zip(names, self.sizes, sides, self.encodings, strict=True)]

    def _seen(self, j: int, rows: np.ndarray) -> np.ndarray:
        """Record the largest row of feature ``j`` (for automatic identity table sizes); returns ``rows``."""
        if self.auto_size[j] and rows.size:
            self.max_id[j] = max(self.max_id[j], int(rows.max()))
        return rows

    def _bad_id(self, name: str, j: int, value) -> str:
        if self.auto_size[j] or self.raw:
            return f"{name} is not a non-negative integer: {_quote(value)} (--id-encoding identity)"
        return (f"{name} is not a row of its table [0, {self.sizes[j]}): {_quote(value)} (--id-encoding identity; "
                "raise --table-sizes, or omit it to size the table by the largest ID)")

    def table_sizes(self) -> list[int]:
        """Each feature's table size after reading: automatic identity sizes are its largest ID + 1."""
        return [max(m + 1, 1) if a else n for a, m, n in zip(self.auto_size, self.max_id, self.sizes, strict=True)]

    # -- iteration
    def __iter__(self) -> Iterator[Block]:
        from tqdm import tqdm

        self.stats = ReadStats()
        total = self.path.stat().st_size
        disable = not self.progress or not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty())
        bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=self.path.name,
                   file=sys.stderr, disable=disable, leave=False)
        shown = 0
        blocks = self._blocks()
        try:
            for block in blocks:
                n = len(block.chunk)
                if self.max_rows is not None and self.stats.rows_read + n >= self.max_rows:
                    keep = self.max_rows - self.stats.rows_read
                    block = Block(block.chunk.slice(0, keep), block.lines[:keep])
                    n = keep
                self.stats.rows_read += n
                if self._counter is not None:
                    self.stats.bytes_read = self._counter.count
                    bar.update(self._counter.count - shown)
                    shown = self._counter.count
                if n:
                    yield block
                if self.max_rows is not None and self.stats.rows_read >= self.max_rows:
                    break
        finally:
            blocks.close()  # closes the input file
            bar.close()
        if self.stats.rows_read == 0:
            extra = f" ({self.stats.bad_rows} bad rows skipped)" if self.stats.bad_rows else ""
            raise TierecError(f"{self.path}: empty input (no data rows){extra}")

    def chunks(self) -> Iterator[Chunk]:
        for b in self:
            yield b.chunk

    def _blocks(self) -> Generator[Block, None, None]:
        raise NotImplementedError

    # -- input text
    def _texts(self) -> Generator[tuple[bytes, int], None, None]:
        """(bytes of whole lines, each ending in a newline; line number of the first), ~block_size each.
        An input that cannot be read or decompressed, at any point, raises `DataError` naming it."""
        try:
            f, self._counter = _open_input(self.path)
        except OSError as e:
            raise DataError(f"cannot open ({e.strerror or e})", str(self.path)) from None
        try:
            rest, line_no = b"", 1
            while data := self._read(f):
                buf = rest + data if rest else data
                cut = buf.rfind(b"\n")
                if cut < 0:
                    if len(buf) > MAX_LINE_BYTES:
                        raise DataError(f"no line end in {len(buf):,} bytes (binary data, or not {self.format}?)",
                                        str(self.path), line_no)
                    rest = buf
                    continue
                text, rest = buf[: cut + 1], buf[cut + 1 :]
                yield text, line_no
                line_no += text.count(b"\n")
            if rest:
                yield rest + b"\n", line_no
        finally:
            f.close()
            self._counter.close()

    def _read(self, f) -> bytes:
        try:
            return f.read(self.block_size)
        except _READ_ERRORS as e:
            kind = _COMPRESSION.get(self.path.suffix.lower())
            what = f"corrupt or truncated {kind} data" if kind else "read error"
            reason = (str(e).splitlines() or [type(e).__name__])[0]
            raise DataError(f"{what} ({reason})", str(self.path)) from None

    def _first_line(self) -> tuple[int, str]:
        """(line number, text) of the first line that is not blank (empty or whitespace only); (0, "") if none."""
        it = self._texts()
        try:
            for text, first in it:
                body = text.lstrip(_WHITESPACE)
                if body:
                    start = text.rfind(b"\n", 0, len(text) - len(body)) + 1
                    line = text[start : text.index(b"\n", start)]
                    return first + text.count(b"\n", 0, start), line.decode("utf-8", "replace").rstrip("\r")
        finally:
            it.close()
        return 0, ""

    # -- bad rows
    def _report_bad(self, lines: np.ndarray, bad: _BadRows | None, invalid: Sequence[tuple[int, str]] = ()) -> None:
        """Raise on the earliest bad row (by line), or count them all when skipping bad rows."""
        bad = bad if bad is not None else _BadRows(0)  # None: no bad rows
        idx = np.flatnonzero(bad.mask) if bad else np.zeros(0, np.int64)
        if not self.skip_bad_rows:
            cands = [(int(line), msg) for line, msg in invalid]
            if len(idx):
                cands.append((int(lines[idx[0]]), bad.describe(int(idx[0]))))
            if cands:
                line, msg = min(cands)
                if self.max_rows is not None:  # rows before it are good: is it past --max-rows?
                    if self.stats.rows_read + int(np.sum(lines < line)) >= self.max_rows:
                        return
                raise DataError(msg + " (use --skip-bad-rows to skip malformed rows)", str(self.path), line)
            return
        self.stats.bad_rows += len(idx) + len(invalid)
        room = MAX_EXAMPLES - len(self.stats.bad_row_examples)
        if room > 0:
            ex = [(int(line), msg) for line, msg in invalid]
            ex += [(int(lines[i]), bad.describe(int(i))) for i in idx[:room]]
            for line, msg in sorted(ex)[:room]:
                self.stats.bad_row_examples.append(f"{self.path}:{line}: {msg}")
                log.debug("skipping bad row %s:%d: %s", self.path, line, msg)


# --------------------------------------------------------------------------- delimited text (pyarrow.csv)
_WS_BYTE = np.zeros(256, bool)
_WS_BYTE[list(b" \t\r\v\f")] = True  # whitespace but the newline


def _clean_lines(text: bytes, first: int, header: int = 0) -> tuple[bytes, np.ndarray, np.ndarray]:
    """``text`` (whole lines from line ``first``) with its whitespace-only lines, line ``header`` and
    the lines holding a lone carriage return emptied: their bytes are removed and their newlines kept,
    so line numbers do not move (pyarrow would end a row at a lone ``\\r``). Returns the new text, the
    number of every line, and the numbers of the lone-``\\r`` lines (bad rows)."""
    b = np.frombuffer(text, np.uint8)
    ends = np.flatnonzero(b == 10)
    starts = np.concatenate([[0], ends[:-1] + 1])
    blank = np.flatnonzero(_WS_BYTE[b[starts]])  # lines that start with whitespace ...
    if blank.size:  # ... and hold nothing else
        solid = np.flatnonzero(~_WS_BYTE[b])  # newlines included: every line has one
        blank = blank[b[solid[np.searchsorted(solid, starts[blank])]] == 10]
    cr = np.zeros(0, np.int64)
    if b"\r" in text:
        pos = np.flatnonzero(b == 13)
        cr = np.setdiff1d(np.searchsorted(ends, pos[b[pos + 1] != 10]), blank)
    drop = np.union1d(blank, cr)
    if 0 <= header - first < len(starts):
        drop = np.union1d(drop, [header - first])
    lines = np.arange(first, first + len(ends), dtype=np.int64)
    if not drop.size:
        return text, lines, cr
    cut = np.zeros(len(b) + 1, np.int8)
    cut[starts[drop]] = 1
    cut[ends[drop]] = -1
    return b[np.cumsum(cut[:-1], dtype=np.int8) == 0].tobytes(), lines, first + cr


class _DelimitedReader(Reader):
    """Streams a delimited text file with pyarrow.csv, every column read as a string."""

    delimiter = "\t"
    quoting = False

    def _columns(self) -> tuple[list[str], int]:
        """(column names, line number of the header line; 0 when there is none)."""
        raise NotImplementedError

    def _parse(self, batch: pa.RecordBatch) -> Chunk | _BadRows:
        raise NotImplementedError

    def _blocks(self) -> Generator[Block, None, None]:
        tables = self._tables()
        try:
            with ThreadPoolExecutor(1) as pool:  # split the next block into fields while this one is parsed
                fut = pool.submit(next, tables, None)
                while (item := fut.result()) is not None:
                    fut = pool.submit(next, tables, None)
                    yield from self._parse_checked(*item)
        finally:
            tables.close()

    def _tables(self) -> Generator[tuple[pa.RecordBatch, np.ndarray, list[tuple[int, str]]], None, None]:
        """(fields of a block as strings, line number of each row, bad rows (line, reason)) per block of
        whole lines (`Reader._texts`), split from memory with ``pyarrow.csv.read_csv``.

        pyarrow never reads the (Python, decompressing) input itself: its streaming reader reads ahead
        on a thread that calls back into Python, and when parsing failed that thread was left reading
        at exit (SIGABRT, "terminate called without an active exception", or a hang)."""
        names, header = self._columns()
        invalid: list[tuple[int, str]] = []  # (line within the block, reason): rows with a wrong field count

        def on_invalid(row) -> str:
            invalid.append((row.number if row.number is not None else -1,
                            f"expected {row.expected_columns} fields, got {row.actual_columns}"))
            return "skip"

        parse = pcsv.ParseOptions(delimiter=self.delimiter, quote_char='"' if self.quoting else False,
                                  ignore_empty_lines=False, invalid_row_handler=on_invalid)
        convert = pcsv.ConvertOptions(column_types={n: pa.string() for n in names}, strings_can_be_null=True,
                                      null_values=[""], quoted_strings_can_be_null=True, check_utf8=False)
        for text, first in self._texts():
            text, lines, cr_lines = _clean_lines(text, first, header)
            if not text.isascii():  # valid UTF-8 (bad bytes -> U+FFFD): pyarrow decodes invalid rows strictly
                text = text.decode("utf-8", "replace").encode("utf-8")
            where = f"lines {first}-{lines[-1]}"
            invalid.clear()
            try:
                table = pcsv.read_csv(pa.py_buffer(text), parse_options=parse, convert_options=convert,
                                      read_options=pcsv.ReadOptions(use_threads=False, block_size=len(text) + 1,
                                                                    column_names=names))
            except pa.ArrowInvalid as e:
                raise DataError(f"{where}: cannot parse ({str(e).splitlines()[0]})", str(self.path), first) from None
            bad = [(first - 1 + k, msg) for k, msg in invalid]
            if bad:
                lines = lines[~np.isin(lines, [k for k, _ in bad])]
            if len(lines) != table.num_rows:  # should not happen: every line is a row or invalid
                raise DataError(f"{where}: {table.num_rows} rows in {len(lines)} lines", str(self.path), first)
            bad += [(int(k), "carriage return (\\r) inside the line (binary data?)") for k in cr_lines]
            batch = pa.RecordBatch.from_arrays([c.combine_chunks() for c in table.columns], names=names)
            yield *self._drop_blank(batch, lines), bad

    @staticmethod
    def _drop_blank(batch: pa.RecordBatch, lines: np.ndarray):
        """Drop blank lines (every field empty)."""
        if batch.num_rows == 0:
            return batch, lines
        blank = _np(batch.column(0).is_null()).astype(bool)
        if not blank.any():
            return batch, lines
        for c in batch.columns[1:]:
            blank &= _np(c.is_null()).astype(bool)
        if not blank.any():
            return batch, lines
        keep = ~blank
        return batch.filter(pa.array(keep)), lines[keep]

    def _parse_checked(self, batch, lines, invalid) -> Iterator[Block]:
        while True:
            if batch.num_rows == 0:
                self._report_bad(lines, None, invalid)
                return
            out = self._parse(batch)
            if isinstance(out, Chunk):
                self._report_bad(lines, None, invalid)
                yield Block(out, lines)
                return
            self._report_bad(lines, out, invalid)  # raises unless skipping bad rows
            invalid = []
            keep = ~out.mask
            batch, lines = batch.filter(pa.array(keep)), lines[keep]


class CriteoReader(_DelimitedReader):
    """Criteo Kaggle / Terabyte: ``label, I1..I13, C1..C26``.

    ``criteo-tsv``: tab-separated, no header (the published ``train.txt`` / ``day_N``);
    ``criteo-csv``: comma-separated, with a header line or without (detected by content, `_columns`).
    ``num_labels`` K > 1: each row starts with K labels (0 or 1) instead of one, named ``label_names``
    (default `default_label_names`); the rows' `Chunk.label` is then ``[n, K]``.
    """

    def __init__(self, path, *, csv: bool = False, num_embeddings: int | None = None, table_sizes=None,
                 id_encoding=None, num_labels: int = 1, label_names: list[str] | None = None, **kw):
        super().__init__(path, **kw)
        self.csv = csv
        self.format = "criteo-csv" if csv else "criteo-tsv"
        self.delimiter, self.quoting = (",", True) if csv else ("\t", False)
        sizes = resolve_table_sizes(CRITEO_SPARSE, table_sizes, num_embeddings, CRITEO_KAGGLE_CARDINALITIES)
        self._setup_ids(CRITEO_SPARSE, sizes, "hash-string", id_encoding,
                        sized_explicitly(CRITEO_SPARSE, table_sizes, num_embeddings))
        self.num_labels = int(num_labels)
        labels = list(label_names) if label_names is not None else default_label_names(self.num_labels)
        self.schema = Schema(list(CRITEO_DENSE), self._features(CRITEO_SPARSE), dense_transform="log1p",
                             labels=labels)
        self.column_names = [*labels, *CRITEO_DENSE, *CRITEO_SPARSE]

    def _columns(self):
        """criteo-csv: the first non-blank line is a header unless it reads as data (labels 0 or 1, numbers
        or nothing in I1..I13): then there is no header and that line is the first row."""
        cols, k = self.column_names, self.num_labels
        if not self.csv:
            return list(cols), 0
        line_no, first = self._first_line()
        names = [h.strip().strip('"') for h in first.split(",")]
        if len(names) == len(cols) and all(x in ("0", "1") for x in names[:k]) and all(
                not x or re.match(_FLOAT_RE, x) for x in names[k : k + 13]):
            log.warning("%s: no header found (line %d holds data); reading it as the first row", self.path, line_no)
            return list(cols), 0
        if line_no and len(names) != len(cols):
            what = "label" if k == 1 else f"{k} labels"
            raise DataError(f"header has {len(names)} columns, expected {len(cols)} "
                            f"({what}, I1..I13, C1..C26)", str(self.path), line_no)
        if line_no and [n.lower() for n in names] != [n.lower() for n in cols]:
            log.warning("%s: header %s... differs from %s,I1..I13,C1..C26; columns are taken by position",
                        self.path, _quote(",".join(names[:4])), ",".join(cols[:k]))
        return list(cols), line_no

    def _parse(self, batch):
        n = batch.num_rows
        bad = _BadRows(n)
        k = self.num_labels
        labels = np.empty((n, k), np.float32)
        for j, name in enumerate(self.schema.labels):
            label_col = batch.column(j)
            is0 = _np(pc.fill_null(pc.equal(label_col, "0"), False)).astype(bool)
            is1 = _np(pc.fill_null(pc.equal(label_col, "1"), False)).astype(bool)
            what = "label" if k == 1 else f"label {name!r} (field {j + 1})"
            bad.add(~(is0 | is1),
                    lambda i, c=label_col, w=what: f"{w} must be 0 or 1, got {_quote(c[i].as_py())}")
            labels[:, j] = is1
        dense = np.empty((n, len(CRITEO_DENSE)), np.float32)
        for j, name in enumerate(CRITEO_DENSE):
            col = batch.column(k + j)
            x, b = _parse_floats(col)
            bad.add(b, lambda i, col=col, name=name: f"{name} is not a number: {_quote(col[i].as_py())}")
            dense[:, j] = log1p_dense(x)
        rows, present = {}, {}
        for j, name in enumerate(CRITEO_SPARSE):
            col = batch.column(k + 13 + j)
            rows[name], b = encode_strings(col, self.encodings[j], self.sizes[j], self.raw)
            present[name] = ~missing_strings(col) if self.raw else None  # a raw ID may be -1
            bad.add(b, lambda i, col=col, j=j, name=name: self._bad_id(name, j, col[i].as_py()))
        if bad:
            return bad
        sparse = {name: ids_to_jagged(self._seen(j, rows[name]), present[name]) for j, name in enumerate(CRITEO_SPARSE)}
        return Chunk(labels[:, 0] if k == 1 else labels, dense, sparse, None)


class MovieLensReader(_DelimitedReader):
    """MovieLens ratings as implicit feedback.

    Tab-separated; either ``u.data`` (``user item rating timestamp``, no header) or a
    RecBole atomic ``.inter`` file (header ``user_id:token item_id:token rating:float
    timestamp:float``; columns found by name, others ignored). label = rating >= threshold.
    """

    format = "movielens"

    def __init__(self, path, *, rating_threshold: float = 4.0, num_embeddings: int | None = None,
                 table_sizes=None, id_encoding=None, **kw):
        super().__init__(path, **kw)
        self.threshold = float(rating_threshold)
        self._names, self._header_lines = self._detect()
        self.has_time = "timestamp" in self._names
        names = ["user_id", "item_id"]
        sizes = resolve_table_sizes(names, table_sizes, num_embeddings)
        self._setup_ids(names, sizes, "hash-string", id_encoding, sized_explicitly(names, table_sizes, num_embeddings))
        self.schema = Schema(["hour"] if self.has_time else [], self._features(names, ["user", "item"]),
                             session_key="user_id", dense_transform="log1p")

    def _detect(self) -> tuple[list[str], int]:
        """(column names, line number of the header; 0 for none) from the first non-blank line:
        a header if a field is not a number."""
        line_no, first = self._first_line()
        if not line_no:
            raise TierecError(f"{self.path}: empty input (no data rows)")
        fields = first.split("\t")
        try:
            [float(x) for x in fields]
            is_header = False
        except ValueError:
            is_header = True
        if not is_header:
            if len(fields) == 4:
                return ["user_id", "item_id", "rating", "timestamp"], 0
            if len(fields) == 3:
                return ["user_id", "item_id", "rating"], 0
            raise DataError(f"expected 3 or 4 tab-separated fields (user item rating [timestamp]), "
                            f"got {len(fields)}", str(self.path), line_no)
        names = [h.strip().split(":")[0] for h in fields]
        missing = [c for c in ("user_id", "item_id", "rating") if c not in names]
        if missing:
            raise DataError(f"header lacks {', '.join(missing)} (need user_id, item_id, rating; "
                            f"got {_quote(', '.join(names))})", str(self.path), line_no)
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise DataError(f"header repeats column(s) {_quote(', '.join(sorted(dup)))}", str(self.path), line_no)
        return names, line_no

    def _columns(self):
        return list(self._names), self._header_lines

    def _parse(self, batch):
        n = batch.num_rows
        bad = _BadRows(n)
        user = batch.column(self._names.index("user_id"))
        item = batch.column(self._names.index("item_id"))
        rating_col = batch.column(self._names.index("rating"))
        bad.add(_np(user.is_null()).astype(bool), lambda i: "user_id is empty")
        bad.add(_np(item.is_null()).astype(bool), lambda i: "item_id is empty")
        rows, present = {}, {}
        for j, (name, col) in enumerate((("user_id", user), ("item_id", item))):
            rows[name], b = encode_strings(col, self.encodings[j], self.sizes[j], self.raw)
            present[name] = ~missing_strings(col) if self.raw else None  # a raw ID may be -1
            bad.add(b, lambda i, col=col, j=j, name=name: self._bad_id(name, j, col[i].as_py()))
        rating, rb = _parse_floats(rating_col)
        rb |= np.isnan(rating)
        bad.add(rb, lambda i: f"rating is not a number: {_quote(rating_col[i].as_py())}")
        if self.has_time:
            ts_col = batch.column(self._names.index("timestamp"))
            ts, tb = _parse_floats(ts_col)
            tb |= np.isnan(ts)
            bad.add(tb, lambda i: f"timestamp is not a number: {_quote(ts_col[i].as_py())}")
        if bad:
            return bad
        if self.has_time:
            hour = np.floor(ts / 3600.0) % 24
            dense = log1p_dense(hour)[:, None]
        else:
            dense = np.zeros((n, 0), np.float32)
        label = (rating >= self.threshold).astype(np.float32)
        sparse = {name: ids_to_jagged(self._seen(j, rows[name]), present[name])
                  for j, name in enumerate(("user_id", "item_id"))}
        session = hash_strings(user, SESSION_MODULUS)
        return Chunk(label, dense, sparse, session)


# --------------------------------------------------------------------------- libSVM / libFM
@dataclass
class FieldMap:
    """Where each libSVM index / libFM field goes. ``keys`` are inclusive ``(lo, hi)`` ranges."""

    sparse: list[tuple[str, list[tuple[int, int]], int | None, str]]  # (name, ranges, num_embeddings, side)
    dense: list[tuple[str, list[tuple[int, int]]]]  # (name, ranges)
    unmapped: str = "error"  # or "drop"

    def lookup(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Sorted (lo, hi, target) arrays; target j < n_sparse is sparse feature j, else dense j - n_sparse."""
        rows = []
        for j, (_, ranges, _, _) in enumerate(self.sparse):
            rows += [(lo, hi, j) for lo, hi in ranges]
        for j, (_, ranges) in enumerate(self.dense):
            rows += [(lo, hi, len(self.sparse) + j) for lo, hi in ranges]
        rows.sort()
        lo = np.array([r[0] for r in rows], np.int64)
        hi = np.array([r[1] for r in rows], np.int64)
        tgt = np.array([r[2] for r in rows], np.int64)
        return lo, hi, tgt


def _parse_keys(spec, where: str) -> list[tuple[int, int]]:
    """``5`` | ``"3-9"`` | ``[1, 2, "10-20"]`` -> inclusive ranges."""
    items = spec if isinstance(spec, list) else [spec]
    out = []
    for it in items:
        try:
            if isinstance(it, bool):
                raise ValueError
            if isinstance(it, int):
                lo = hi = it
            elif isinstance(it, str) and "-" in it.strip()[1:]:
                a, b = it.strip().split("-", 1)
                lo, hi = int(a), int(b)
            else:
                lo = hi = int(str(it))
        except ValueError:
            raise ConfigError(f"{where}: {it!r} is not an index, a range 'LO-HI' or a list of them") from None
        if lo < 0 or hi < lo:
            raise ConfigError(f"{where}: bad range {it!r} (need 0 <= LO <= HI)")
        out.append((lo, hi))
    if not out:
        raise ConfigError(f"{where}: no indices given")
    return out


def load_field_map(spec, fmt: str = "libsvm") -> FieldMap:
    """Load a field map from a YAML/JSON file path or an already-parsed dict (see docs/data.md)::

        sparse:
          user: 0                  # libFM field 0 (libSVM: feature index 0) -> sparse feature "user"
          item: {keys: [1, "5-9"], num_embeddings: 100000, side: item}
        dense:
          price: 12                # the value of index / field 12 -> dense feature "price"
        unmapped: error            # or drop: what to do with an index / field not listed
    """
    import yaml

    where = "field map"
    if isinstance(spec, (str, os.PathLike)):
        p = Path(spec)
        where = str(p)
        if not p.exists():
            raise ConfigError(f"{p}: field map file does not exist")
        try:
            spec = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML/JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: must be a mapping with 'sparse' and/or 'dense'")
    unknown = set(spec) - {"sparse", "dense", "unmapped"}
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(map(str, unknown)))} "
                          "(expected sparse, dense, unmapped)")
    sparse, dense = [], []
    for name, v in (spec.get("sparse") or {}).items():
        ne, side = None, "item"
        if isinstance(v, dict):
            extra = set(v) - {"keys", "fields", "indices", "num_embeddings", "side"}
            if extra:
                raise ConfigError(f"{where}: sparse.{name}: unknown key(s) {', '.join(sorted(map(str, extra)))}")
            keys = v.get("keys", v.get("fields", v.get("indices")))
            if keys is None:
                raise ConfigError(f"{where}: sparse.{name}: needs 'keys' (the indices or fields)")
            ne, side = v.get("num_embeddings"), v.get("side", "item")
            if ne is not None and (not isinstance(ne, int) or ne <= 0):
                raise ConfigError(f"{where}: sparse.{name}: num_embeddings must be a positive integer, got {ne!r}")
            if side not in ("user", "item"):
                raise ConfigError(f"{where}: sparse.{name}: side must be 'user' or 'item', got {side!r}")
        else:
            keys = v
        sparse.append((str(name), _parse_keys(keys, f"{where}: sparse.{name}"), ne, side))
    for name, v in (spec.get("dense") or {}).items():
        dense.append((str(name), _parse_keys(v, f"{where}: dense.{name}")))
    if not sparse and not dense:
        raise ConfigError(f"{where}: maps nothing (give 'sparse' and/or 'dense')")
    names = [s[0] for s in sparse] + [d[0] for d in dense]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}: a feature name is used twice")
    unmapped = spec.get("unmapped", "error")
    if unmapped not in ("error", "drop"):
        raise ConfigError(f"{where}: unmapped must be 'error' or 'drop', got {unmapped!r}")
    fm = FieldMap(sparse, dense, unmapped)
    lo, hi, _ = fm.lookup()
    if len(lo) > 1 and (lo[1:] <= hi[:-1]).any():
        k = int(np.flatnonzero(lo[1:] <= hi[:-1])[0]) + 1
        raise ConfigError(f"{where}: index/field {int(lo[k])} is mapped twice")
    return fm


class LibSVMReader(Reader):
    """libSVM (``label idx:val ...``) or libFM (``label field:idx:val ...``) text.

    Lines are split with pyarrow.compute a block at a time. Labels: 0/1, or -1/+1 (-1 -> 0).
    A sparse token contributes its index (libSVM) / idx (libFM) as an ID, hashed with
    `hash_ints` into the table; tokens whose value is 0 are dropped. A dense feature
    takes the (summed) value of its index / field, log-transformed like Criteo.
    """

    def __init__(self, path, *, libfm: bool = False, field_map=None, num_embeddings: int | None = None,
                 table_sizes=None, id_encoding=None, **kw):
        super().__init__(path, **kw)
        self.libfm = libfm
        self.format = "libfm" if libfm else "libsvm"
        self._nparts = 3 if libfm else 2
        self.inferred_fields = False
        if field_map is not None:
            fm = field_map if isinstance(field_map, FieldMap) else load_field_map(field_map, self.format)
        elif libfm:
            k = self._infer_num_fields()
            fm = FieldMap([(f"f{i}", [(i, i)], None, "item") for i in range(k)], [], "error")
            self.inferred_fields = True
        else:
            fm = FieldMap([("features", [(0, (1 << 63) - 1)], None, "item")], [], "error")
        self.field_map = fm
        names = [s[0] for s in fm.sparse]
        sizes = resolve_table_sizes(names, table_sizes, num_embeddings)
        explicit = sized_explicitly(names, table_sizes, num_embeddings)
        for j, s in enumerate(fm.sparse):  # a size in the field map wins
            if s[2] is not None:
                sizes[j], explicit[j] = s[2], True
        self._setup_ids(names, sizes, "hash-int", id_encoding, explicit)
        self.schema = Schema([d[0] for d in fm.dense], self._features(names, [s[3] for s in fm.sparse]),
                             dense_transform="log1p")
        self._lo, self._hi, self._tgt = fm.lookup()

    # -- reading and tokenising
    def _infer_num_fields(self) -> int:
        it = self._texts()
        try:
            first = next(it, None)
        finally:
            it.close()
        if first is None:
            raise TierecError(f"{self.path}: empty input (no data rows)")
        tk = _tokenize(*first)
        if tk is None:
            raise DataError("first block has no data rows", str(self.path))
        feat = tk.colons == 2
        feat[_row_starts(tk.line)] = False
        field = tk.parts.take(pa.array(tk.part0[feat]))
        field = pc.filter(field, pc.match_substring_regex(field, _UINT_RE))
        if len(field) == 0:
            raise DataError("no field:idx:val tokens in the first block; is this libFM? (or pass --field-map)",
                            str(self.path))
        k = int(pc.max(pc.cast(field, pa.int64())).as_py()) + 1
        if k > 10_000:
            raise DataError(f"first block has field {k - 1}; too many fields to make one table each "
                            "(pass --field-map)", str(self.path))
        log.info("%s: %d libFM fields in the first block -> sparse features f0..f%d", self.path, k, k - 1)
        return k

    def _blocks(self) -> Generator[Block, None, None]:
        for text, first_line in self._texts():
            tk = _tokenize(text, first_line)
            while tk is not None:
                out, lines, tok_row = self._parse(tk)
                if isinstance(out, Chunk):
                    yield Block(out, lines)
                    break
                self._report_bad(lines, out)  # raises unless skipping bad rows
                tk = tk.subset(~out.mask[tok_row])

    # -- parsing
    def _parse(self, tk: _Tokens) -> tuple[Chunk | _BadRows, np.ndarray, np.ndarray]:
        """Tokens -> (chunk or bad rows, line number of each row, row of each token)."""
        first = _row_starts(tk.line)
        tok_row = np.cumsum(first) - 1
        row_start = np.flatnonzero(first)
        lines = tk.line[row_start]
        n = len(row_start)
        bad = _BadRows(n)

        def flag(toks: np.ndarray, tok_bad: np.ndarray, describe: Callable[[int], str]) -> None:
            """Mark the rows of the bad ones among tokens ``toks``; describe a row by its first bad token."""
            if not tok_bad.any():
                return
            bt = toks[tok_bad]
            br = tok_row[bt]  # non-decreasing: tokens are in row order
            mask = np.zeros(n, bool)
            mask[br] = True
            bad.add(mask, lambda i: describe(int(bt[np.searchsorted(br, i)])))

        # Labels: the first token of each line.
        label_str = tk.parts.take(pa.array(tk.part0[row_start]))
        y, lb = _parse_floats(label_str)
        lb |= ~np.isin(y, (0.0, 1.0, -1.0)) | (tk.colons[row_start] != 0)
        bad.add(lb, lambda i: f"label must be 0 or 1 (or -1/+1), got {_quote(tk.text(int(row_start[i])))}")
        # Feature tokens: idx:val (libSVM) or field:idx:val (libFM).
        feat = np.flatnonzero(~first)
        want = "field:idx:val" if self.libfm else "idx:val"
        what = "field" if self.libfm else "index"
        shape_ok = tk.colons[feat] == self._nparts - 1
        flag(feat, ~shape_ok, lambda t: f"expected {want}, got {_quote(tk.text(t))}")
        feat = feat[shape_ok]  # check the well-formed tokens too: the earliest bad row wins
        p0 = tk.part0[feat]
        key_str = tk.parts.take(pa.array(p0))
        key, kb = _parse_uints(key_str)
        at = lambda t: int(np.searchsorted(feat, t))  # noqa: E731  (token -> position in feat)
        flag(feat, kb, lambda t: f"{what} is not a non-negative integer: {_quote(key_str[at(t)].as_py())}")
        if self.libfm:
            idx_str = tk.parts.take(pa.array(p0 + 1))
            idx, ib = _parse_uints(idx_str)
            flag(feat, ib, lambda t: f"idx is not a non-negative integer: {_quote(idx_str[at(t)].as_py())}")
        else:
            idx = key
        val_str = tk.parts.take(pa.array(p0 + self._nparts - 1))
        val, vb = _parse_floats(val_str)
        vb |= np.isnan(val)
        flag(feat, vb, lambda t: f"value is not a number: {_quote(val_str[at(t)].as_py())}")
        # Map keys (libSVM index / libFM field) to features.
        pos = np.searchsorted(self._lo, key, side="right") - 1
        ok = pos >= 0
        pos = np.maximum(pos, 0)
        ok &= key <= self._hi[pos]
        tgt = np.where(ok, self._tgt[pos], -1)
        if self.field_map.unmapped == "error":
            if self.inferred_fields:
                hint = f"(the first block had fields 0..{len(self.field_map.sparse) - 1}; pass --field-map)"
            else:
                hint = "(add it to the field map, or set 'unmapped: drop')"
            flag(feat, ~ok & ~kb, lambda t: f"{what} {int(key[at(t)])} is not in the field map {hint}")
        sizes = np.array(self.sizes + [0] * len(self.field_map.dense), np.int64)
        ident = np.array([e == "identity" and not self.raw for e in self.encodings] + [False] * len(self.field_map.dense))
        t = np.maximum(tgt, 0)
        out_of_table = (tgt >= 0) & ident[t] & (idx >= sizes[t]) & (val != 0)
        names = [f[0] for f in self.field_map.sparse]
        flag(feat, out_of_table, lambda t_: self._bad_id(names[int(tgt[at(t_)])], int(tgt[at(t_)]), int(idx[at(t_)])))
        if bad:
            return bad, lines, tok_row
        row = tok_row[feat]
        label = (y == 1.0).astype(np.float32)
        ns, nd = len(self.field_map.sparse), len(self.field_map.dense)
        tgt = np.where((tgt < ns) & (val == 0), -1, tgt)  # a 0 value is no ID
        # Group tokens by target feature (a stable sort keeps row order within each group).
        order = np.argsort(tgt.astype(np.int16 if ns + nd < 32000 else np.int64), kind="stable")
        bounds = np.searchsorted(tgt[order], np.arange(ns + nd + 1), side="left")
        sparse = {}
        for j, (name, _, _, _) in enumerate(self.field_map.sparse):
            sel = order[bounds[j] : bounds[j + 1]]
            offsets = np.searchsorted(row[sel], np.arange(n + 1), side="left").astype(np.int64)
            sparse[name] = (self._seen(j, encode_ints(idx[sel], self.encodings[j], self.sizes[j], self.raw)[0]), offsets)
        dense = np.zeros((n, nd), np.float32)
        for j in range(nd):
            sel = order[bounds[ns + j] : bounds[ns + j + 1]]
            dense[:, j] = log1p_dense(np.bincount(row[sel], weights=val[sel], minlength=n))
        return Chunk(label, dense, sparse, None), lines, tok_row


def _row_starts(line: np.ndarray) -> np.ndarray:
    """bool per token: the first token of its line."""
    first = np.ones(len(line), bool)
    first[1:] = line[1:] != line[:-1]
    return first


@dataclass
class _Tokens:
    """Whitespace-separated tokens of a block of lines, each split at ':' into parts.

    Token t spans bytes ``[start[t], end[t])`` of ``buf``, lies on input line ``line[t]``,
    holds ``colons[t]`` colons and so ``colons[t] + 1`` parts, the first being ``parts[part0[t]]``.
    """

    buf: np.ndarray
    start: np.ndarray
    end: np.ndarray
    line: np.ndarray
    colons: np.ndarray
    part0: np.ndarray
    parts: pa.LargeStringArray

    def text(self, t: int) -> str:
        return self.buf[self.start[t] : self.end[t]].tobytes().decode("utf-8", "replace")

    def subset(self, mask: np.ndarray) -> _Tokens | None:
        if not mask.any():
            return None
        return _Tokens(self.buf, self.start[mask], self.end[mask], self.line[mask], self.colons[mask],
                       self.part0[mask], self.parts)


def _tokenize(text: bytes, first_line: int) -> _Tokens | None:
    """Tokenise whole lines (``text`` ends with a newline) with numpy; None when there is no token."""
    if not text.isascii():  # make it valid UTF-8 for the string parts
        text = text.decode("utf-8", "replace").encode("utf-8")
    b = np.frombuffer(text, np.uint8)
    nl = b == 10
    sep = nl | (b == 32) | (b == 9) | (b == 13) | (b == 11) | (b == 12)
    colon = b == 58
    edge = np.empty(len(b) + 1, bool)  # edge[i]: sep[i - 1] != sep[i], with sep outside the text
    edge[0] = not sep[0]
    edge[-1] = not sep[-1]
    edge[1:-1] = sep[1:] != sep[:-1]
    bounds = np.flatnonzero(edge)  # alternately token start, token end
    start, end = bounds[0::2], bounds[1::2]
    if len(start) == 0:
        return None
    line = first_line + np.searchsorted(np.flatnonzero(nl), start)
    colon_pos = np.flatnonzero(colon)
    colons = np.searchsorted(colon_pos, end) - np.searchsorted(colon_pos, start)
    part0 = np.zeros(len(start), np.int64)
    np.cumsum(colons[:-1] + 1, out=part0[1:])
    # Parts: [token start | after a colon] .. [a colon | token end]; both sets are disjoint and sorted.
    pstart_mask = np.zeros(len(b) + 1, bool)
    pstart_mask[start] = True
    pstart_mask[colon_pos + 1] = True
    pstarts = np.flatnonzero(pstart_mask)
    keep = ~(sep | colon)
    kept_before = np.zeros(len(b) + 1, np.int32 if len(b) < 2**31 else np.int64)
    np.cumsum(keep, out=kept_before[1:])
    offsets = np.empty(len(pstarts) + 1, np.int64)
    offsets[:-1] = kept_before[pstarts]  # int32 -> int64
    offsets[-1] = kept_before[-1]
    data = b[keep]
    parts = pa.LargeStringArray.from_buffers(len(pstarts), pa.py_buffer(offsets), pa.py_buffer(data))
    return _Tokens(b, start, end, line, colons, part0, parts)


# --------------------------------------------------------------------------- entry points
def resolve_labels(fmt: str, num_labels: int | None = None, label_names=None) -> list[str]:
    """``--num-labels`` / ``--label-names`` -> the data set's label names (`Schema.labels`).

    ``label_names``: a list or a comma-separated string; without ``num_labels`` it gives the count.
    Only the Criteo formats hold several labels per row; every format can name its one label."""
    names = None
    if label_names is not None:
        names = [t.strip() for t in label_names.split(",")] if isinstance(label_names, str) else [
            str(t).strip() for t in label_names]
        if not names or not all(names):
            raise ConfigError(f"--label-names {label_names!r}: expected comma-separated non-empty names")
        if len(set(names)) != len(names):
            raise ConfigError(f"--label-names {label_names!r}: a name is given twice")
    if num_labels is None:
        num_labels = len(names) if names is not None else 1
    if isinstance(num_labels, bool) or not isinstance(num_labels, (int, np.integer)) or num_labels < 1:
        raise ConfigError(f"--num-labels must be an integer >= 1, got {num_labels!r}")
    if names is not None and len(names) != num_labels:
        raise ConfigError(f"--label-names gives {len(names)} names for --num-labels {num_labels}")
    if num_labels > 1 and fmt not in ("criteo-tsv", "criteo-csv"):
        raise ConfigError(f"--num-labels {num_labels}: only criteo-tsv and criteo-csv rows hold several labels; "
                          f"{fmt} rows have one")
    return names if names is not None else default_label_names(int(num_labels))


def open_reader(path, fmt: str, *, num_embeddings: int | None = None, table_sizes=None,
                skip_bad_rows: bool = False, field_map=None, rating_threshold: float = 4.0,
                max_rows: int | None = None, block_size: int = DEFAULT_BLOCK_SIZE, progress: bool = True,
                id_encoding=None, raw_ids: bool = False, num_labels: int | None = None,
                label_names=None) -> Reader:
    """A `Reader` for ``path`` in format ``fmt`` (one of `FORMATS`); iterate it for `Block`s.
    ``id_encoding``: see `resolve_encodings` (default: the format's hash). ``raw_ids``: raw IDs, the
    encodings' unreduced 64-bit hashes (identity: the integers, unchecked against the table), and
    ``raw=True`` in the schema (`SparseFeature.raw`). ``num_labels`` / ``label_names``: the labels at
    the start of each row (`resolve_labels`; several for the Criteo formats only)."""
    if fmt not in FORMATS:
        raise TierecError(f"unknown format {fmt!r} (choose from {', '.join(FORMATS)})")
    if field_map is not None and fmt not in ("libsvm", "libfm"):
        raise ConfigError(f"--field-map applies to libsvm and libfm, not {fmt}")
    labels = resolve_labels(fmt, num_labels, label_names)
    kw = dict(skip_bad_rows=skip_bad_rows, max_rows=max_rows, block_size=block_size, progress=progress,
              num_embeddings=num_embeddings, table_sizes=table_sizes, id_encoding=id_encoding, raw_ids=bool(raw_ids))
    reader: Reader
    if fmt in ("criteo-tsv", "criteo-csv"):
        return CriteoReader(path, csv=fmt == "criteo-csv", num_labels=len(labels), label_names=labels, **kw)
    if fmt in ("libsvm", "libfm"):
        reader = LibSVMReader(path, libfm=fmt == "libfm", field_map=field_map, **kw)
    else:
        reader = MovieLensReader(path, rating_threshold=rating_threshold, **kw)
    if reader.schema.labels != labels:  # a name for the one label
        reader.schema = replace(reader.schema, labels=labels)
    return reader


def read_blocks(path, fmt: str, **options) -> Iterator[Block]:
    """Stream `Block`s (chunk + line numbers) of ``path``; options as for `open_reader`."""
    yield from open_reader(path, fmt, **options)


def read_chunks(path, fmt: str, **options) -> Iterator[Chunk]:
    """Stream preprocessed `Chunk`s of ``path``; options as for `open_reader`."""
    for block in open_reader(path, fmt, **options):
        yield block.chunk
