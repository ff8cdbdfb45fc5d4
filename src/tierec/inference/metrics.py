"""The server's Prometheus metrics: `ServingMetrics` owns the registry that ``GET /metrics`` renders.

Recorded as they happen: requests (by route and status), their latency, samples per model call,
samples scored, the time of each ranker call and of its reads from the table files. Collected at
scrape time (`StatsCollector`): the serving tables' cache and SSD counters, the models' training
steps, reloads, energy and CPU time; plus the process metrics of prometheus_client.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.process_collector import ProcessCollector

from tierec import energy
from tierec.inference.dense_stream import DenseStreamCollector
from tierec.inference.model_store import ModelStore
from tierec.inference.quantized import row_format

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
STAGE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


class ServingMetrics:
    """The registry of one server over ``store``, and the energy meter counting its samples
    (`start` / `stop` with the server)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, store: ModelStore):
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("tierec_requests", "HTTP requests", ["endpoint", "code"], registry=registry)
        self.latency = Histogram("tierec_request_seconds", "request latency (s)", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=registry)
        self.batch_size = Histogram("tierec_batch_size", "samples per model call", buckets=BATCH_BUCKETS,
                                    registry=registry)
        self.samples = Counter("tierec_samples", "samples scored", registry=registry)
        self.model_time = Histogram("tierec_model_seconds", "time of one ranker call (one batch), table reads "
                                    "included (s)", buckets=STAGE_BUCKETS, registry=registry)
        self.read_time = Histogram("tierec_ssd_read_seconds", "time one ranker batch waited on reads of missed rows "
                                   "from the table files (s; 0 when every row was cached)", buckets=STAGE_BUCKETS,
                                   registry=registry)
        self.live_updates = Counter("tierec_live_updates", "training checkpoints brought in by --follow: delta "
                                    "(changed rows applied in place) or reload (loaded in full, swapped)", ["kind"],
                                    registry=registry)
        self.live_rows = Counter("tierec_live_rows", "rows applied in place by --follow", registry=registry)
        self.live_lag = Histogram("tierec_live_lag_seconds", "--follow: seconds from a checkpoint's writing in "
                                  "training to its rows serving", buckets=LATENCY_BUCKETS + (10.0, 30.0, 60.0),
                                  registry=registry)
        ProcessCollector(registry=registry)
        self.meter = energy.meter(work_unit="samples")
        registry.register(StatsCollector(store, self.meter))
        registry.register(DenseStreamCollector(store))  # --dense-budget: streamed dense layers

    def start(self) -> None:
        self.meter.start()

    def stop(self) -> None:
        self.meter.stop()

    def request(self, route: str, status: int, seconds: float) -> None:
        """One answered request; ``route``: the path of a known route, or "other"."""
        self.latency.labels(route).observe(seconds)
        self.requests.labels(route, str(status)).inc()

    def batch(self, n: int) -> None:
        """One model call over ``n`` samples (a predict batch, or a recommend request's candidates)."""
        self.batch_size.observe(n)
        self.samples.inc(n)
        self.meter.add_work(n)

    def ranker_call(self, seconds: float, read_s: float | None) -> None:
        """One ranker batch took ``seconds``, ``read_s`` of them waiting on table files (None: tables in DRAM)."""
        self.model_time.observe(seconds)
        if read_s is not None:
            self.read_time.observe(read_s)

    def live_update(self, kind: str, rows: int, lag_s: float | None) -> None:
        """--follow brought in a checkpoint (``kind`` "delta" or "reload"), ``rows`` applied in place."""
        self.live_updates.labels(kind).inc()
        self.live_rows.inc(rows)
        if lag_s is not None:
            self.live_lag.observe(max(0.0, lag_s))

    def render(self) -> bytes:
        """The registry in the Prometheus text format (`content_type`)."""
        return generate_latest(self.registry)


