"""Dense weights off-device: a served model's large dense layers kept in a weight file and streamed in layer
by layer, read ahead while the layers before them compute (`tierec serve --dense-budget BYTES`).

DeepSpeed-Inference serves models larger than device memory by keeping their weights in CPU memory or on
NVMe and streaming them to the device layer by layer ("heterogeneous inference", ZeRO-Inference). Here the
"device" is the serving process's memory for dense weights, bounded by ``--dense-budget``, and the tier
below it is a weight file on the SSD (read with O_DIRECT, so the OS page cache does not hold the weights
in its stead; or through the page cache, `--no-dense-direct-io`).

- **Layers** (`dense_layers`): every ``nn.Linear`` of the model outside its embeddings (bottom and top MLPs,
  a DCNv2's deep MLP, a mixture of experts' experts, gates and towers, a two-tower's towers) and every layer
  of a `CrossNetV2` (W_l or U_l, V_l, and b_l), in the order the modules are registered.
- **Plan** (`plan_layers`): when the model's dense bytes (every parameter outside the embeddings) exceed the
  budget, layers under 64 KiB and parameters outside any layer stay in memory; the ring's buffers take
  ``(depth + 1) x`` the largest streamed layer; the rest of the budget keeps whole layers resident, the
  earliest first (each as large as fits; a layer that does not fit is streamed and the next ones tried).
- **Weight file** (`tierec.storage.weightfile.WeightFile`): each streamed layer is one block (its tensors'
  float32 bytes, 64-byte aligned, the block page-aligned) with a crc32, written at load into ``--dense-dir``
  (default: the temp directory), private to the process and removed when the model is closed. The layer's
  parameters then hold an empty tensor: the memory is freed.
- **Forward**: a forward pre-hook on each streamed Linear (and `CrossNetV2.layer_hook` for cross layers)
  takes the layer's block from a `BlockStream` -- read ahead by a reader thread into a ring of ``depth + 1``
  aligned buffers, checked against its crc32 -- and points the parameters at it (no copy); the forward hook
  gives the buffer back, and the reader fills it with the layer ``depth + 1`` ahead. The order of layers is
  learnt as they run (repeating from batch to batch, so the next batch's first layers are read while the
  server waits for requests). The model computes with the same float32 numbers, laid out as torch lays out a
  parameter (contiguous, 64-byte aligned), by the same operations: the logits equal the all-in-memory model's
  bit for bit (tests/test_dense_stream.py).

Concurrency: the model runs on one thread (`ModelWorker`); only that thread acquires and releases blocks,
and the reader thread only fills the buffers it was handed (`BlockStream`). A live update
(`LoadedModel.apply_publication`, on the model thread between batches) waits for the reads in flight and
rewrites the streamed layers' blocks in place (`DenseStream.load_state`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from torch import nn

from tierec.config import format_bytes
from tierec.errors import ConfigError
from tierec.modules.dcn import CrossNetV2
from tierec.storage.weightfile import BlockStream, WeightFile, block_layout

if TYPE_CHECKING:
    from tierec.inference.model_store import ModelStore

log = logging.getLogger(__name__)

MIN_STREAM_BYTES = 64 << 10  # smaller layers stay in memory: their read would cost more than they weigh
STREAMED_KINDS = ("dlrm", "dcnv2", "mmoe", "ple", "two-tower")  # models whose dense layers run as module calls


@dataclass
class DenseSettings:
    """``--dense-budget`` and its companions (`ServeOptions.dense`)."""

    budget: int  # bytes of dense weights the process keeps in memory (resident layers + the ring's buffers)
    depth: int = 2  # layers read ahead of the one computing (0: each read when needed, on the model thread)
    directory: str | None = None  # where the weight file goes (default: the temp directory)
    direct_io: bool = True  # O_DIRECT reads (else through the page cache)
    verify: bool = True  # check every read block against its crc32
    min_layer_bytes: int = MIN_STREAM_BYTES  # smaller layers stay in memory

    def __post_init__(self):
        if self.budget < 0:
            raise ConfigError(f"--dense-budget must be >= 0 bytes, got {self.budget}")
        if not 0 <= self.depth <= 64:
            raise ConfigError(f"--dense-prefetch must be in [0, 64] layers, got {self.depth}")


@dataclass
class Layer:
    """One layer's parameters, used together: (state_dict key, parameter) in block order, their shapes."""

    name: str
    params: list[tuple[str, torch.Tensor]]
    shapes: list[torch.Size] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)  # byte offset of each parameter in the block
    block: int = -1  # its weight-file block while streamed

    @property
    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for _, p in self.params)

    @property
    def streamable(self) -> bool:
        return all(p.dtype == torch.float32 for _, p in self.params)


