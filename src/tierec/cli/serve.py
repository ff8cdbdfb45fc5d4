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
    "follow": "follow CHECKPOINT's training run: each new checkpoint's changed rows, dense weights and step are "
              "applied in place between batches (a chain of deltas: `tierec train --checkpoint-chain`), any "
              "other checkpoint is loaded beside and swapped in (docs/serving.md#live-row-updates)",
    "follow_every": "--follow: seconds between looks at the run's newest checkpoint",
    "follow_overlay_rows": "--follow with --tables ssd: rows published since the served files that are kept in "
                           "memory beside them; a publication that would pass it loads the checkpoint in full "
                           "(0: twice the cache's rows, at least 65,536)",
    "exit_head": "early exits: an exit head file of `tierec distill-exit` for CHECKPOINT; a /v1/predict sample whose "
                 "head confidence |p - 0.5| reaches --exit-threshold gets the head's score, the others the full "
                 "ranker's; answers say which (\"exit\") (docs/serving.md#early-exits-and-the-result-cache)",
    "exit_threshold": "--exit-head: confidence |p_head - 0.5| from which a sample exits, in [0, 1] (0: every "
                      "sample; above 0.5: none; not given: 0.45); `tierec distill-exit` prints AUC and FLOPs "
                      "per threshold",
    "result_cache_size": "samples whose /v1/predict answers are kept and served again without the model (keyed by "
                         "the encoded sample and the serving model's version; 0: no result cache)",
    "result_cache_ttl": "--result-cache-size: seconds a kept answer may be served",
    "result_cache_bytes": "--result-cache-size: most bytes the kept answers may take (estimate)",
    "dense_budget": "bytes of dense weights (MLPs, cross layers, experts) kept in memory, e.g. 64MiB; above it the large "
                    "layers live in a weight file on the SSD and are streamed in layer by layer while the layers "
                    "before them compute, with the same scores (0: every large layer streamed; default: all in "
                    "memory; docs/serving.md#dense-weights-off-device)",
    "dense_prefetch": "--dense-budget: layers read ahead of the one computing (0: each layer read when it is needed)",
    "dense_dir": "--dense-budget: directory of the weight file, on the SSD (default: the temp directory)",
    "dense_direct_io": "--dense-budget: read the weight file with O_DIRECT (--no-dense-direct-io: through the page "
                       "cache, which then holds the streamed layers in memory outside the budget)",
    "dense_verify": "--dense-budget: check every layer read from the weight file against its crc32",
}
TYPES = {"exit_threshold": float}  # flags whose ServeConfig default is None


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a checkpoint over HTTP: predict, recommend, metrics (docs/serving.md)")
    p.add_argument("checkpoint", help="ranker checkpoint (run directory or checkpoint directory), or a serving "
                                      "export (`tierec export`: tables as fp32/fp16/bf16/int8/int4 rows); a sasrec "
                                      "checkpoint serves /v1/recommend for a history (docs/serving.md)")
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
            kind = TYPES.get(f.name) or (type(default) if default is not None else str)
            p.add_argument(flag, type=kind, default=None, help=h)
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
