"""Serving an export (`tierec export`, `tierec.inference.export`): tables in their row dtype, in DRAM or on SSD.

`load_export` builds the same `LoadedModel` as a checkpoint's (`tierec.inference.model_store.load_model`
calls it for an export directory), with the rows kept as stored and decoded after the gather
(`tierec.storage.quantized.RowCodec`, vectorised over the batch's unique rows):

- ``tables="ssd"``: the export's row files opened read-only as `SsdTable` s of ``codec.words`` columns
  behind the one `SharedCache`, which holds the rows as stored (an int8 row of dim 64 takes 72 bytes
  instead of 256: 3.6x the rows in the same bytes) and decodes after its gather;
- ``tables="dram"``: every table's stored rows end to end in one tensor [R, words]; `FusedLookup` gathers a
  batch's unique rows and decodes them (a DLRM / DCNv2), other models' tables read through a
  `QuantizedMemoryView` each.

Scores equal those of the float32 model whose tables hold the decoded rows (tests/test_export.py); how far
they are from the checkpoint's own is the quantization's price (docs/serving.md, "Quantized rows").
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from pathlib import Path

import torch

from tierec.data.dataset import Schema
from tierec.errors import CheckpointError
from tierec.inference.export import MODELS, read_export_manifest
from tierec.inference.model_store import (
    FusedLookup,
    LoadedModel,
    ServeOptions,
    SharedCache,
    SsdView,
    hottest_rows,
)
from tierec.storage.base import WorkingSet
from tierec.storage.quantized import RowCodec, open_row_file, read_row_file
from tierec.storage.rowspace import RowSpace

log = logging.getLogger(__name__)


class QuantizedMemoryView:
    """One table's read-only `TableStorage` over the stored rows of all tables in DRAM (``weight`` [R, words],
    this table's rows from ``offset``): ``acquire`` gathers and decodes the asked rows."""

    def __init__(self, weight: torch.Tensor, codec: RowCodec, offset: int, num_embeddings: int):
        self.weight, self.codec, self.offset = weight, codec, int(offset)
        self.num_embeddings, self.dim, self.state_dim = int(num_embeddings), codec.dim, 0
        self.device = torch.device("cpu")

    def _rows(self, ids: torch.Tensor) -> torch.Tensor:
        return self.codec.decode(self.weight.index_select(0, ids + self.offset))

    def acquire(self, ids: torch.Tensor) -> WorkingSet:
        return WorkingSet(ids, torch.arange(ids.numel()), self._rows(ids), torch.empty(ids.numel(), 0))

    def release(self, ws: WorkingSet, dirty: bool) -> None:
        if dirty:
            raise RuntimeError("serving tables are read-only")

    def read(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._rows(ids), torch.empty(ids.numel(), 0)

    def write(self, ids, weight, state) -> None:
        raise RuntimeError("serving tables are read-only")

    def read_rows(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._rows(torch.arange(start, end)), torch.empty(end - start, 0)

    def write_rows(self, start, weight, state) -> None:
        raise RuntimeError("serving tables are read-only")

    def flush(self) -> None:
        pass

    def lazy_rows(self):
        return None


def row_format(loaded: LoadedModel) -> tuple[str, int]:
    """(row dtype, bytes per stored row) of a served model's tables: an export's, or a checkpoint's fp32 weights."""
    m = loaded.manifest
    if m.get("format") == "tierec-export":
        return str(m["row_dtype"]), int(m["tables"][0]["row_bytes"]) if m["tables"] else 0
    dim = int(m["config"].get("embedding_dim", 0)) if isinstance(m.get("config"), dict) else 0
    return "fp32", 4 * dim


def load_export(path: Path, options: ServeOptions | None = None, pool=None) -> LoadedModel:
    """Export directory ``path`` -> `LoadedModel` in eval mode, on CPU (module doc). Every file is checked
    against the manifest as it is read (``options.verify=False``: the row files' sizes only); a mismatch is
    a one-line `CheckpointError` naming the file and chunk."""
    from tierec.train import checkpoint as ckpt
    from tierec.train.config import TrainConfig
    from tierec.train.trainer import build_model

    opt = options or ServeOptions()
    m = read_export_manifest(path)
    try:
        cfg = TrainConfig(**m["config"])
    except TypeError as e:
        raise CheckpointError(f"{path}/export.json: its config does not fit this tierec ({e})") from None
    if cfg.model not in MODELS:
        raise CheckpointError(f"{path}/export.json: model {cfg.model!r} is not servable from an export")
    schema = Schema.from_json(m["schema"])
    maps = cfg.id_maps(schema, spill_root=Path(tempfile.gettempdir()) / "tierec")
    dense = ckpt.load_dense_state(path, m)  # size, sha256, weights_only=True
    if maps.index is not None:  # dynamic tables: their ID index, as the checkpoint saved it (`export` module doc)
        maps.load_state_dict(ckpt.attach_arrays(path, m, dense.get("id_maps") or {}), int(m["step"]))
    id_maps = maps if maps.active else None
    by_name = {t["name"]: t for t in m["tables"]}
    entries = []
    for f in schema.sparse:
        t = by_name.get(f.name)
        if t is None or t.get("file") not in m["files"]:
            raise CheckpointError(f"{path}: export has no row file for table {f.name!r}")
        if int(t["dim"]) != cfg.embedding_dim:
            raise CheckpointError(f"{path}: table {f.name!r} has dim {t['dim']}, the config {cfg.embedding_dim}")
        entries.append(t)
    codec = RowCodec(m["row_dtype"], cfg.embedding_dim)
    sizes = [int(t["num_embeddings"]) for t in entries]
    space = RowSpace(sizes)
    shared, weight = None, None
    if opt.tables == "ssd":
        from tierec.malloc import limit_malloc_retention

        limit_malloc_retention()
        ssds = []
        try:
            for t, n in zip(entries, sizes, strict=True):
                ssds.append(open_row_file(path / t["file"], m["files"][t["file"]], codec, n, verify=opt.verify,
                                          direct_io=opt.direct_io))
        except BaseException:
            for s in ssds:
                s.close()
            raise
        capacity = max(1, math.ceil(opt.cache_fraction * space.num_rows))
        freq = hottest_rows(opt.data or m["config"].get("data"), schema, opt.warm_rows, capacity) \
            if id_maps is None else None
        shared = SharedCache(ssds, capacity, opt.admit_after, freq, pool, lanes=opt.io_lanes, codec=codec)

        def factory(i, tcfg, state_dim):
            return SsdView(shared, i, tcfg.num_embeddings, tcfg.key)
    else:
        weight = torch.empty(space.num_rows, codec.words)
        for i, (t, n) in enumerate(zip(entries, sizes, strict=True)):
            read_row_file(path / t["file"], m["files"][t["file"]], codec, n, weight[space.offset(i) : space.offset(i + 1)])
        w = weight

        def factory(i, tcfg, state_dim):
            return QuantizedMemoryView(w, codec, space.offset(i), tcfg.num_embeddings)

    try:
        model = build_model(cfg, schema, torch.device("cpu"), storage_factory=factory)
        model.load_state_dict(dense["model"])
    except BaseException:
        if shared is not None:
            shared.close()
        raise
    model.eval()
    lookup = None
    if cfg.model in ("dlrm", "dcnv2"):
        tables = model.embeddings.bags
        lookup = FusedLookup([tb.config.key for tb in tables], [tb.config.num_embeddings for tb in tables],
                             [tb.config.pooling == "mean" for tb in tables], cfg.embedding_dim, weight, shared,
                             codec=codec)
    log.info("loaded %s export %s (step %d, rows %s, %d B per row), tables in %s%s", cfg.model, path, m["step"],
             codec.dtype, codec.row_bytes, opt.tables,
             f" behind a {shared.cache.capacity:,}-row cache" if shared else "")
    return LoadedModel(model, cfg.model, schema, Path(os.path.abspath(path)), int(m["step"]), m, opt, shared,
                       lookup, id_maps)