class StatsCollector:
    """Scrape-time metrics: cache and SSD counters of the serving tables, model steps, energy."""

    def __init__(self, store: ModelStore, meter):
        self.store, self.meter = store, meter

    def _dynamic_tables(self):
        """Per dynamic table of the ranker: rows live in the served index and its training counters, and the
        served lookups that found no row (an unknown or evicted ID: the default row)."""
        dyn = self.store.ranker.table_stats().get("dynamic")
        if not dyn:
            return
        rows = GaugeMetricFamily("tierec_dynamic_rows", "rows of a dynamic table: live, and its capacity",
                                 labels=["table", "kind"])
        counts = CounterMetricFamily("tierec_dynamic_ids", "IDs of a dynamic table in training (admitted, evicted, "
                                     "rejected) and served lookups without a row (default_reads)",
                                     labels=["table", "kind"])
        for table, st in dyn.items():
            for k in ("live", "capacity"):
                rows.add_metric([table, k], st[k])
            for k in ("admitted", "evicted", "rejected", "default_reads"):
                counts.add_metric([table, k], st.get(k, 0))
        yield rows
        yield counts

    def collect(self):
        r = self.store.retriever
        stats = {"ranker": self.store.ranker.table_stats().get("ssd")}
        if r is not None:
            stats["retriever"] = r.loaded.table_stats().get("ssd")
        stats = {k: v for k, v in stats.items() if v is not None}
        model = ["model"]
        fams = {
            "lookups": CounterMetricFamily("tierec_cache_lookups", "unique IDs looked up in the DRAM caches",
                                           labels=model),
            "hits": CounterMetricFamily("tierec_cache_hits", "lookups served from the DRAM cache", labels=model),
            "admitted": CounterMetricFamily("tierec_cache_admitted", "rows admitted to the cache after warm-up",
                                            labels=model),
            "bytes_read": CounterMetricFamily("tierec_ssd_read_bytes", "bytes read from the SSD table files",
                                              labels=model),
            "resident": GaugeMetricFamily("tierec_cache_resident_rows", "rows in the DRAM cache", labels=model),
            "capacity": GaugeMetricFamily("tierec_cache_capacity_rows", "rows the DRAM cache holds at most",
                                          labels=model),
            "cache_bytes": GaugeMetricFamily("tierec_cache_bytes", "bytes of the DRAM cache: rows as stored, index, "
                                             "admission sketch", labels=model),
        }
        for name, s in stats.items():
            for k, fam in fams.items():
                fam.add_metric([name], s[k])
        yield from fams.values()
        lookups = sum(s["lookups"] for s in stats.values())
        hit = GaugeMetricFamily("tierec_cache_hit_ratio", "hits / lookups over all cached tables (NaN: none)")
        hit.add_metric([], sum(s["hits"] for s in stats.values()) / lookups if lookups else float("nan"))
        yield hit
        yield from self._dynamic_tables()
        step = GaugeMetricFamily("tierec_model_step", "training step of the serving checkpoint", labels=["model"])
        step.add_metric(["ranker"], self.store.ranker.step)
        if r is not None:
            step.add_metric(["retriever"], r.loaded.step)
        yield step
        rows = GaugeMetricFamily("tierec_row_bytes", "bytes per stored table row of the serving model, by its row "
                                 "dtype (fp32: a checkpoint's weights; fp16, bf16, int8, int4: an export's)",
                                 labels=["model", "row_dtype"])
        for name, lm in (("ranker", self.store.ranker), ("retriever", r.loaded if r is not None else None)):
            if lm is not None:
                dtype, nbytes = row_format(lm)
                rows.add_metric([name, dtype], nbytes)
        yield rows
        rel = CounterMetricFamily("tierec_reloads", "checkpoint swaps")
        rel.add_metric([], self.store.reloads)
        yield rel
        if self.meter is not None and self.meter.running:
            rep = self.meter.snapshot()
            e = CounterMetricFamily("tierec_energy_joules", "energy since start (measured or estimated, see "
                                    "tierec_energy_measured)", labels=["component"])
            for c in rep.components:
                e.add_metric([c.name], c.joules)
            yield e
            m = GaugeMetricFamily("tierec_energy_measured", "1 if every energy component is measured by a counter")
            m.add_metric([], float(rep.measured))
            yield m
            cpu = CounterMetricFamily("tierec_cpu_seconds", "CPU seconds of the server process")
            cpu.add_metric([], rep.cpu_s)
            yield cpu
