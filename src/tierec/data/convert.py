"""`tierec data convert`: raw Criteo / libSVM / libFM / MovieLens text -> a tierec data set.

Streams the input through a `tierec.data.readers` reader (constant memory), splits
rows into ``train`` and ``test`` by a hash of each row's input line number and the
seed (deterministic; the test split is a held-out random ``test_fraction``), and
writes both through `DatasetWriter`. The manifest's ``source`` records the input,
the format, rows read, bad rows skipped and the options. See docs/data.md.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from tierec.data.cluster import DEFAULT_WINDOW, clustering_record, open_writers
from tierec.data.dataset import prepare_output_dir
from tierec.data.hashing import splitmix64
from tierec.data.readers import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_NUM_EMBEDDINGS,
    FORMATS,
    open_reader,
    take_rows,
)
from tierec.errors import ConfigError, TierecError

log = logging.getLogger(__name__)



def is_test_row(lines: np.ndarray, test_fraction: float, seed: int = 0) -> np.ndarray:
    """Which rows go to the test split: ``u(line, seed) < test_fraction``.

    ``u`` is a uniform number in [0, 1) from ``splitmix64(splitmix64(line) ^ splitmix64(seed))``,
    so a row's split depends only on its input line number and the seed.
    """
    if test_fraction <= 0:
        return np.zeros(len(lines), bool)
    s = splitmix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], np.uint64))[0]
    with np.errstate(over="ignore"):
        h = splitmix64(splitmix64(np.asarray(lines, np.int64).view(np.uint64)) ^ s)
    u = (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
    return u < test_fraction


def convert(input_path, out_dir, fmt: str, *, num_embeddings: int | None = None, table_sizes=None,
            test_fraction: float = 0.1, seed: int = 0, skip_bad_rows: bool = False,
            rows_per_file: int = 1 << 20, row_group_size: int = 65536, field_map=None,
            max_rows: int | None = None, rating_threshold: float = 4.0,
            block_size: int = DEFAULT_BLOCK_SIZE, progress: bool = True, cluster_by: str = "none",
            cluster_window: int = DEFAULT_WINDOW, id_encoding=None, raw_ids: bool = False,
            num_labels: int | None = None, label_names=None) -> dict:
    """Convert ``input_path`` (format ``fmt``, one of `FORMATS`) into a data set at ``out_dir``.

    ``id_encoding``: ``"hash"`` (default: strings hashed with `hash_strings`, libSVM/libFM indices
    with `hash_ints`), ``"identity"`` (IDs are already rows, e.g. compact item IDs: no collisions;
    a table without a given size gets max ID + 1 rows), or ``"NAME=ENC,..."`` per feature. The
    manifest records each feature's encoding and the dense transform, and serving encodes by them.

    ``raw_ids``: write raw IDs, every sparse feature's unreduced 64-bit hashes (``identity``: the
    integers themselves, not checked against the table), with ``raw: true`` and the table size it
    would otherwise have reduced to in the schema; ``reduce_raw(raw, num_embeddings)`` gives the
    rows of the same conversion without it.

    ``num_labels`` K (Criteo formats): each row starts with K labels, 0 or 1, named ``label_names`` (a
    list or ``"a,b"``; default ``label``, ``conversion``, ``label_2``, ...); a label that is not 0 or 1
    makes a bad row. Other formats have one label (``label_names`` may rename it).

    ``cluster_by="session"`` writes each session's rows together within windows of
    ``cluster_window`` rows (`tierec.data.cluster`); ``"shuffle"`` permutes rows within them.

    Returns the manifest (also written to ``out_dir/manifest.json``).
    """
    if fmt not in FORMATS:
        raise TierecError(f"unknown format {fmt!r} (choose from {', '.join(FORMATS)})")
    if not 0.0 <= float(test_fraction) < 1.0:
        raise ConfigError(f"--test-fraction must be in [0, 1), got {test_fraction}")
    if int(rows_per_file) <= 0:
        raise ConfigError(f"--rows-per-file must be > 0, got {rows_per_file}")
    if int(row_group_size) <= 0:
        raise ConfigError(f"--row-group-size must be > 0, got {row_group_size}")
    reader = open_reader(input_path, fmt, num_embeddings=num_embeddings, table_sizes=table_sizes,
                         skip_bad_rows=skip_bad_rows, field_map=field_map, rating_threshold=rating_threshold,
                         max_rows=max_rows, block_size=block_size, progress=progress, id_encoding=id_encoding,
                         raw_ids=bool(raw_ids), num_labels=num_labels, label_names=label_names)
    out = Path(out_dir)
    prepare_output_dir(out)
    log.info("converting %s (%s, %d bytes) -> %s", reader.path, fmt, reader.path.stat().st_size, out)
    writer, split = open_writers(out, reader.schema, cluster_by, int(cluster_window), int(seed),
                                 rows_per_file=int(rows_per_file),
                                 row_group_size=min(int(row_group_size), int(rows_per_file)))
    for block in reader:
        is_test = is_test_row(block.lines, float(test_fraction), int(seed))
        split["train"].write(take_rows(block.chunk, ~is_test))
        split["test"].write(take_rows(block.chunk, is_test))
    for w in split.values():
        w.close()
    for f, n, auto in zip(writer.schema.sparse, reader.table_sizes(), reader.auto_size, strict=True):
        f.num_embeddings = n
        if auto:
            log.info("%s: identity IDs, table sized by the largest ID: %d rows", f.name, n)
    stats = reader.stats
    fm = getattr(reader, "field_map", None)
    options = {
        "test_fraction": float(test_fraction),
        "seed": int(seed),
        "skip_bad_rows": bool(skip_bad_rows),
        "max_rows": max_rows,
        "num_embeddings": num_embeddings if num_embeddings is not None else DEFAULT_NUM_EMBEDDINGS,
        "id_encoding": id_encoding if id_encoding is None or isinstance(id_encoding, (str, dict)) else str(id_encoding),
        "table_sizes": table_sizes if table_sizes is None or isinstance(table_sizes, (list, dict)) else str(table_sizes),
        "raw_ids": bool(raw_ids),
        "num_labels": reader.schema.num_tasks,
        "label_names": list(reader.schema.labels),
        "rows_per_file": int(rows_per_file),
        "row_group_size": int(row_group_size),
    }
    if fmt == "movielens":
        options["rating_threshold"] = float(rating_threshold)
    if fmt in ("libsvm", "libfm"):
        options["field_map"] = str(field_map) if isinstance(field_map, (str, os.PathLike)) else None
        options["field_map_resolved"] = None if fm is None else {
            "sparse": {n: {"keys": [list(r) for r in ranges], "side": side} for n, ranges, _, side in fm.sparse},
            "dense": {n: [list(r) for r in ranges] for n, ranges in fm.dense},
            "unmapped": fm.unmapped,
        }
    source = {
        "path": str(reader.path.resolve()),
        "format": fmt,
        "bytes": reader.path.stat().st_size,
        "rows_read": stats.rows_read,
        "bad_rows_skipped": stats.bad_rows,
        "bad_row_examples": stats.bad_row_examples,
        "split_rule": "test iff u(line number, seed) < test_fraction; u from splitmix64 (tierec.data.convert.is_test_row)",
        "options": options,
    }
    options["cluster_by"] = cluster_by
    if cluster_by != "none":
        options["cluster_window"] = int(cluster_window)
    clustering = clustering_record(cluster_by, cluster_window, seed)
    return writer.close(source=source, extra={"clustering": clustering} if clustering else None)