def dense_layers(model: nn.Module) -> list[Layer]:
    """The model's Linear layers and cross layers outside ``embeddings``, in registration order; a parameter
    shared by two layers (tied weights) keeps both in memory (left out)."""
    key = {id(p): k for k, p in model.named_parameters(remove_duplicate=False)}
    out: list[Layer] = []
    for name, m in model.named_modules():
        if name == "embeddings" or name.startswith("embeddings."):
            continue
        if isinstance(m, nn.Linear):
            ps = [m.weight] + ([m.bias] if m.bias is not None else [])
            out.append(Layer(name, [(key[id(p)], p) for p in ps]))
        elif isinstance(m, CrossNetV2):
            for i in range(m.num_layers):
                ps = [m.V[i], m.U[i], m.b[i]] if m.rank else [m.W[i], m.b[i]]
                out.append(Layer(f"{name}.{i}", [(key[id(p)], p) for p in ps]))
    seen: dict[int, int] = {}
    for layer in out:
        for _, p in layer.params:
            seen[id(p)] = seen.get(id(p), 0) + 1
    return [x for x in out if all(seen[id(p)] == 1 for _, p in x.params)]


def dense_bytes(model: nn.Module) -> int:
    """Bytes of every parameter outside the embeddings (what ``--dense-budget`` is compared with)."""
    return sum(p.numel() * p.element_size() for k, p in model.named_parameters() if not k.startswith("embeddings."))


def _block_bytes(layer: Layer) -> int:
    return block_layout([p.numel() * p.element_size() for _, p in layer.params])[1]


def plan_layers(layers: list[Layer], total: int, budget: int, depth: int,
                min_bytes: int = MIN_STREAM_BYTES) -> tuple[list[Layer], list[Layer]]:
    """(resident, streamed) layers for ``budget`` bytes of a model of ``total`` dense bytes (module doc)."""
    big = [x for x in layers if x.nbytes >= min_bytes and x.streamable]
    room = budget - (total - sum(x.nbytes for x in big))  # small layers and other parameters stay

    def buffers(streamed: list[Layer]) -> int:
        return (depth + 1) * max((_block_bytes(x) for x in streamed), default=0)

    pinned: list[Layer] = []
    rest = list(big)
    used = 0
    for x in big:
        others = [y for y in rest if y is not x]
        if others and used + x.nbytes + buffers(others) <= room:
            pinned.append(x)
            rest = others
            used += x.nbytes
    out = {id(x) for x in rest}
    return [x for x in layers if id(x) not in out], rest


