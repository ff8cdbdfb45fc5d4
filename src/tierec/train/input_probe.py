"""The trainer's side of the input profile and autotuner: `tierec train --profile-input`, `--input autotune`,
and `tierec data profile`'s training probe.

- `trainer_probe`: how fast the training step consumes rows when input costs nothing: a throwaway
  model of the run's architecture (its tables in memory, at most `PROBE_TABLE_BYTES` of rows, the
  batches' IDs folded into them) trains a few steps on batches already built; rows/s and CPU per row.
  It never touches the run's own model, so a profiled run learns exactly what it would have.
- `extra_stages`: the stages a run adds after the loader on the consumer's side: look-ahead ID
  extraction (``ids``: each table's unique IDs of a batch, as the look-ahead worker does; with raw IDs
  the ID map's work too, on a copy of the map) and the host-to-device copy (``h2d``, pinned first on CUDA).
- `profile_input`: `tierec.data.profile` over the run's data with those stages and the probe.
- `InputTuner`: at start, the profile and `tierec.data.autotune.choose` set the run's `InputControl`;
  every ``log_every`` steps its `DriftMonitor` looks at the stage clock and re-plans when rates drift.
  Choices are logged and written to metrics.jsonl (``input_autotune`` records).
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import replace
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from tierec.data.autotune import Choice, DriftMonitor, TuneBudget, choose
from tierec.data.dataset import Batch, Dataset, Schema, SparseFeature
from tierec.data.loader import InputControl, LoaderSettings
from tierec.data.opmodel import Machine, TrainerCost
from tierec.data.profile import (
    ExtraStage,
    InputProfile,
    available_memory,
    cpu_count,
    group_rows_of,
    measure_pipeline,
    profile_stages,
    runqueue_s,
    sweep_configs,
    sweep_model,
)
from tierec.malloc import STEP_MALLOC, malloc_thresholds
from tierec.sparse import KeyedJaggedTensor
from tierec.train.config import TrainConfig

if TYPE_CHECKING:
    from tierec.train.trainer import Trainer

log = logging.getLogger(__name__)

PROBE_TABLE_BYTES = 256 << 20  # the probe model's tables, all of them
MEMORY_SHARE = 0.5  # the pipeline may take half the memory available after the tables are built


def _fold(kjt: KeyedJaggedTensor, rows: int) -> KeyedJaggedTensor:
    inv = kjt.inverse_indices_or_none()
    return KeyedJaggedTensor(kjt.keys(), torch.remainder(kjt.values(), rows), kjt.lengths(), stride=kjt.stride(),
                             inverse_indices=inv)


def probe_schema(schema: Schema, embedding_dim: int) -> tuple[Schema, int]:
    """The schema of the probe model: every table at most ``cap`` rows (raw features: exactly ``cap``), and
    ``cap`` (IDs are folded mod it)."""
    per_row = (embedding_dim + 1) * 4 * max(len(schema.sparse), 1)
    cap = max(1024, min(1 << 17, PROBE_TABLE_BYTES // per_row))
    sparse = [SparseFeature(f.name, cap if f.raw else min(f.num_embeddings, cap), f.side, f.encoding)
              for f in schema.sparse]
    return Schema(list(schema.dense), sparse, schema.session_key, schema.dense_transform, list(schema.labels)), cap


def trainer_probe(cfg: TrainConfig, ds: Dataset, device: torch.device | str = "cpu", seconds: float = 2.0,
                  warmup: int = 4, max_steps: int = 200, distinct: int = 8) -> TrainerCost:
    """Rows/s and CPU s/row of the training step alone (module doc): ``distinct`` batches built first, cycled;
    ``warmup`` steps untimed (first touches of the tables, the optimizers' state), then steps for ``seconds``
    (at least 3, at most ``max_steps``). Rows/s net of the time the trainer's thread waited for a core (other
    processes' load), and as measured."""
    from tierec.train.trainer import build_model, make_dense_optimizer, training_loss

    dev = torch.device(device)
    schema, cap = probe_schema(ds.schema, cfg.embedding_dim)
    with tempfile.TemporaryDirectory(prefix="tierec-probe-") as tmp, malloc_thresholds(*STEP_MALLOC):  # as the loop
        pcfg = replace(cfg, memory_budget=None, tables={}, table_kind="fixed", table_rows=None, host_cache=None,
                       cache_policy="lru", out=tmp, storage_dir=None)
        batches = []
        for b in islice(ds.batches("train", cfg.batch_size, shuffle=cfg.shuffle, seed=cfg.seed, dedup=cfg.dedup),
                        distinct):
            batches.append(Batch(b.dense, _fold(b.sparse, cap), b.labels, b.session,
                                 _fold(b.user, cap) if b.user is not None else None).to(dev))
        if not batches:
            raise ValueError(f"{ds.root}: no training rows for the probe")
        model = build_model(pcfg, schema, dev)
        model.train()
        opt = make_dense_optimizer(pcfg, model.dense_parameters())

        def step(b: Batch) -> None:
            loss = training_loss(model, model(b.dense, b.sparse, b.user), b.labels, pcfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss.item()

        for i in range(warmup):
            step(batches[i % len(batches)])
        rows, i, t0, c0, q0 = 0, 0, time.perf_counter(), time.process_time(), runqueue_s()
        while i < max_steps and (i < 3 or time.perf_counter() - t0 < seconds):
            b = batches[i % len(batches)]
            step(b)
            rows += b.size
            i += 1
        wall, cpu, waited = time.perf_counter() - t0, time.process_time() - c0, runqueue_s() - q0
    return TrainerCost(rows / max(wall - waited, 1e-9), cpu / max(rows, 1), rows / max(wall, 1e-9),
                       torch.get_num_threads())


def extra_stages(cfg: TrainConfig | None, schema: Schema, device: torch.device | str = "cpu",
                 ids: bool | None = None) -> list[ExtraStage]:
    """The consumer-side stages of a run (module doc); ``ids``: include the ID extraction (default: when the run
    has look-ahead caches or maps raw IDs)."""
    dev = torch.device(device)
    maps = replace(cfg, id_index="memory").id_maps(schema) if cfg is not None else None
    if ids is None:
        ids = cfg is not None and (cfg.cache_policy == "lookahead" or (maps is not None and maps.active))
    out: list[ExtraStage] = []
    if ids:
        step = [0]

        def extract(b: Batch) -> dict:
            if maps is not None and maps.active:
                step[0] += 1
                b = maps.map_batch(b, step[0])
            by_key = b.sparse.to_dict()
            if b.user is not None:
                by_key.update(b.user.to_dict())
            return {k: torch.unique(jt.values) for k, jt in by_key.items()}
        out.append(("ids", extract))
    pin = dev.type == "cuda"

    def h2d(b: Batch) -> Batch:
        if pin:
            b = Batch(b.dense.pin_memory(), b.sparse, b.labels.pin_memory(), b.session, b.user)
        out = b.to(dev, non_blocking=True)
        if pin:
            torch.cuda.synchronize(dev)
        return out
    out.append(("h2d", h2d))
    return out


def profile_input(cfg: TrainConfig, ds: Dataset, settings: LoaderSettings, device: torch.device | str = "cpu",
                  probe: bool = True, sweep: bool = False, sample_rows: int = 131072,
                  pipeline_rows: int | None = 262144, ids: bool | None = None, split: str = "train") -> InputProfile:
    """The input profile of a run of ``cfg`` on ``ds`` (stages alone, the pipeline under ``settings``, the trainer
    probe, and with ``sweep`` the model check over `sweep_configs`). ``ids``: the look-ahead ID extraction is on
    the run's path (None: as ``cfg`` says; measured either way, left out of the model when off the path)."""
    t0 = time.perf_counter()
    on_path = extra_stages(cfg, ds.schema, device, ids)
    extra = on_path if ids is not None else extra_stages(cfg, ds.schema, device, True)  # measure ids anyway
    stages = profile_stages(ds, split, cfg.batch_size, sample_rows, cfg.dedup, extra)
    off = tuple(name for name, _ in extra if name not in {n for n, _ in on_path})
    prof = InputProfile(str(ds.root), cfg.batch_size, settings, stages, Machine(1.0, 0),
                        group_rows=group_rows_of(ds, split),
                        off_path=off)
    extra = on_path
    rows = min(pipeline_rows or ds.num_rows(split), ds.num_rows(split))
    consume = _consumer(extra)
    prof.pipeline = measure_pipeline(ds, settings, split, cfg.batch_size, max_rows=rows, dedup=cfg.dedup,
                                     consume=consume)
    prof.machine = prof.pipeline.machine(int(available_memory() * MEMORY_SHARE))  # the cores other processes left
    if probe:
        prof.trainer = trainer_probe(cfg, ds, device)
    if sweep:
        sweep_model(ds, prof, sweep_configs(cpu_count()), rows, split, dedup=cfg.dedup, consume=consume,
                    extra=extra, sample_rows=min(sample_rows, 32768))
    log.info("input profile of %s in %.1f s", ds.root, time.perf_counter() - t0)
    return prof


def _consumer(extra: list[ExtraStage]):
    if not extra:
        return None

    def consume(b: Batch) -> None:
        for _, fn in extra:
            fn(b)
    return consume


class InputTuner:
    """`--input autotune` (module doc): ``start`` chooses, ``check`` watches for drift."""

    def __init__(self, profile: InputProfile, control: InputControl, passes: float, rows: int):
        self.profile, self.control = profile, control
        cpu = profile.stages
        decoded = cpu["parquet"].out_bytes_per_row if "parquet" in cpu else 0.0
        self.budget = TuneBudget(profile.machine, max(1, cpu_count()), rows, decoded, passes)
        self.choice: Choice | None = None
        self.monitor: DriftMonitor | None = None
        self._last_check = 0.0

    def start(self) -> Choice:
        p = self.profile
        self.choice = choose(p.models(), self.budget, p.trainer, p.group_rows, p.batch_size)
        self.control.settings = self.choice.settings
        self.monitor = DriftMonitor(p.models(), self.budget, self.choice, p.trainer, p.group_rows, p.batch_size)
        m = self.budget.machine
        log.info("input autotune: %s (predicted %.0f rows/s of training; %d configurations considered, within %.0f "
                 "cores (%.1f busy with other processes), %d threads and %d MiB)", self.choice.settings.describe(),
                 self.choice.rows_per_s, self.choice.considered, m.cores, m.others, self.budget.threads,
                 m.memory_bytes >> 20)
        for r in self.choice.reasons:
            log.info("input autotune: %s", r)
        return self.choice

    def check(self, min_interval_s: float = 10.0) -> Choice | None:
        """New settings when the stage rates drifted (applied to the control), else None; at most every
        ``min_interval_s``."""
        now = time.perf_counter()
        if self.monitor is None or now - self._last_check < min_interval_s:
            return None
        self._last_check = now
        new = self.monitor.observe(self.control.clock.snapshot())
        if new is not None:
            self.control.settings = new.settings
            self.choice = new
        return new


def start_input(trainer: Trainer) -> InputTuner | None:
    """The trainer's hook before its loop: ``--profile-input`` writes OUT/input-profile/ (json, txt, png) and
    logs the table; ``--input autotune`` chooses the settings. None when neither is asked."""
    cfg = trainer.cfg
    if not cfg.profile_input and cfg.input != "autotune":
        return None
    ds = trainer.ds
    rows = ds.num_rows("train") if cfg.max_train_rows is None else min(cfg.max_train_rows, ds.num_rows("train"))
    per_epoch = ds.num_batches("train", cfg.batch_size, max_rows=cfg.max_train_rows)
    steps = per_epoch * cfg.epochs if cfg.max_steps is None else min(cfg.max_steps, per_epoch * cfg.epochs)
    passes = steps * cfg.batch_size / max(rows, 1)
    prof = profile_input(cfg, ds, trainer.input_control.settings, trainer.device,
                         pipeline_rows=min(rows, 262144))
    if cfg.profile_input:
        paths = prof.save(Path(cfg.out) / "input-profile")
        log.info("input profile (%s):\n%s", paths["text"], prof.to_text())
        trainer.log.write("input_profile", step=trainer.step, path=str(paths["json"]), bottleneck=prof.bottleneck())
    if cfg.input != "autotune":
        return None
    tuner = InputTuner(prof, trainer.input_control, passes, rows)
    choice = tuner.start()
    trainer.log.write("input_autotune", step=trainer.step, reason="start", **choice.to_dict())
    return tuner


def check_input(trainer: Trainer, tuner: InputTuner | None) -> None:
    """The trainer's hook at each JSONL record: re-plan on drift, recorded."""
    if tuner is None:
        return
    new = tuner.check()
    if new is not None:
        trainer.log.write("input_autotune", step=trainer.step, reason="drift", **new.to_dict())

