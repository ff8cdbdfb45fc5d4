"""The serving service: `ServeConfig` (every knob of `tierec serve`) and `build_server` (models -> app).

Trust defaults: the server listens on loopback only (`--host` elsewhere needs `--allow-remote`),
request bodies are capped (`--max-body-bytes`) and so are string IDs (`--max-id-bytes`), and the
admin route (`/v1/admin/reload`) exists only with `--admin`, behind a bearer token read at start
(`--admin-token-file` or ``TIEREC_ADMIN_TOKEN``) and confined to the `--admin-root` directories
(default: the run directories of the startup checkpoints).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

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
    allow_remote: bool = False  # a --host that is not loopback is refused without it
    max_body_bytes: int = 1 << 20  # 1 MiB: a full batch of Criteo-like samples is ~200 KB of JSON
    max_id_bytes: int = 256  # Criteo's IDs are 8 hex digits
    admin: bool = False  # /v1/admin/reload exists only with it
    admin_token_file: str | None = None  # default: $TIEREC_ADMIN_TOKEN
    admin_root: list[str] = field(default_factory=list)  # default: the run dirs of checkpoint and retriever
    follow: bool = False  # apply the run's new checkpoints as training writes them (tierec.inference.live)
    follow_every: float = 2.0  # seconds between looks at the run's LATEST
    follow_overlay_rows: int = 0  # --follow, ssd: rows kept beside the files before a full load (0: 2 x cache)
    exit_head: str | None = None  # early exits: a head file of `tierec distill-exit` (tierec.inference.cascade)
    exit_threshold: float | None = None  # a sample exits when |p_head - 0.5| >= this (default 0.45 with a head)
    result_cache_size: int = 0  # samples' answers kept (0: no result cache; tierec.inference.result_cache)
    result_cache_ttl: float = 60.0  # seconds an answer may be served from the result cache
    result_cache_bytes: int = 64 << 20  # bound of the result cache in bytes (estimate)
    dense_budget: str | None = None  # bytes of dense weights kept in memory, the rest streamed (None: all in memory)
    dense_prefetch: int = 2  # --dense-budget: layers read ahead of the one computing (0: none)
    dense_dir: str | None = None  # --dense-budget: directory of the weight file (default: the temp directory)
    dense_direct_io: bool = True  # --dense-budget: O_DIRECT reads of the weight file (else the page cache)
    dense_verify: bool = True  # --dense-budget: check every layer read against its crc32

    def __post_init__(self):
        from tierec.errors import ConfigError

        for name in ("max_batch", "max_ids", "threads", "io_threads", "corpus_rows", "max_body_bytes", "max_id_bytes"):
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
        if not self.allow_remote and not is_loopback(self.host):
            raise ConfigError(f"--host {self.host!r} is not a loopback address (127.0.0.0/8, ::1, localhost): the "
                              "server would be reachable from the network; pass --allow-remote to listen there anyway")
        if not self.follow_every > 0:
            raise ConfigError(f"follow_every must be > 0 seconds, got {self.follow_every}")
        if self.follow and self.retriever:
            raise ConfigError("--follow updates the ranker only; serve a --retriever without it")
        if not self.admin and (self.admin_token_file or self.admin_root):
            raise ConfigError("--admin-token-file and --admin-root need --admin (the admin route is off without it)")
        self._check_early_answers()
        self.dense_settings()  # --dense-* flags: checked at the edge

    def dense_settings(self):
        """`DenseSettings` of ``--dense-budget`` (None: all dense weights in memory); ConfigError for bad values."""
        from tierec.config import parse_bytes
        from tierec.errors import ConfigError
        from tierec.inference.dense_stream import DenseSettings

        if self.dense_budget is None:
            if self.dense_dir is not None or self.dense_prefetch != 2:
                raise ConfigError("--dense-prefetch and --dense-dir need --dense-budget")
            return None
        text = str(self.dense_budget).strip()
        budget = 0 if text in ("0", "0B", "0b") else parse_bytes(text, "--dense-budget")
        if self.dense_dir is not None and not os.path.isdir(self.dense_dir):
            raise ConfigError(f"--dense-dir {self.dense_dir}: not a directory")
        return DenseSettings(budget, self.dense_prefetch, self.dense_dir, self.dense_direct_io, self.dense_verify)

    def _check_early_answers(self) -> None:
        """--exit-head / --exit-threshold and the --result-cache-* flags (docs/serving.md, early exits)."""
        from tierec.errors import ConfigError

        if self.exit_threshold is not None and not self.exit_head:
            raise ConfigError("--exit-threshold needs --exit-head (a head file of `tierec distill-exit`)")
        if self.exit_threshold is not None and not 0 <= self.exit_threshold <= 1:
            raise ConfigError(f"--exit-threshold must be in [0, 1] (0: every sample exits; above 0.5: none), got "
                              f"{self.exit_threshold}")
        if self.result_cache_size < 0:
            raise ConfigError(f"--result-cache-size must be >= 0 (0: no result cache), got {self.result_cache_size}")
        if not self.result_cache_ttl > 0:
            raise ConfigError(f"--result-cache-ttl must be > 0 seconds, got {self.result_cache_ttl}")
        if self.result_cache_bytes < 1024:
            raise ConfigError(f"--result-cache-bytes must be >= 1024, got {self.result_cache_bytes}")


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or "localhost"; anything else (0.0.0.0, "", a host name) counts as remote."""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def admin_token(cfg: ServeConfig) -> bytes:
    """The admin bearer token: ``--admin-token-file``, else ``TIEREC_ADMIN_TOKEN``; ConfigError if none."""
    from tierec.errors import ConfigError

    where = f"--admin-token-file {cfg.admin_token_file}" if cfg.admin_token_file else "TIEREC_ADMIN_TOKEN"
    try:
        text = Path(cfg.admin_token_file).read_text("utf-8") if cfg.admin_token_file else os.environ.get(
            "TIEREC_ADMIN_TOKEN", "")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{where}: cannot read the admin token ({getattr(e, 'strerror', None) or e})") from None
    token = text.strip()
    if not token:
        raise ConfigError("--admin needs a bearer token: --admin-token-file FILE or the TIEREC_ADMIN_TOKEN "
                          f"environment variable ({where} is empty or unset)")
    if not re.fullmatch(r"[\x21-\x7e]{16,}", token):
        raise ConfigError(f"{where}: the admin token must be at least 16 printable ASCII characters without "
                          "spaces (e.g. `openssl rand -hex 32`)")
    return token.encode("ascii")