class DenseStream:
    """A model's streamed dense layers (module doc). Build it with `attach` (None when the model fits)."""

    def __init__(self, model: nn.Module, settings: DenseSettings, resident: list[Layer], streamed: list[Layer],
                 total: int):
        self.model, self.settings, self.total_bytes = model, settings, int(total)
        self.layers = streamed
        self.resident_layers = len(resident)
        self.streamed_bytes = sum(x.nbytes for x in streamed)
        self.wf = WeightFile(settings.directory, settings.direct_io, settings.verify)
        try:
            for x in streamed:
                x.shapes = [p.shape for _, p in x.params]
                x.block, x.offsets = self.wf.append([p.detach().numpy() for _, p in x.params])
            self.wf.finish()
        except BaseException:
            self.wf.close()
            raise
        for x in streamed:  # the weights live in the file now: free them
            for _, p in x.params:
                p.data = torch.empty(0)
        self.current: Layer | None = None
        self.stream = BlockStream(self.wf, [x.block for x in streamed], settings.depth)
        self._hooks: list = []
        self._crossnets: list[CrossNetV2] = []
        by_module: dict[str, Layer] = {x.name: x for x in streamed}
        for name, m in model.named_modules():
            if isinstance(m, nn.Linear) and name in by_module:
                x = by_module[name]
                self._hooks.append(m.register_forward_pre_hook(lambda _m, _i, x=x: self.enter(x)))
                self._hooks.append(m.register_forward_hook(lambda _m, _i, _o: self.exit()))
            elif isinstance(m, CrossNetV2):
                layers = [by_module.get(f"{name}.{i}") for i in range(m.num_layers)]
                if any(x is not None for x in layers):
                    m.layer_hook = lambda i, layers=layers: self.enter(layers[i]) if layers[i] is not None \
                        else self.exit()
                    self._hooks.append(m.register_forward_hook(lambda _m, _i, _o: self.exit()))
                    self._crossnets.append(m)
        log.info("dense weights: %s of %s kept in memory (%d layers resident, %d streamed from %s, %s, read %d "
                 "ahead, %s of buffers)", format_bytes(self.resident_bytes), format_bytes(total),
                 self.resident_layers, len(streamed), self.wf.path, "O_DIRECT" if self.wf.direct else "page cache",
                 settings.depth, format_bytes(self.stream.buffer_bytes))
        if self.resident_bytes > settings.budget:
            log.warning("--dense-budget %s is below what streaming needs: %s stay in memory (layers under %s, "
                        "%d read-ahead buffers of the largest streamed layer)", format_bytes(settings.budget),
                        format_bytes(self.resident_bytes), format_bytes(settings.min_layer_bytes), settings.depth + 1)

    @classmethod
    def attach(cls, model: nn.Module, kind: str, settings: DenseSettings | None) -> DenseStream | None:
        """Stream ``model``'s dense layers if its dense bytes exceed ``settings.budget``; None where nothing is
        streamed (no settings, or the model fits)."""
        if settings is None:
            return None
        if kind not in STREAMED_KINDS:
            raise ConfigError(f"--dense-budget: the dense layers of a {kind} model are not streamed (models: "
                              f"{', '.join(STREAMED_KINDS)})")
        total = dense_bytes(model)
        if settings.budget >= total:
            log.info("dense weights: %s, within --dense-budget %s: all in memory", format_bytes(total),
                     format_bytes(settings.budget))
            return None
        layers = dense_layers(model)
        resident, streamed = plan_layers(layers, total, settings.budget, settings.depth,
                                        settings.min_layer_bytes)
        if not streamed:
            log.info("dense weights: no layer of %s or more to stream: all in memory", format_bytes(MIN_STREAM_BYTES))
            return None
        return cls(model, settings, resident, streamed, total)

    @property
    def resident_bytes(self) -> int:
        """Dense bytes in memory: parameters not streamed, plus the ring's buffers."""
        return self.total_bytes - self.streamed_bytes + self.stream.buffer_bytes

    def enter(self, layer: Layer) -> None:
        """Layer ``layer`` is about to run: point its parameters at its block (waiting for the read)."""
        if self.current is not None:
            self.exit()
        buf = torch.from_numpy(self.stream.acquire(layer.block))
        for (_, p), shape, off in zip(layer.params, layer.shapes, layer.offsets, strict=True):
            n = shape.numel() * 4
            p.data = buf[off : off + n].view(torch.float32).view(shape)
        self.current = layer

    def exit(self) -> None:
        """The layer that ran gives its buffer back (its parameters empty again)."""
        x, self.current = self.current, None
        if x is not None:
            for _, p in x.params:
                p.data = torch.empty(0)
        self.stream.release()

    def load_state(self, state: dict) -> None:
        """A new dense state (a live update, on the model thread between batches): streamed layers' blocks
        rewritten in place, the rest loaded into the model (keys and shapes checked first, as `load_state_dict`)."""
        streamed = {k: (x, j) for x in self.layers for j, (k, _) in enumerate(x.params)}
        for k, (x, j) in streamed.items():
            v = state.get(k)
            if v is None or tuple(v.shape) != tuple(x.shapes[j]) or v.dtype != torch.float32:
                raise RuntimeError(f"dense state: {k} is missing or not float32 {tuple(x.shapes[j])}")
        rest = {k: v for k, v in state.items() if k not in streamed}
        ours = {k for k in self.model.state_dict() if k not in streamed}
        if set(rest) != ours:
            raise RuntimeError(f"dense state: keys differ from the model's ({sorted(set(rest) ^ ours)[:3]}...)")
        self.exit()
        self.stream.quiesce()
        for x in self.layers:
            self.wf.rewrite(x.block, [state[k].detach().contiguous().numpy() for k, _ in x.params])
        self.model.load_state_dict(rest, strict=False)

    def stats(self) -> dict:
        s = self.stream.stats()
        return {"total_bytes": self.total_bytes, "budget_bytes": self.settings.budget,
                "resident_bytes": self.resident_bytes, "streamed_bytes": self.streamed_bytes, "file_bytes": self.wf.size,
                "buffer_bytes": s["buffer_bytes"], "resident_layers": self.resident_layers,
                "streamed_layers": len(self.layers), "read_bytes": s["bytes_read"], "wait_seconds": s["wait_seconds"],
                "acquires": s["acquires"], "demand_reads": s["demand_reads"], "discarded": s["discarded"],
                "io": "direct" if self.wf.direct else "cached", "depth": self.settings.depth,
                "file": str(self.wf.path)}

    def close(self) -> None:
        """Stop the reader, remove the weight file (the model cannot run its streamed layers afterwards)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        for m in self._crossnets:
            m.layer_hook = None
        self.stream.close()
        self.wf.close()


class DenseStreamCollector:
    """``/metrics`` families of the serving models' streamed dense layers (only while some are streamed)."""

    def __init__(self, store: ModelStore):
        self.store = store

    def collect(self):
        r = self.store.retriever
        models = [("ranker", self.store.ranker), ("retriever", getattr(r, "loaded", None))]
        stats = [(n, lm.dense.stats()) for n, lm in models if lm is not None and getattr(lm, "dense", None)]
        if not stats:
            return
        label = ["model"]
        nbytes = GaugeMetricFamily("tierec_dense_bytes", "dense weights by where they are: resident (layers in "
                                   "memory and the read-ahead buffers), streamed (layers kept in the weight file), "
                                   "buffers (the read-ahead ring, part of resident), budget (--dense-budget)",
                                   labels=["model", "where"])
        layers = GaugeMetricFamily("tierec_dense_layers", "dense layers resident in memory or streamed from the "
                                   "weight file", labels=["model", "where"])
        read = CounterMetricFamily("tierec_dense_read_bytes", "bytes of dense layers read from the weight file",
                                   labels=label)
        wait = CounterMetricFamily("tierec_dense_wait_seconds", "time the model thread waited for dense layers to be "
                                   "read (0 when every read ahead was done in time)", labels=label)
        reads = CounterMetricFamily("tierec_dense_layer_reads", "streamed layers used (ahead: read ahead, demand: "
                                    "read when needed) and reads ahead dropped unused (discarded)",
                                    labels=["model", "kind"])
        for name, s in stats:
            for where, k in (("resident", "resident_bytes"), ("streamed", "streamed_bytes"),
                             ("buffers", "buffer_bytes"), ("budget", "budget_bytes")):
                nbytes.add_metric([name, where], s[k])
            layers.add_metric([name, "resident"], s["resident_layers"])
            layers.add_metric([name, "streamed"], s["streamed_layers"])
            read.add_metric([name], s["read_bytes"])
            wait.add_metric([name], s["wait_seconds"])
            reads.add_metric([name, "ahead"], s["acquires"] - s["demand_reads"])
            reads.add_metric([name, "demand"], s["demand_reads"])
            reads.add_metric([name, "discarded"], s["discarded"])
        yield from (nbytes, layers, read, wait, reads)
