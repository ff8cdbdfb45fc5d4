"""Tiered row storage for embedding tables: SSD files, software caches, frequency sketches.

Stack them for device <- DRAM <- SSD::

    ssd = SsdTable(path, n, dim, state_dim, create=True, init_seed=seed, table_index=i)
    dram = CachedTable(ssd, capacity_rows=10_000_000, policy="lru", name="dram")
    hbm = CachedTable(dram, capacity_rows=1_000_000, policy="lfu", device="cuda", name="hbm")

See docs/storage.md.
"""

from tierec.storage.cache import CachedTable
from tierec.storage.sketch import CountMinSketch
from tierec.storage.ssd import SsdTable

__all__ = ["CachedTable", "CountMinSketch", "SsdTable"]