def run_dir_of(path: str) -> Path:
    """The run directory of a checkpoint path (the directory that holds ``checkpoints/``; for a bare
    ``step-N``, its parent)."""
    from tierec.train.checkpoint import resolve_checkpoint

    step = Path(os.path.realpath(resolve_checkpoint(path)))
    return step.parent.parent if step.parent.name == "checkpoints" else step.parent


def admin_roots(cfg: ServeConfig) -> list[str]:
    """Where reloads may read: ``--admin-root`` dirs, else the run directory of the startup checkpoint
    and of the retriever (the directory that holds ``checkpoints/``; for a bare ``step-N``, its parent)."""
    from tierec.errors import ConfigError

    for r in cfg.admin_root:
        if not os.path.isdir(r):
            raise ConfigError(f"--admin-root {r}: not a directory")
    if cfg.admin_root:
        return [os.path.realpath(r) for r in cfg.admin_root]
    return [str(run_dir_of(path)) for path in filter(None, (cfg.checkpoint, cfg.retriever))]


def build_server(cfg: ServeConfig):
    """Load the models and build the app (used by `tierec serve`, tests and the benchmark)."""
    from tierec.inference.model_store import ModelStore, ServeOptions, load_model
    from tierec.inference.retrieval import HnswParams, Retriever
    from tierec.inference.server import AdminSettings, FollowSettings, ServerSettings, create_app

    token, roots = (admin_token(cfg), admin_roots(cfg)) if cfg.admin else (b"", [])
    if not is_loopback(cfg.host):
        log.warning("--allow-remote: listening on %s, the server is reachable from the network (plain HTTP)%s",
                    cfg.host, "; the admin token travels in clear text" if cfg.admin else "")
    if cfg.follow:
        from tierec.errors import ConfigError
        from tierec.inference.export import is_export

        if is_export(cfg.checkpoint):
            raise ConfigError(f"--follow {cfg.checkpoint}: a serving export does not change; follow the training "
                              "run's directory instead")
    head = None
    if cfg.exit_head:  # checked before the models load: a bad file fails at once
        from tierec.inference.cascade import load_exit_head

        head = load_exit_head(cfg.exit_head)
    io_pool = ThreadPoolExecutor(cfg.io_threads, thread_name_prefix="tierec-io")

    opts = ServeOptions(tables=cfg.tables, cache_fraction=cfg.cache_fraction, admit_after=cfg.admit_after,
                        warm_rows=cfg.warm_rows, direct_io=cfg.direct_io, verify=cfg.verify, data=cfg.data,
                        io_lanes=cfg.io_threads, overlay_rows=cfg.follow_overlay_rows, dense=cfg.dense_settings())
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
    settings = ServerSettings(max_batch=cfg.max_batch, max_wait_ms=cfg.max_wait_ms, max_ids=cfg.max_ids,
                              max_body_bytes=cfg.max_body_bytes, max_id_bytes=cfg.max_id_bytes)
    admin = None
    if cfg.admin:
        admin = AdminSettings(token, roots, reload)
        log.info("admin API on: /v1/admin/reload may load checkpoints under %s", ", ".join(roots))
    follow = None
    if cfg.follow:
        from tierec.train.trainer import load_id_maps

        run = run_dir_of(cfg.checkpoint)
        schema = store.ranker.schema
        raw = store.ranker.id_maps is not None
        follow = FollowSettings(run, cfg.follow_every, lambda path: load_model(str(path), opts, io_pool),
                                (lambda path: load_id_maps(str(path), schema)) if raw else None)
        log.info("--follow: applying %s's new checkpoints as they come (every %.1f s)", run, cfg.follow_every)
    cascade, results = early_answers(cfg, head, store)
    return create_app(store, settings, admin, threads=cfg.threads, follow=follow, cascade=cascade, results=results)


