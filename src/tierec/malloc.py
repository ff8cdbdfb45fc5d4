"""glibc malloc thresholds: when freed memory goes back to the OS.

Two settings, fixed rather than left to glibc's dynamic ones:

- `TRANSIENT_MALLOC` (table building, checkpoints, evaluation, serving): blocks of 1 MiB and more
  get their own mapping, so freed multi-MB temporaries leave the resident set at once and peak
  RSS stays within the memory budget plus a fixed overhead;
- `STEP_MALLOC` (the training loop): activations, allocated and freed every step, are reused
  from the heap instead of being mapped afresh (a fresh mapping's pages fault in zeroed, and the
  trainer's page faults contend with the prefetch threads' on the process's memory map; the
  measured cost is in docs/lookahead.md).

And Arrow's allocator (`returning_arrow_pool`): the data loader's decoded row groups come from
Arrow's jemalloc pool, which hands freed pages back at once, not from its default mimalloc, which
kept them resident.
"""

from __future__ import annotations

import contextlib
import logging
import os

log = logging.getLogger(__name__)

# glibc malloc thresholds (bytes). Transient: table building, checkpoints, evaluation, serving -- freed
# multi-MB temporaries go back to the OS at once. Steps: the training loop, whose activations (batch 4096 x
# 512 floats = 8 MiB each) are allocated and freed every step and should be reused, not mapped afresh.
TRANSIENT_MALLOC = (1 << 20, 1 << 20)
STEP_MALLOC = (32 << 20, 64 << 20)  # 32 MiB: glibc's largest mmap threshold on 64-bit
_malloc_now: tuple[int, int] | None = None  # what this process last set (glibc cannot be asked)


def _libc():
    """glibc, or None where the process has none."""
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def set_malloc_thresholds(mmap_threshold: int, trim_threshold: int) -> bool:
    """Fix glibc's malloc thresholds: blocks >= ``mmap_threshold`` bytes get their own mapping and go back
    to the OS when freed; free memory above ``trim_threshold`` at the top of the heap is returned.
    Returns False where mallopt is missing (not glibc)."""
    global _malloc_now
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    ok = bool(libc.mallopt(m_mmap_threshold, mmap_threshold)) and bool(libc.mallopt(m_trim_threshold, trim_threshold))
    if ok:
        _malloc_now = (mmap_threshold, trim_threshold)
    return ok


def limit_malloc_retention() -> bool:
    """The transient thresholds (`TRANSIENT_MALLOC`). Left alone, glibc raises its mmap threshold after large
    frees, after which freed temporaries stay in the heap and count as resident memory; fixed low thresholds
    keep peak RSS within the memory budget plus a fixed overhead."""
    return set_malloc_thresholds(*TRANSIENT_MALLOC)


def release_free_memory() -> None:
    """Hand what the allocators hold free back to the OS: Arrow's memory pool (mimalloc, its default, keeps
    freed pages for reuse) and glibc's arenas (``malloc_trim(0)``; the threads that read and decode data have
    arenas of their own). For the end of a one-off pass over data -- the planning pass read ~200K rows and left
    ~30-45 MiB resident before the first step (bench_scale --quick); not for the training loop, whose next
    step would fault its pages back in."""
    try:
        import pyarrow as pa

        pa.default_memory_pool().release_unused()
    except (ImportError, AttributeError):
        pass
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def returning_arrow_pool() -> str:
    """Make Arrow's jemalloc pool the process's default (unless ``ARROW_DEFAULT_MEMORY_POOL`` names one) and
    return the backend in use ("jemalloc", or the default where this pyarrow was built without it).

    At bench_scale --quick a training pass decodes a row group (65,536 rows of 26 features) every 16
    batches of 4096. Measured when the loader still decoded whole groups (~20 MB of Arrow buffers, twice
    with the shuffle's copy; now a column at a time, `tierec.data.rowgroup`): mimalloc, Arrow's default,
    kept what the decoded groups freed resident for reuse, ~80 MiB beyond the 26-60 MiB in use. Arrow sets
    jemalloc's decay to 0, so freed pages go back to the OS at once; since the loader decodes on its reader
    threads alone (`tierec.data.dataset`, ``use_threads=False``) that costs no measurable CPU: a pass over
    the quick run's 550 batches took 2.0-2.1 s of CPU either way, and the tiered run peaked 15-20 MiB
    lower (in memory: 0-10). Buffers allocated before keep their pool; each is freed to the pool it came
    from."""
    try:
        import pyarrow as pa
    except ImportError:
        return "none"
    if not os.environ.get("ARROW_DEFAULT_MEMORY_POOL"):  # the user's choice stands
        try:
            pa.set_memory_pool(pa.jemalloc_memory_pool())
        except (NotImplementedError, AttributeError):
            log.debug("pyarrow has no jemalloc pool: Arrow keeps its default allocator")
    return pa.default_memory_pool().backend_name


@contextlib.contextmanager
def malloc_thresholds(mmap_threshold: int, trim_threshold: int):
    """Set the thresholds inside the block and restore the previous ones after it (glibc's own dynamic
    thresholds cannot be restored: a process that never set any gets `TRANSIENT_MALLOC` back).

    The training loop runs with `STEP_MALLOC` (module doc); checkpoints and evaluation inside it go back
    to `TRANSIENT_MALLOC`, so their multi-MB chunks do not stay resident."""
    before = _malloc_now
    set_malloc_thresholds(mmap_threshold, trim_threshold)
    try:
        yield
    finally:
        set_malloc_thresholds(*(before or TRANSIENT_MALLOC))
