"""`tierec serve RANKER [--retriever TWO_TOWER] ...`: the HTTP inference server (docs/serving.md)."""

from __future__ import annotations

import argparse
import logging
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields

from tierec.config import from_dict

log = logging.getLogger(__name__)


@dataclass
class ServeConfig:
    """Every knob of `tierec serve`, validated at the edge (`from_dict`)."""

    checkpoint: str = ""  # ranker (DLRM, or any tierec checkpoint): scores /v1/predict and ranks candidates
    retriever: str | None = None  # two-tower checkpoint: item index for /v1/recommend
    host: str = "127.0.0.1"
    port: int = 8000
    tables: str = "ssd"  # "ssd": read-only from the checkpoint's table files behind a DRAM cache; "dram"
    cache_fraction: float = 0.05
    admit_after: int = 2
    warm_rows: int = 262144
    direct_io: bool = False
    verify: bool = True
    data: str | None = None
    max_batch: int = 256
    max_wait_ms: float = 2.0
    max_ids: int = 256
    threads: int = 1
    io_threads: int = 8
    corpus_rows: int = 100_000
    index_dir: str | None = None
    index_on_disk: bool = False
    hnsw_m: int = 32
    ef_construction: int = 200
    ef_search: int = 512
    switch_interval_ms: float = 0.5

    def __post_init__(self):
        from tierec.errors import ConfigError

        for name in ("max_batch", "max_ids", "threads", "io_threads", "corpus_rows"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.switch_interval_ms <= 0:
            raise ConfigError(f"switch_interval_ms must be > 0, got {self.switch_interval_ms}")
        if self.max_wait_ms < 0:
            raise ConfigError(f"max_wait_ms must be >= 0, got {self.max_wait_ms}")
        if not 0 <= self.port < 65536:
            raise ConfigError(f"port must be in [0, 65536), got {self.port}")
        if self.index_on_disk and not self.index_dir:
            raise ConfigError("--index-on-disk needs --index-dir (where the index file is written and mapped from)")


HELP = {
    "retriever": "two-tower checkpoint (`tierec train --model two-tower`) whose item vectors are indexed for "
                 "/v1/recommend; candidates are ranked by CHECKPOINT",
    "host": "address to listen on", "port": "TCP port (0: any free port)",
    "tables": "ssd: tables read-only from the checkpoint's files behind a DRAM cache; dram: all in memory",
    "cache_fraction": "ssd: DRAM cache rows per table, as a fraction of its rows",
    "admit_after": "ssd: a missed row enters the cache from its N-th sighting (1: every miss)",
    "warm_rows": "ssd: training rows counted to rank rows by frequency and warm the caches (0: none)",
    "direct_io": "ssd: read table files with O_DIRECT (no page cache)",
    "verify": "check the table files' sha256 against the checkpoint manifest at load",
    "data": "data set for cache warm-up and the item corpus (default: the one the checkpoint was trained on)",
    "max_batch": "most samples per model call and per /v1/predict request",
    "max_wait_ms": "longest a request waits for others to join its batch (ms)",
    "max_ids": "most IDs per sparse feature per sample",
    "threads": "torch intra-op threads of the model thread",
    "io_threads": "ssd: concurrent reads of one batch's misses (table files; O_DIRECT reads are planned together)",
    "corpus_rows": "retrieval: training rows whose distinct item-side feature tuples form the item corpus",
    "index_dir": "retrieval: directory for the HNSW index file",
    "index_on_disk": "retrieval: memory-map the index file instead of holding it in the heap",
    "hnsw_m": "HNSW graph degree M", "ef_construction": "HNSW efConstruction", "ef_search": "HNSW efSearch",
    "switch_interval_ms": "Python's GIL switch interval (ms; CPython's default is 5): the longest the model thread "
                          "waits, after each read or kernel, while the event loop thread parses a request",
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a checkpoint over HTTP: predict, recommend, metrics (docs/serving.md)")
    p.add_argument("checkpoint", help="ranker checkpoint (run directory or checkpoint directory)")
    d = ServeConfig()
    for f in fields(ServeConfig):
        if f.name == "checkpoint":
            continue
        flag = "--" + f.name.replace("_", "-")
        default = getattr(d, f.name)
        h = HELP.get(f.name, "") + f" (default: {default})"
        if isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=h)
        elif f.name == "tables":
            p.add_argument(flag, choices=["ssd", "dram"], default=None, help=h)
        else:
            p.add_argument(flag, type=type(default) if default is not None else str, default=None, help=h)
    p.set_defaults(func=_serve)


def build_server(cfg: ServeConfig):
    """Load the models and build the app (used by `tierec serve`, tests and the benchmark)."""
    from tierec.inference.model_store import ModelStore, ServeOptions, load_model
    from tierec.inference.retrieval import HnswParams, Retriever
    from tierec.inference.server import ServerSettings, create_app

    io_pool = ThreadPoolExecutor(cfg.io_threads, thread_name_prefix="tierec-io")

    opts = ServeOptions(tables=cfg.tables, cache_fraction=cfg.cache_fraction, admit_after=cfg.admit_after,
                        warm_rows=cfg.warm_rows, direct_io=cfg.direct_io, verify=cfg.verify, data=cfg.data,
                        io_lanes=cfg.io_threads)
    params = HnswParams(cfg.hnsw_m, cfg.ef_construction, cfg.ef_search)

    def load_retriever(path: str):
        loaded = load_model(path, opts, io_pool)
        return Retriever.build(loaded, params, cfg.corpus_rows, cfg.index_dir, cfg.index_on_disk, cfg.data)

    def reload(checkpoint: str | None, retriever: str | None):
        ranker = load_model(checkpoint or cfg.checkpoint, opts, io_pool)
        return ranker, load_retriever(retriever) if retriever else None

    store = ModelStore(load_model(cfg.checkpoint, opts, io_pool), load_retriever(cfg.retriever) if cfg.retriever else None)
    if store.retriever is not None and store.retriever.loaded.schema.to_json() != store.ranker.schema.to_json():
        from tierec.errors import ConfigError

        raise ConfigError(f"--retriever {cfg.retriever}: trained on a different schema than {cfg.checkpoint}; "
                          "ranker and retriever must share the data set's features")
    settings = ServerSettings(max_batch=cfg.max_batch, max_wait_ms=cfg.max_wait_ms, max_ids=cfg.max_ids)
    return create_app(store, settings, reload, threads=cfg.threads)


def _serve(args) -> int:
    import torch
    import uvicorn

    values = {f.name: getattr(args, f.name) for f in fields(ServeConfig)}
    cfg = from_dict(ServeConfig, {k: v for k, v in values.items() if v is not None}, "flags")
    torch.set_num_threads(cfg.threads)
    # The model thread gives up the GIL in every read and kernel and must take it back from the event loop
    # thread, which may be parsing a request: at CPython's 5 ms switch interval one request's arrival could
    # add up to 5 ms per kernel to the batch running beside it.
    sys.setswitchinterval(cfg.switch_interval_ms / 1000)
    app = build_server(cfg)
    log.info("serving on http://%s:%d (OpenAPI: /docs)", cfg.host, cfg.port)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning")
    return 0
