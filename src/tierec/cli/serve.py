"""`tierec serve RANKER [--retriever TWO_TOWER] ...`: the HTTP inference server (docs/serving.md)."""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import fields

from tierec.config import from_dict
from tierec.inference.service import ServeConfig, build_server

log = logging.getLogger(__name__)

HELP = {
    "retriever": "two-tower checkpoint (`tierec train --model two-tower`) whose item vectors are indexed for "
                 "/v1/recommend; candidates are ranked by CHECKPOINT",
    "host": "address to listen on: loopback only (127.0.0.0/8, ::1, localhost) unless --allow-remote",
    "port": "TCP port (0: any free port)",
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
    "allow_remote": "let --host be a non-loopback address: the server is then reachable from the network "
                    "(plain HTTP, no TLS: put a proxy in front)",
    "max_body_bytes": "largest request body in bytes; a larger one gets 413 before it is read (1 MiB holds "
                      "256 samples of 40 features at ~100 bytes of JSON each)",
    "max_id_bytes": "longest string ID in UTF-8 bytes (longer: 422)",
    "admin": "enable POST /v1/admin/reload (without it the route does not exist); it needs a bearer token",
    "admin_token_file": "file holding the admin bearer token (default: the TIEREC_ADMIN_TOKEN environment "
                        "variable); at least 16 printable ASCII characters, e.g. `openssl rand -hex 32`",
    "admin_root": "directory /v1/admin/reload may load checkpoints from, symlinks resolved; repeatable "
                  "(default: the run directories of CHECKPOINT and --retriever)",
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
        h = HELP.get(f.name, "") + ("" if isinstance(default, list) else f" (default: {default})")
        if isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=h)
        elif isinstance(default, list):
            p.add_argument(flag, action="append", default=None, metavar="DIR", help=h)
        elif f.name == "tables":
            p.add_argument(flag, choices=["ssd", "dram"], default=None, help=h)
        else:
            p.add_argument(flag, type=type(default) if default is not None else str, default=None, help=h)
    p.set_defaults(func=_serve)


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
