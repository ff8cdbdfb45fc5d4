"""Sharding plan: which rank owns which embedding rows.

A *shard* is rows ``[lo, hi)`` of one table on one rank. Table-wise sharding
gives a table one shard (its whole row range) on one rank; row-wise sharding
splits a table into ``world`` contiguous row ranges, one per rank.

Automatic choice (`plan_shards`):

- row-wise for a table larger than one rank's memory budget (``--memory-budget``
  is per rank under torchrun), table-wise otherwise;
- table-wise tables go, largest cost first, to the least loaded rank, where a
  table's cost is its share of all table bytes plus its share of all measured
  lookups (both in [0, 1]): memory and lookup work are balanced together.

Overrides (config file, ``[sharding] tables = {C1 = 0, C3 = "row"}``): a rank
number pins a table to that rank; ``"row"`` shards it row-wise; ``"auto"`` is
the default.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from tierec.config import format_bytes
from tierec.errors import ConfigError
from tierec.storage.plan import TableNeeds


@dataclass(frozen=True)
class Shard:
    table: str
    index: int  # table index in schema order (seeds its initial rows)
    rank: int
    lo: int  # first row (global row ID)
    hi: int  # one past the last row
    num_embeddings: int  # rows of the whole table

    @property
    def rows(self) -> int:
        return self.hi - self.lo

    @property
    def whole(self) -> bool:
        return self.lo == 0 and self.hi == self.num_embeddings

    @property
    def name(self) -> str:
        """Storage name: the table's name, or ``C3.rows-0-500`` for a row-wise shard."""
        return self.table if self.whole else f"{self.table}.rows-{self.lo}-{self.hi}"

    def to_dict(self) -> dict:
        return asdict(self)


def row_bounds(n: int, world: int) -> list[int]:
    """Contiguous split of ``n`` rows (or samples) over ``world`` ranks: bounds [world + 1]."""
    return [(r * n) // world for r in range(world + 1)]


def plan_shards(tables: list[TableNeeds], world: int, budget_per_rank: int | None = None,
                overrides: dict[str, int | str] | None = None, row_splits: dict[str, list[int]] | None = None
                ) -> list[Shard]:
    """Shards of every table, in table order (row-wise shards by rank). See the module doc. ``row_splits``:
    tables sharded row-wise on these bounds ([world + 1]; a dynamic table's partitions) unless an override
    names a rank for them."""
    overrides = dict(overrides or {})
    row_splits = dict(row_splits or {})
    names = [t.name for t in tables]
    for name, v in overrides.items():
        where = f"sharding.tables.{name}"
        if name not in names:
            raise ConfigError(f"{where}: no such table (tables are {names})")
        if isinstance(v, bool) or not (isinstance(v, int) or v in ("row", "auto")):
            raise ConfigError(f"{where}: expected a rank number, 'row' or 'auto', got {v!r}")
        if isinstance(v, int) and not 0 <= v < world:
            raise ConfigError(f"{where}: rank {v} does not exist in a job of {world} rank(s)")
    total_bytes = sum(t.table_bytes for t in tables) or 1
    total_lookups = sum(max(t.lookups, 1) for t in tables)
    cost = {t.name: t.table_bytes / total_bytes + max(t.lookups, 1) / total_lookups for t in tables}
    load = [0.0] * world
    owner: dict[str, int | str] = {}
    for t in tables:
        v = overrides.get(t.name, "row" if t.name in row_splits else "auto")
        if v == "auto" and budget_per_rank is not None and t.table_bytes > budget_per_rank and world > 1:
            v = "row"
        if v == "row":
            owner[t.name] = "row"
            load = [x + cost[t.name] / world for x in load]
        elif isinstance(v, int):
            owner[t.name] = v
            load[v] += cost[t.name]
    for t in sorted((t for t in tables if t.name not in owner), key=lambda t: -cost[t.name]):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[t.name] = r
        load[r] += cost[t.name]
    shards = []
    for i, t in enumerate(tables):
        rank = owner[t.name]
        if isinstance(rank, int):
            shards.append(Shard(t.name, i, rank, 0, t.num_embeddings, t.num_embeddings))
        else:  # "row"
            b = row_splits.get(t.name) or row_bounds(t.num_embeddings, world)
            shards += [Shard(t.name, i, r, b[r], b[r + 1], t.num_embeddings) for r in range(world)]
    return shards


def describe(shards: list[Shard], tables: list[TableNeeds], world: int) -> str:
    """The plan as a small table: per rank, its shards, bytes and share of lookups."""
    by = {t.name: t for t in tables}
    total_lookups = sum(t.lookups for t in tables) or 1
    lines = [f"sharding plan over {world} rank(s):",
             f"  {'rank':>4} {'bytes':>11} {'lookups':>8}  shards"]
    for r in range(world):
        mine = [s for s in shards if s.rank == r]
        nbytes = sum(s.rows * by[s.table].row_bytes for s in mine)
        share = sum(by[s.table].lookups * s.rows / s.num_embeddings for s in mine) / total_lookups
        lines.append(f"  {r:>4} {format_bytes(nbytes):>11} {share:8.1%}  "
                     + (", ".join(s.name for s in mine) or "-"))
    return "\n".join(lines)
