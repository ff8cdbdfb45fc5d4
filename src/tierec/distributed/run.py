"""`torchrun --nproc-per-node N -m tierec train ...`: one rank's life.

Join the job, train, and leave. A failure ends the job with a line naming the
rank: an error in this rank is recorded by torchrun's ``@record`` (the error
file torchrun prints in its summary, with the rank); a peer that died or hangs
makes this rank's next collective fail within ``sharding.timeout_s``, which is
reported as a `TierecError` naming this rank and the last valid checkpoint.
torchrun's summary names the rank that failed first. Checkpoints are published
atomically by rank 0 only after every rank wrote its rows, so the last one stays
valid and ``--resume`` continues from it.
"""

from __future__ import annotations

import json
import logging

import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record

from tierec.distributed.comm import init_from_env
from tierec.errors import TierecError
from tierec.train import checkpoint as ckpt

log = logging.getLogger(__name__)


def _log_as_rank(rank: int) -> None:
    """Rank 0 logs at the configured level; the others only warnings. Every line names its rank."""
    root = logging.getLogger()
    for h in root.handlers:
        h.setFormatter(logging.Formatter(f"%(asctime)s rank {rank} %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    if rank != 0:
        root.setLevel(logging.WARNING)


def _last_checkpoint(out: str) -> str:
    latest = ckpt.latest_or_none(out)
    return str(latest) if latest is not None else "none yet"


@record
def train_distributed(cfg, resume: bool = False, overwrite: bool = False, allow_config_change: bool = False) -> int:
    from tierec.distributed.trainer import DistributedTrainer

    d = init_from_env(cfg.device, cfg.sharding.timeout_s)
    _log_as_rank(d.rank)
    log.info("rank %d of %d on %s (%s)", d.rank, d.world, d.device, dist.get_backend())
    try:
        summary = DistributedTrainer(cfg, d, resume=resume, overwrite=overwrite,
                                     allow_config_change=allow_config_change).fit()
    except RuntimeError as e:  # gloo/NCCL errors are RuntimeErrors (DistError is one too)
        if not (isinstance(e, dist.DistError) or any(w in str(e) for w in ("gloo", "NCCL", "Timed out", "timed out"))):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        silent = d.silent_ranks(min(cfg.sharding.timeout_s, 10.0))
        who = f"rank(s) {', '.join(map(str, silent))} died or stopped answering" if silent else "a peer rank failed"
        raise TierecError(f"rank {d.rank} of {d.world}: a collective failed: {who} (collective timeout "
                          f"{cfg.sharding.timeout_s:g} s; {first[:160]}); last valid checkpoint: "
                          f"{_last_checkpoint(cfg.out)} (continue with --resume)") from e
    if d.rank == 0:
        print(json.dumps(summary | {"world_size": d.world}, indent=2))
    dist.destroy_process_group()
    return 0
