"""Peer measurement: TorchRec's managed-collision EmbeddingBagCollection (MCH, zero-collision) training on CPU.

    from mc_peer import torchrec_mc_steps          # from another script in benchmarks/
    res = torchrec_mc_steps(batches, capacity=20_000, dim=16)
    python benchmarks/mc_peer.py                   # smoke run: 8 Zipf features, B=1024, 30 steps, prints JSON

Builds `ManagedCollisionEmbeddingBagCollection(EmbeddingBagCollection, ManagedCollisionCollection)` with one
sum-pooled table of `capacity` x `dim` per feature and one `MCHManagedCollisionModule` (zch_size=capacity,
DistanceLFU eviction, eviction_interval=1 by default) per table, then times one training step per batch after
`warmup`: KJT from the batch, forward (raw ID -> slot remap, admission/eviction, pooled lookup), loss =
pooled.sum(), backward, torch.optim.SGD on the table weights. What TorchRec 1.8.0 does here, from its source:

- Raw IDs go in as they are: with no input_hash_func the module never reduces them, and any int64 (negative
  included) is matched exactly by searchsorted. `input_hash_size` is only documented as the input range
  [0, input_hash_size) and used by the row-wise sharded path to bucket IDs; this peer keeps that contract by
  passing input_hash_func = ids mod (2**63 - 1), which also keeps INT64_MAX (the empty-slot sentinel) out.
- `mch_size` / `mch_hash_func` are deprecated (a warning; ignored): IDs without a slot all read the table's
  last row (capacity - 1), which is never evicted, so capacity - 1 slots hold IDs.
- Admission/eviction run in forward only in training mode, every `eviction_interval` steps, over the IDs seen
  since the last one (torch.unique + argsort); IDs seen after it read the shared last row until the next.
- Evicted slots' embedding rows are NOT reset (`mc_embedding_modules.evict` is a TODO no-op): a new ID
  inherits the trained row of the ID it displaced.
- Forward returns (KeyedTensor, remapped KJT or None); nn.EmbeddingBag gradients are dense on CPU.
"""

from __future__ import annotations

import json
import statistics
import time
import warnings

import torch

INPUT_HASH_SIZE = 2**63 - 1  # MCHManagedCollisionModule's default; INT64_MAX is its empty-slot sentinel


def _to_hash_range(ids: torch.Tensor, input_hash_size: int) -> torch.Tensor:
    """Any int64 -> [0, input_hash_size) (remainder takes the divisor's sign)."""
    return torch.remainder(ids, input_hash_size)


def _import_torchrec():
    try:
        with warnings.catch_warnings():  # fbgemm_gpu emits DeprecationWarnings at import
            warnings.simplefilter("ignore", DeprecationWarning)
            from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
            from torchrec.modules.embedding_modules import EmbeddingBagCollection
            from torchrec.modules.mc_embedding_modules import ManagedCollisionEmbeddingBagCollection
            from torchrec.modules.mc_modules import (
                DistanceLFU_EvictionPolicy,
                ManagedCollisionCollection,
                MCHManagedCollisionModule,
            )
            from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
    except Exception as e:  # ImportError, or fbgemm_gpu failing to load its ops
        raise RuntimeError(f"TorchRec is not importable ({type(e).__name__}: {e}); install it with `make torchrec`") from e
    return (EmbeddingBagConfig, PoolingType, EmbeddingBagCollection, ManagedCollisionEmbeddingBagCollection,
            DistanceLFU_EvictionPolicy, ManagedCollisionCollection, MCHManagedCollisionModule, KeyedJaggedTensor)


