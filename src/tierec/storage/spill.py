"""Arrays that spill to the SSD tier: zero-filled tensors backed by files, their resident pages bounded.

A structure whose size is O(rows) -- a dynamic table's raw ID -> slot index -- cannot stay in memory when
the rows themselves do not. `SpillArrays` gives it tensors of the same dtype and shape either in memory
(``root=None``) or mapped from files under ``root`` on the SSD tier::

    sp = SpillArrays(Path("run/tables/id_index"), resident_bytes=64 << 20)
    keys = sp.zeros(1 << 30, torch.int64)      # 8 GiB, O(1): a sparse file, every entry 0
    keys[ids] = ...                            # plain tensor ops; the kernel pages 4 KiB pages in and out
    sp.charge(ids.numel())                     # pages this op may have touched; over the bound: `trim`

Creating an array is O(1) at any size (``ftruncate`` of a new file, unlinked at once: the mapping
keeps it, and its disk goes back when the last tensor over it is freed). Pages a tensor op touches
become resident in the process; `charge` counts an upper bound of them and `trim` drops them
(``madvise(MADV_DONTNEED)``) once the count passes ``resident_bytes``: the process's resident memory
for the arrays stays within that bound plus one operation's pages. Dropping a page of a shared file
mapping loses nothing: written pages stay in the kernel's page cache, which writes them back to the
file (memory the kernel reclaims under pressure, as for the memmap table files). Long passes over a
whole array (`chunks`, `copy`) trim as they go.

With ``root=None`` every method is a no-op around plain ``torch.zeros`` tensors: one code path for both.
"""

from __future__ import annotations

import mmap
import os
import threading
import uuid
import weakref
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Protocol

import torch

PAGE = mmap.PAGESIZE
CHUNK = 1 << 22  # elements per step of a pass over a whole array

# every spilled mapping still in use: (first byte's address, bytes, the mapping), for `release_pages`
_MAPPED: list[tuple[int, int, weakref.ref[mmap.mmap]]] = []
_MAPPED_LOCK = threading.Lock()


class ArraySource(Protocol):
    """A 1-D array read a chunk at a time (a checkpoint's array file): ``chunks`` yields (start, end, values)
    for the given (start, end) ranges, in order."""

    def numel(self) -> int: ...

    def chunks(self, ranges: Iterable[tuple[int, int]]) -> Iterator[tuple[int, int, torch.Tensor]]: ...


def chunks_of(src: torch.Tensor | ArraySource, ranges: Iterable[tuple[int, int]]) -> Iterator[tuple[int, int, torch.Tensor]]:
    """(start, end, values) of ``src`` over ``ranges``: slices of a tensor, or the source's own reads."""
    if isinstance(src, torch.Tensor):
        flat = src.reshape(-1)
        return ((a, b, flat[a:b]) for a, b in ranges)
    return src.chunks(ranges)


def release_pages(t: torch.Tensor) -> None:
    """Drop the resident pages under ``t`` (a slice of a spilled array, contiguous) from this process; a no-op for
    tensors in ordinary memory. Used by long reads of a spilled array (writing it to a checkpoint)."""
    start, n = t.data_ptr(), t.numel() * t.element_size()
    with _MAPPED_LOCK:
        for base, size, ref in _MAPPED:
            mm = ref()
            if mm is not None and base <= start < base + size:
                lo = (start - base) // PAGE * PAGE
                hi = min(size, -(-(start - base + n) // PAGE) * PAGE)
                mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
                return


class SpillArrays:
    """Zero-filled arrays in memory (``root=None``) or in files under ``root``, resident pages bounded by
    ``resident_bytes`` (module docstring)."""

    def __init__(self, root: Path | None, resident_bytes: int = 64 << 20):
        self.root = Path(root) if root is not None else None
        self.resident_bytes = max(PAGE, int(resident_bytes))
        self._maps: list[weakref.ref[mmap.mmap]] = []  # every mapping a tensor still holds
        self._touched = 0  # bytes of pages possibly made resident since the last trim
        self._lock = threading.Lock()
        self.trims = 0
        if self.root is not None:
            self.root.mkdir(parents=True, exist_ok=True)

    @property
    def spilled(self) -> bool:
        return self.root is not None

    def zeros(self, n: int, dtype: torch.dtype) -> torch.Tensor:
        """A 1-D tensor of ``n`` zeros: in memory, or over a new sparse file (O(1))."""
        if self.root is None:
            return torch.zeros(n, dtype=dtype)
        nbytes = max(PAGE, n * torch.empty(0, dtype=dtype).element_size())
        path = self.root / f"spill-{uuid.uuid4().hex}.bin"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, nbytes)
            mm = mmap.mmap(fd, nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
            os.unlink(path)  # the mapping keeps the file; its blocks are freed with the last tensor over it
        t = torch.frombuffer(mm, dtype=dtype, count=n) if n else torch.empty(0, dtype=dtype)
        with self._lock:
            self._maps = [r for r in self._maps if r() is not None]
            self._maps.append(weakref.ref(mm))
        with _MAPPED_LOCK:
            _MAPPED[:] = [m for m in _MAPPED if m[2]() is not None]
            _MAPPED.append((t.data_ptr(), nbytes, weakref.ref(mm)))
        return t

    def like(self, t: torch.Tensor) -> torch.Tensor:
        """A copy of ``t`` (1-D) in arrays of this kind, copied chunk by chunk (`copy`)."""
        out = self.zeros(t.numel(), t.dtype)
        self.copy(out, t)
        return out

    def charge(self, elements: int) -> None:
        """An operation touched up to ``elements`` scattered entries (one page each at worst): trim when the
        pages possibly resident pass ``resident_bytes``."""
        if self.root is None:
            return
        self._touched += elements * PAGE
        if self._touched > self.resident_bytes and self.mapped_bytes() > self.resident_bytes:
            self.trim()

    def mapped_bytes(self) -> int:
        """Bytes of the mappings tensors still hold (when they all fit the bound, nothing need leave)."""
        with self._lock:
            return sum(len(mm) for r in self._maps if (mm := r()) is not None and not mm.closed)

    def trim(self) -> None:
        """Drop every resident page of the arrays' mappings (written pages stay in the page cache)."""
        if self.root is None:
            return
        with self._lock:
            for r in self._maps:
                if (mm := r()) is not None and not mm.closed:
                    mm.madvise(mmap.MADV_DONTNEED)
            self._touched = 0
            self.trims += 1

    def chunks(self, n: int, bytes_per_element: int = 8) -> Iterator[tuple[int, int]]:
        """(start, end) of a pass over ``n`` elements of arrays holding ``bytes_per_element`` together,
        trimming between chunks so that the pass keeps within ``resident_bytes``."""
        step = CHUNK if self.root is None else max(PAGE, min(CHUNK, self.resident_bytes // (2 * bytes_per_element)))
        for a in range(0, n, step):
            b = min(n, a + step)
            yield a, b
            if self.root is not None:
                self._touched += (b - a) * bytes_per_element
                if self._touched > self.resident_bytes // 2:
                    self.trim()

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """``dst.copy_(src)`` (1-D, same size) chunk by chunk, trimming as it goes."""
        for a, b in self.chunks(src.numel(), 2 * src.element_size()):
            dst[a:b].copy_(src[a:b])

    @property
    def nbytes(self) -> int:
        """Bytes of the arrays held in memory: all of them, or when spilled the bound on resident pages."""
        return self.resident_bytes if self.root is not None else 0
