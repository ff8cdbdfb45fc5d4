"""Process groups and the collectives tierec uses, with byte and time counters.

`init_from_env` reads what ``torchrun`` sets (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT) and starts gloo on CPU or NCCL on CUDA, with a
timeout on every collective so that a rank that stops answering ends the job
instead of hanging it.

Two groups: the default one carries the dense gradients (DDP) and small
scalars; a second one carries the embedding exchange (`all_to_all_single`, which
gloo and NCCL both support, uneven splits included), so that the two streams
can never interleave in different orders on different ranks.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from tierec.errors import ConfigError


@dataclass
class CommStats:
    """Bytes this rank sent and seconds it spent in collectives, by kind."""

    bytes: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)

    def add(self, kind: str, nbytes: int, seconds: float) -> None:
        self.bytes[kind] = self.bytes.get(kind, 0) + nbytes
        self.seconds[kind] = self.seconds.get(kind, 0.0) + seconds
        self.calls[kind] = self.calls.get(kind, 0) + 1

    def reset(self) -> None:
        self.bytes.clear()
        self.seconds.clear()
        self.calls.clear()

    def total_bytes(self) -> int:
        return sum(self.bytes.values())

    def total_seconds(self) -> float:
        return sum(self.seconds.values())


@dataclass
class Dist:
    """This process's place in the job."""

    rank: int
    world: int
    local_rank: int
    device: torch.device
    emb_group: dist.ProcessGroup | None  # process group of the embedding all-to-alls (None: the default group)
    store: dist.Store | None = None  # the job's key-value store (torchrun's agent hosts it), to name silent ranks
    stats: CommStats = field(default_factory=CommStats)

    def silent_ranks(self, wait_s: float) -> list[int]:
        """After a failed collective: ranks that do not check in within ``wait_s`` seconds
        (dead or hung). Every rank that hits the failure checks in under a per-job key."""
        if self.store is None:
            return []
        prefix = f"tierec/alive/{os.environ.get('TORCHELASTIC_RUN_ID', '')}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', 0)}/"
        try:
            self.store.set(f"{prefix}{self.rank}", "1")
            deadline = time.monotonic() + wait_s
            silent = list(range(self.world))
            while silent and time.monotonic() < deadline:
                silent = [r for r in silent if not self.store.check([f"{prefix}{r}"])]
                time.sleep(0.2)
            return silent
        except Exception:  # the store itself is gone: nothing more to learn
            return []

    def all_to_all(self, x: torch.Tensor, send_splits: list[int], recv_splits: list[int], kind: str) -> torch.Tensor:
        """Rows ``x[sum(send_splits[:r]) : ...]`` go to rank r; returns what every rank sent here,
        concatenated in rank order (``sum(recv_splits)`` rows, trailing dims kept)."""
        out = x.new_empty((sum(recv_splits), *x.shape[1:]))
        t0 = time.perf_counter()
        dist.all_to_all_single(out, x.contiguous(), recv_splits, send_splits, group=self.emb_group)
        row = x[0].numel() * x.element_size() if x.dim() > 1 else x.element_size()
        self.stats.add(kind, (x.shape[0] - send_splits[self.rank]) * row, time.perf_counter() - t0)
        return out

    def all_reduce_sum(self, x: torch.Tensor, kind: str) -> torch.Tensor:
        t0 = time.perf_counter()
        dist.all_reduce(x)
        # a ring all-reduce sends about 2 (W-1)/W of the buffer per rank
        self.stats.add(kind, int(2 * (self.world - 1) / self.world * x.numel() * x.element_size()),
                       time.perf_counter() - t0)
        return x


def init_from_env(device_name: str = "auto", timeout_s: float = 300.0) -> Dist:
    """Join the job torchrun started (env:// rendezvous); gloo on CPU, NCCL on CUDA."""
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ConfigError(f"not started by torchrun: environment variable(s) {missing} are not set")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    use_cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise ConfigError("device 'cuda' requested but no CUDA GPU is available")
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    timeout = timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timeout)
    emb_group = dist.new_group(backend=backend, timeout=timeout)
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=timedelta(seconds=10))
    return Dist(rank, world, local_rank, device, emb_group, store)


def sum_gradients_hook(d: Dist):
    """DDP comm hook: *sum* the ranks' gradients (DDP's default averages them).

    Each rank's loss is its samples' share of the global batch mean (sum of its
    losses / global batch size), so the sum over ranks is exactly the gradient of
    the single-process loss, also when the batch does not split evenly.
    """

    def hook(state, bucket):
        buf = bucket.buffer()
        d.all_reduce_sum(buf, "allreduce_dense")
        fut = torch.futures.Future()
        fut.set_result(buf)
        return fut

    return hook
