"""Session clustering of data sets: write a session's samples together, within a bounded window.

`WindowedWriter` sits in front of a `SplitWriter`: it buffers ``window`` rows (in input
order), reorders them and writes them out, so memory is bounded by the window and rows
never move further than one window:

- ``by="session"``: rows grouped by session key (stable within a session), the sessions
  of the window in a random order (seeded), so consecutive batches still mix users;
  the split writer then stores user-side lists once per run (`Chunk.to_arrow`);
- ``by="shuffle"``: rows randomly permuted within the window (interleaves sessions, as raw
  logs of concurrent users do: the unclustered baseline);
- ``by="none"``: input order.

Without a session column, the session key is a hash of the row's user-side lists.
`recluster` rewrites a whole data set this way (`tierec data cluster`).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np

from tierec.data.dataset import SPLITS, Chunk, Dataset, DatasetWriter, Schema, SplitWriter, prepare_output_dir
from tierec.errors import ConfigError
from tierec.sparse.dedup import row_hashes

log = logging.getLogger(__name__)

CLUSTER_BY = ("none", "session", "shuffle")
DEFAULT_WINDOW = 1 << 18
DERIVED_KEY = "user-side features"  # schema.session_key when sessions are hashes of user-side lists


def clustered_schema(schema: Schema, by: str) -> Schema:
    """The schema to write with ``by``: clustering by session needs a session key (derived if absent)."""
    if by not in CLUSTER_BY:
        raise ConfigError(f"--cluster-by must be one of {', '.join(CLUSTER_BY)}, got {by!r}")
    if by != "session" or schema.session_key is not None:
        return schema
    if not schema.user_names:
        raise ConfigError("--cluster-by session: the data set has no session key and no user-side sparse feature "
                          "to derive one from (declare side: user in the field map)")
    return replace(schema, session_key=DERIVED_KEY)


def session_keys(chunk: Chunk, schema: Schema) -> np.ndarray:
    """int64 [n]: the chunk's session column, or a hash of its rows' user-side lists."""
    if chunk.session is not None:
        return chunk.session
    feats = [chunk.sparse[k] for k in schema.user_names]
    return row_hashes(feats, len(chunk)).view(np.int64)


def window_order(keys: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """int64 [n]: rows grouped by ``keys`` (stable), groups in a random order."""
    _, inv = np.unique(keys, return_inverse=True)
    rank = rng.permutation(int(inv.max()) + 1 if inv.size else 0)
    return np.argsort(rank[inv.reshape(-1)], kind="stable")


class WindowedWriter:
    """Reorders rows within windows of ``window`` rows before a `SplitWriter` (module doc)."""

    def __init__(self, writer: SplitWriter, by: str, window: int, seed: int = 0):
        if window <= 0:
            raise ConfigError(f"--cluster-window must be > 0 rows, got {window}")
        self.writer, self.by, self.window = writer, by, int(window)
        self.schema = writer.schema
        self.rng = np.random.default_rng([seed, 0x5E55])
        self._buf: list[Chunk] = []
        self._rows = 0

    def write(self, chunk: Chunk) -> None:
        if self.by == "none":
            return self.writer.write(chunk)
        if self.schema.session_key is not None and chunk.session is None:
            chunk = replace(chunk, session=session_keys(chunk, self.schema))
        self._buf.append(chunk)
        self._rows += len(chunk)
        while self._rows >= self.window:
            self._emit(self.window)

    def _emit(self, n: int) -> None:
        data = Chunk.concat(self._buf)
        win, rest = data.slice(0, n), data.slice(n, len(data))
        self._buf, self._rows = ([rest], len(rest)) if len(rest) else ([], 0)
        if self.by == "session":
            assert win.session is not None  # write() sets it: a "session" schema has a key (clustered_schema)
            order = window_order(win.session, self.rng)
        else:
            order = self.rng.permutation(len(win))
        self.writer.write(win.take(order))

    def close(self) -> None:
        if self._rows:
            self._emit(self._rows)


def open_writers(out: Path, schema: Schema, by: str, window: int, seed: int, **kw) -> tuple[DatasetWriter, dict]:
    """A `DatasetWriter` for ``by`` plus one `WindowedWriter` per split; returns (writer, {split: windowed})."""
    schema = clustered_schema(schema, by)
    writer = DatasetWriter(out, schema, splits=SPLITS, user_runs=by == "session", **kw)
    return writer, {s: WindowedWriter(w, by, window, seed) for s, w in writer.splits.items()}


def clustering_record(by: str, window: int, seed: int) -> dict | None:
    """The manifest's ``clustering`` entry (None for ``by="none"``)."""
    if by == "none":
        return None
    return {"by": by, "window": int(window), "seed": int(seed), "user_runs": by == "session"}


def recluster(src, out, by: str = "session", window: int = DEFAULT_WINDOW, seed: int = 0,
              row_group_size: int | None = None) -> dict:
    """Rewrite data set ``src`` at ``out`` in storage order through `WindowedWriter`; returns the manifest."""
    ds = Dataset(src)
    out = Path(out)
    if out.resolve() == Path(src).resolve():
        raise ConfigError(f"{out}: --out must differ from the source data set")
    prepare_output_dir(out)
    groups = {s: ds.row_groups(s) for s in ds.splits}
    rg = row_group_size or max([g[2] for gs in groups.values() for g in gs] or [65536])
    files = [f["rows"] for sp in ds.manifest["splits"].values() for f in sp["files"]]
    writer, windowed = open_writers(out, ds.schema, by, window, seed, row_group_size=rg,
                                    rows_per_file=max(files or [1 << 20]))
    for split in ds.splits:
        for chunk in ds.chunks(split, 1 << 16):
            windowed[split].write(chunk)
        windowed[split].close()
    source = {"reclustered_from": str(Path(src).resolve()), "source": ds.manifest.get("source", {})}
    extra = {"clustering": clustering_record(by, window, seed)} if by != "none" else None
    m = writer.close(source=source, extra=extra)
    log.info("%s -> %s: %s within windows of %d rows", src, out, by, window)
    return m