def early_answers(cfg: ServeConfig, head, store):
    """The `Cascade` of ``--exit-head`` (``head``: loaded beforehand) and the `ResultCache` of
    ``--result-cache-size``, each None when off; ConfigError where the serving model cannot use them."""
    from tierec.errors import ConfigError
    from tierec.inference.cascade import Cascade
    from tierec.inference.result_cache import ResultCache

    if store.ranker.sequence is not None and (head is not None or cfg.result_cache_size):
        raise ConfigError("--exit-head and --result-cache-size apply to /v1/predict; a sasrec checkpoint serves "
                          "/v1/recommend only")
    cascade = None
    if head is not None:
        t = 0.45 if cfg.exit_threshold is None else cfg.exit_threshold
        cascade = Cascade(head, t)
        cascade.check(store.ranker, f"--exit-head {cfg.exit_head}")
        log.info("early exits: %s, a sample exits when |p_head - 0.5| >= %g", cfg.exit_head, t)
    results = None
    if cfg.result_cache_size:
        results = ResultCache(cfg.result_cache_size, cfg.result_cache_ttl, cfg.result_cache_bytes)
        log.info("result cache: %d samples, %s bytes at most, answers kept %g s", cfg.result_cache_size,
                 f"{cfg.result_cache_bytes:,}", cfg.result_cache_ttl)
    return cascade, results