def torchrec_mc_steps(batches, capacity: int, dim: int, lr: float = 0.05, warmup: int = 3, *,
                      eviction_interval: int = 1) -> dict:
    """batches: list of dicts feature name -> (values int64 [N] raw 64-bit IDs, lengths int64 [B]); every batch
    has the same features and B. One training step per batch; steps after `warmup` are timed (the checks on
    remapped IDs and slot turnover run between steps, outside the timing)."""
    (EmbeddingBagConfig, PoolingType, EmbeddingBagCollection, MCEBC, DistanceLFU, MCC, MCH, KJT) = _import_torchrec()
    if len(batches) <= warmup:
        raise ValueError(f"need more than warmup={warmup} batches, got {len(batches)}")
    keys = list(batches[0])
    batch_size = int(batches[0][keys[0]][1].numel())
    cpu = torch.device("cpu")
    tables = [EmbeddingBagConfig(name=f"t_{k}", embedding_dim=dim, num_embeddings=capacity, feature_names=[k],
                                 pooling=PoolingType.SUM) for k in keys]
    mchs = {t.name: MCH(zch_size=capacity, device=cpu, eviction_policy=DistanceLFU(), eviction_interval=eviction_interval,
                        input_hash_size=INPUT_HASH_SIZE, input_hash_func=_to_hash_range, name=t.name) for t in tables}
    model = MCEBC(EmbeddingBagCollection(tables=tables, device=cpu), MCC(mchs, tables), return_remapped_features=True)
    model.train()  # admission/eviction only happen in training mode
    opt = torch.optim.SGD(model.parameters(), lr=lr)  # the table weights; the MC modules hold buffers only

    times, evicted, admitted, misses, lookups, max_row, min_row = [], 0, 0, 0, 0, -1, capacity
    for i, batch in enumerate(batches):
        before = {n: m._mch_sorted_raw_ids.clone() for n, m in mchs.items()}
        t0 = time.perf_counter()
        kjt = KJT.from_lengths_sync(keys=keys, values=torch.cat([batch[k][0] for k in keys]),
                                    lengths=torch.cat([batch[k][1] for k in keys]))
        pooled, remapped = model(kjt)
        loss = pooled.values().sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        dt = time.perf_counter() - t0
        if i >= warmup:
            times.append(dt)
        rows = remapped.values()
        max_row, min_row = max(max_row, int(rows.max())), min(min_row, int(rows.min()))
        misses += int((rows == capacity - 1).sum())
        lookups += rows.numel()
        for n, m in mchs.items():  # slot turnover: held IDs displaced vs empty slots filled
            old, new = before[n], m._mch_sorted_raw_ids
            held_before = old[old != torch.iinfo(torch.int64).max]
            gone = int((~torch.isin(held_before, new)).sum())
            evicted += gone
            admitted += int((new != torch.iinfo(torch.int64).max).sum()) - held_before.numel() + gone
    if not (0 <= min_row and max_row < capacity):
        raise AssertionError(f"remapped rows outside [0, {capacity}): [{min_row}, {max_row}]")

    total = sum(times)
    return {
        "samples_per_s": batch_size * len(times) / total,
        "ms_per_step": 1e3 * total / len(times),
        "ms_per_step_median": 1e3 * statistics.median(times),
        "steps": len(times),
        "batch_size": batch_size,
        "features": len(keys),
        "input_hash_size": INPUT_HASH_SIZE,
        "eviction_policy": f"DistanceLFU_EvictionPolicy(decay_exponent=1.0), eviction_interval={eviction_interval}",
        "ids_admitted": admitted,
        "ids_evicted": evicted,
        "miss_row_fraction": misses / lookups,
        "remapped_row_range": [min_row, max_row],
        "open_slots_end": sum(int(m.open_slots()) for m in mchs.values()),
        "torch_threads": torch.get_num_threads(),
        "notes": ("torchrec MCH on CPU, unsharded: raw IDs reduced by input_hash_func = ids mod (2**63-1) into "
                  "[0, input_hash_size) (not needed by the unsharded module, which matches any int64 exactly; "
                  "keeps the documented range and the INT64_MAX empty-slot sentinel out); mch_size/mch_hash_func "
                  "not used (deprecated); IDs without a slot read the shared last row (capacity-1), so capacity-1 "
                  "slots hold IDs; evicted slots' embeddings are not reset (torchrec's evict() is a no-op); "
                  "nn.EmbeddingBag dense grads + torch.optim.SGD; counts/ranges above checked outside the timing."),
    }


def _zipf_batches(n_batches: int, n_features: int, batch_size: int, distinct: int, s: float = 1.0,
                  max_len: int = 8, seed: int = 0) -> list[dict]:
    """Bounded-Zipf ranks per feature, lengths uniform in [1, max_len], hashed to int64 by an odd-constant multiply."""
    import numpy as np

    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, distinct + 1) ** s
    cdf = np.cumsum(p / p.sum())
    mult = np.uint64(0x9E3779B97F4A7C15)
    out = []
    for _ in range(n_batches):
        batch = {}
        for f in range(n_features):
            lengths = rng.integers(1, max_len + 1, batch_size)
            ranks = np.minimum(np.searchsorted(cdf, rng.random(int(lengths.sum()))), distinct - 1).astype(np.uint64)
            ids = ((ranks + np.uint64(1 + (f << 40))) * mult).view(np.int64)  # wraps mod 2**64; about half negative
            batch[f"f{f}"] = (torch.from_numpy(ids.copy()), torch.from_numpy(lengths.astype(np.int64)))
        out.append(batch)
    return out


if __name__ == "__main__":
    res = torchrec_mc_steps(_zipf_batches(30, 8, 1024, 200_000), capacity=20_000, dim=16)
    print(json.dumps(res, indent=2))
