"""Access-trace readers for the cache simulators (`tierec.sim.policies`).

A trace is a 1-D int64 numpy array of keys in request order. Readers:

- `read_plain`: text, one integer ID per line (blank lines and lines starting
  with ``#`` are skipped); zstd-compressed if the file starts with the zstd
  magic bytes (e.g. ``trace.txt.zst``).
- `read_arc`: the ARC paper's traces (Megiddo & Modha, FAST '03), zstd
  compressed or not: lines ``start_block n_blocks ignored request_no``; a line
  requests the ``n_blocks`` pages ``start_block .. start_block + n_blocks - 1``.
- `read_dataset`: a tierec data set; one trace per sparse feature (= embedding
  table): its IDs in batch order, optionally deduplicated within each batch
  (a training step fetches each distinct row of a batch once).

`load_traces` auto-detects which (`detect_format`) and returns ``{name: trace}``.
Malformed input raises `DataError` naming the file and the 1-based line.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np

from tierec.errors import DataError, TierecError
from tierec.sparse.dedup import expand_ranges

FORMATS = ("auto", "dataset", "arc", "plain")
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_BLOCK = 8 << 20  # bytes of (decompressed) text parsed at a time


def detect_format(path: str | os.PathLike) -> str:
    """``dataset`` for a directory with ``manifest.json``, ``arc`` for ``*.lis`` /
    ``*.lis.zst``, else ``plain``. Raises `TierecError` if ``path`` does not exist."""
    p = Path(path)
    if not p.exists():
        raise TierecError(f"{p}: no such file or directory")
    if p.is_dir():
        if (p / "manifest.json").exists():
            return "dataset"
        raise TierecError(f"{p}: a directory without manifest.json is not a tierec data set")
    name = p.name.lower()
    if name.endswith(".lis") or name.endswith(".lis.zst"):
        return "arc"
    return "plain"


def _open_text(path: Path) -> BinaryIO:
    try:
        f = open(path, "rb")
    except OSError as e:
        raise DataError(f"cannot open ({e.strerror})", str(path)) from None
    head = f.read(4)
    f.seek(0)
    if head == ZSTD_MAGIC:
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(f, closefd=True)
    return f


def _line_blocks(path: Path) -> Iterator[tuple[int, bytes]]:
    """Yield ``(line number of the block's first line, block of whole lines)``."""
    f = _open_text(path)
    lineno, rest = 1, b""
    try:
        while True:
            try:
                data = f.read(_BLOCK)
            except Exception as e:  # zstd: corrupt or truncated frame
                raise DataError(f"cannot decompress ({e})", str(path)) from None
            if not data:
                break
            data = rest + data
            cut = data.rfind(b"\n") + 1
            if cut == 0:
                rest = data
                continue
            block, rest = data[:cut], data[cut:]
            yield lineno, block
            lineno += block.count(b"\n")
        if rest:
            yield lineno, rest
    finally:
        f.close()


def _slow_lines(path: Path, lineno: int, block: bytes, fields: int) -> list[tuple[int, list[bytes]]]:
    """Per-line parse of a block with blank/comment lines or errors: [(line number, tokens)]."""
    out = []
    for i, line in enumerate(block.split(b"\n")):
        s = line.strip()
        if not s or s.startswith(b"#"):
            continue
        tok = s.split()
        if len(tok) != fields:
            what = "one integer ID" if fields == 1 else f"{fields} fields"
            raise DataError(f"expected {what}, got {len(tok)} fields: {_show(s)}", str(path), lineno + i)
        out.append((lineno + i, tok))
    return out


def _show(s: bytes, n: int = 60) -> str:
    t = s.decode("utf-8", "replace")
    return repr(t if len(t) <= n else t[:n] + "...")


def _to_int64(path: Path, rows: list[tuple[int, list[bytes]]]) -> np.ndarray:
    """Convert tokens to int64, naming the first bad line."""
    try:
        return np.array([t for _, tok in rows for t in tok]).astype(np.int64)
    except (ValueError, OverflowError):
        for ln, tok in rows:
            for t in tok:
                try:
                    v = int(t)
                except ValueError:
                    raise DataError(f"not an integer: {_show(t)}", str(path), ln) from None
                if not -(2**63) <= v < 2**63:
                    raise DataError(f"integer out of the int64 range: {_show(t)}", str(path), ln) from None
        raise


def _tokens_per_line(block: bytes, nlines: int) -> np.ndarray:
    """Number of whitespace-separated tokens on each line of ``block``: int64 [nlines]."""
    b = np.frombuffer(block, np.uint8)
    space = (b == 32) | (b == 9) | (b == 13) | (b == 10) | (b == 11) | (b == 12)
    start = ~space
    start[1:] &= space[:-1]  # first byte of a token
    line = np.cumsum(b == 10) - (b == 10)  # line index of each byte
    return np.bincount(line[start], minlength=nlines)[:nlines]


def _parse_block(path: Path, lineno: int, block: bytes, fields: int) -> tuple[np.ndarray, np.ndarray]:
    """Parse a block into (int64 [rows, fields], line numbers int64 [rows])."""
    nlines = block.count(b"\n") + (0 if block.endswith(b"\n") else 1)
    if b"#" not in block and np.all(_tokens_per_line(block, nlines) == fields):
        # Fast path: every line holds exactly `fields` tokens (no blank or comment lines).
        try:
            arr = np.fromstring(block, dtype=np.int64, sep=" ")  # far faster than split + astype
        except ValueError:  # a token that is not an integer: find it below
            arr = None
        # fromstring saturates out-of-range integers: let the exact path judge those.
        if arr is not None and arr.size == fields * nlines and not np.any((arr >= 2**62) | (arr <= -(2**62))):
            return arr.reshape(-1, fields), np.arange(lineno, lineno + nlines, dtype=np.int64)
    rows = _slow_lines(path, lineno, block, fields)
    arr = _to_int64(path, rows).reshape(-1, fields)
    return arr, np.array([ln for ln, _ in rows], np.int64)


def read_plain(path: str | os.PathLike, max_requests: int | None = None) -> np.ndarray:
    """A plain text trace, one integer ID per line (optionally zstd-compressed): int64 [n]."""
    p = Path(path)
    parts, total = [], 0
    for lineno, block in _line_blocks(p):
        arr, _ = _parse_block(p, lineno, block, 1)
        parts.append(arr.reshape(-1))
        total += arr.shape[0]
        if max_requests is not None and total >= max_requests:
            break
    out = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    return out[:max_requests] if max_requests is not None else out


def read_arc(path: str | os.PathLike, max_requests: int | None = None) -> np.ndarray:
    """An ARC-format trace, pages expanded in order: int64 [n]."""
    p = Path(path)
    parts, total = [], 0
    for lineno, block in _line_blocks(p):
        arr, lines = _parse_block(p, lineno, block, 4)
        start, count = arr[:, 0], arr[:, 1]
        bad = np.flatnonzero((count < 1) | (start < 0))
        if bad.size:
            i = int(bad[0])
            what = "n_blocks must be >= 1" if count[i] < 1 else "start_block must be >= 0"
            raise DataError(f"{what}, got {start[i]} {count[i]}", str(p), int(lines[i]))
        if max_requests is not None:  # do not expand far past the cap
            keep = int(np.searchsorted(np.cumsum(count), max_requests - total)) + 1
            start, count = start[:keep], count[:keep]
        pages = expand_ranges(start, count)
        parts.append(pages)
        total += pages.size
        if max_requests is not None and total >= max_requests:
            break
    out = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    return out[:max_requests] if max_requests is not None else out


def dedup_per_batch(values: np.ndarray, offsets: np.ndarray, batch_size: int) -> np.ndarray:
    """Keep the first request of each ID within each batch of ``batch_size`` rows.

    ``values``/``offsets``: one jagged feature (``offsets`` int64 [rows + 1]);
    batches are rows ``[0, B)``, ``[B, 2B)``, ... Order: first occurrence within
    the batch. Returns int64 [m].
    """
    values = np.asarray(values, np.int64)
    if values.size == 0:
        return values
    rows = offsets.size - 1
    bid = np.repeat(np.arange(rows, dtype=np.int64) // batch_size, np.diff(offsets))
    order = np.lexsort((np.arange(values.size), values, bid))
    b, v = bid[order], values[order]
    first = np.ones(values.size, bool)
    first[1:] = (b[1:] != b[:-1]) | (v[1:] != v[:-1])
    keep = np.zeros(values.size, bool)
    keep[order[first]] = True
    return values[keep]


def read_dataset(path: str | os.PathLike, split: str = "train", tables: list[str] | None = None,
                 dedup_batch: int | None = None, max_requests: int | None = None, shuffle: bool = False,
                 seed: int = 0, progress: bool = True) -> dict[str, np.ndarray]:
    """One trace per sparse feature of a tierec data set: ``{table: int64 [n]}``.

    Rows are read in storage order, or, with ``shuffle``, in the order
    ``tierec train`` sees in its first epoch with the same ``seed`` (the row
    order does not depend on the batch size). With ``dedup_batch = B`` each
    trace keeps one request per distinct ID per batch of ``B`` rows.
    ``max_requests`` caps each trace (the first requests).
    """
    from tqdm import tqdm

    from tierec.data.dataset import Dataset

    ds = Dataset(path)
    names = ds.schema.sparse_names
    if tables:
        unknown = [t for t in tables if t not in names]
        if unknown:
            raise TierecError(f"{path}: no sparse feature(s) {', '.join(unknown)} (has: {', '.join(names)})")
        names = [n for n in names if n in tables]
    if dedup_batch is not None and dedup_batch <= 0:
        raise TierecError(f"--dedup-per-batch must be > 0, got {dedup_batch}")
    rows_per_chunk = 65536 if dedup_batch is None else dedup_batch * max(1, 65536 // dedup_batch)
    parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    counts = dict.fromkeys(names, 0)
    bar = tqdm(total=ds.num_rows(split), desc=f"read {Path(path).name}/{split}", unit="row",
               disable=not progress, leave=False, dynamic_ncols=True)
    with bar:
        for chunk in ds.chunks(split, rows_per_chunk, shuffle=shuffle, seed=seed):
            for n in names:
                if max_requests is not None and counts[n] >= max_requests:
                    continue
                v, o = chunk.sparse[n]
                if dedup_batch is not None:
                    v = dedup_per_batch(v, o, dedup_batch)
                parts[n].append(np.asarray(v, np.int64))
                counts[n] += v.size
            bar.update(len(chunk))
            if max_requests is not None and all(c >= max_requests for c in counts.values()):
                break
    out = {}
    for n in names:
        t = np.concatenate(parts[n]) if parts[n] else np.zeros(0, np.int64)
        out[n] = t[:max_requests] if max_requests is not None else t
    return out


def load_traces(path: str | os.PathLike, fmt: str = "auto", *, max_requests: int | None = None,
                **dataset_kw) -> tuple[str, dict[str, np.ndarray]]:
    """Read any supported input: returns ``(format, {trace name: int64 trace})``.

    Plain and ARC inputs give one trace named after the file (without
    ``.zst``/``.lis``/``.txt``); ``dataset_kw`` go to `read_dataset`.
    """
    if fmt not in FORMATS:
        raise TierecError(f"unknown trace format {fmt!r} (choose from {', '.join(FORMATS)})")
    kind = detect_format(path) if fmt == "auto" else fmt
    p = Path(path)
    if kind == "dataset":
        return kind, read_dataset(p, max_requests=max_requests, **dataset_kw)
    if not p.exists():
        raise TierecError(f"{p}: no such file or directory")
    if p.is_dir():
        raise TierecError(f"{p}: is a directory, not {'an ARC' if kind == 'arc' else 'a plain'} trace file")
    name = p.name
    for suffix in (".zst", ".lis", ".txt", ".trace"):
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            name = name[: -len(suffix)]
    reader = read_arc if kind == "arc" else read_plain
    return kind, {name: reader(p, max_requests=max_requests)}
