"""`tierec train`, `tierec eval` (single process, or one rank under torchrun)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import typing
from dataclasses import fields

from tierec.train.config import TrainConfig, make_config

log = logging.getLogger(__name__)

HELP = {
    "data": "tierec data set directory (from `tierec data synth` or `tierec data convert`)",
    "out": "run directory: metrics.jsonl and checkpoints/ (an existing run needs --resume or --overwrite)",
    "eval_data": "data set to evaluate on during and after training: its test split, or its train split when it "
                 "has no test rows (default: the test split of --data; none there: no evaluation)",
    "model": "model architecture: dlrm (ranking: dot interaction), dcnv2 (ranking: cross network v2), mmoe or ple "
             "(multi-task ranking: one tower per label of the data set, experts shared through gates), two-tower "
             "(retrieval; needs user-side features), sasrec (sequential recommendation: self-attention over each "
             "user's history; needs a sequence data set from `tierec data convert --format sequences`), lightgcn "
             "(graph recommendation: user and item rows propagated over the user-item graph of a sequence data "
             "set, BPR loss, Recall@20 / NDCG@20 on held-out pairs)",
    "preset": "a named architecture whose settings fill those not given: mlperf-dcnv2 (MLPerf Training's "
              "DLRM-DCNv2: dim 128, bottom 512-256-128, 3 low-rank cross layers of rank 512, top "
              "1024-1024-512-256-1, Adagrad)",
    "cross_layers": "dcnv2: cross layers",
    "cross_rank": "dcnv2: rank of each cross layer's weight (0: full rank; r: W = U V^T with U, V d x r)",
    "dcn_structure": "dcnv2: stacked (cross network, then the top MLP) or parallel (both on the embeddings, "
                     "outputs joined)",
    "experts": "mmoe: experts shared by the tasks; ple: experts per task and shared experts, per level",
    "expert_mlp": "mmoe/ple: hidden sizes of each expert, comma-separated",
    "expert_top_k": "mmoe/ple: 0: every expert runs for every sample (dense gates); k: each sample runs only the "
                    "k experts its gate scores highest (sparse mixture of experts, gather/scatter dispatch)",
    "ple_levels": "ple: extraction levels",
    "moe_aux_weight": "mmoe/ple with --expert-top-k: weight of the load-balancing loss (experts used evenly)",
    "task_weights": "multi-task models: loss weight of each label, comma-separated (default 1 each)",
    "embedding_dim": "embedding dimension of every table",
    "max_len": "sasrec: the last this many items of a history are attended to",
    "num_blocks": "sasrec: self-attention blocks",
    "num_heads": "sasrec: attention heads per block (--embedding-dim must be a multiple)",
    "attn_dropout": "sasrec: dropout rate of the embeddings, attention and feed-forward layers",
    "pre_ln": "sasrec: pre-LayerNorm blocks (default: post-LN, as the original SASRec)",
    "item_adam": "sasrec: the item table's Adam: lazy (rows absent from a step keep still; any tier) or dense "
                 "(every row moves each step, as torch.optim.Adam in the reference SASRec; the table in memory)",
    "attention": "sasrec: full (exact causal attention over every key) or pruned (cheap int8 or low-rank scores "
                 "pick each query's --attn-keep keys, exact attention runs on those alone; docs/models.md)",
    "attn_keep": "sasrec, --attention pruned: keys each query keeps (its own position included; padding never)",
    "attn_threshold": "sasrec, --attention pruned: also drop kept keys whose approximate logit is more than this "
                      "below the row's best (their weight under exp(-t) of the top key's); default: off",
    "attn_score": "sasrec, --attention pruned: the cheap scores that pick the keys: int8 (q and k quantized to "
                  "int8, integer dot products, as SPRINT's in-memory pass) or lowrank (a fixed random "
                  "projection to --attn-rank dimensions)",
    "attn_rank": "sasrec, --attention pruned, --attn-score lowrank: dimensions of the random projection",
    "num_layers": "lightgcn: propagation layers K over the normalised user-item graph (0: plain matrix "
                  "factorisation)",
    "l2_reg": "lightgcn: L2 penalty l2_reg / 2 * (squared norms of the layer-0 user, positive and negative rows of "
              "the batch's triples) / batch size (the LightGCN paper's regulariser)",
    "test_ratio": "lightgcn: share of each user's distinct items held out as test pairs, drawn from --seed (the "
                  "LightGCN paper's random per-user split)",
    "propagation": "lightgcn: khop (each step looks up and propagates only the rows of its batch's K-hop "
                   "neighbourhood: exact, the same embeddings as the whole graph) or full (every row, every step, "
                   "as PyG's LightGCN)",
    "pooling": "how a multi-hot bag is pooled",
    "bottom_mlp": "hidden sizes of the bottom (dense) MLP, comma-separated",
    "top_mlp": "hidden sizes of the top MLP, comma-separated",
    "tower_mlp": "two-tower: hidden sizes of the user and item towers, comma-separated",
    "batch_size": "training batch size (samples)",
    "epochs": "passes over the training split",
    "max_steps": "stop after this many steps in total (a checkpoint is written; --resume continues)",
    "max_train_rows": "use only this many training rows per epoch",
    "dense_optimizer": "optimizer of the MLPs",
    "lr": "dense learning rate",
    "sparse_optimizer": "fused row-wise optimizer of the embedding tables",
    "sparse_lr": "embedding learning rate",
    "shuffle": "shuffle row groups and rows (whole sessions in a clustered data set) each epoch (from --seed)",
    "seed": "seed of initial weights and data order",
    "eval_every": "evaluate every N steps (0: at the end of each epoch)",
    "eval_batch_size": "evaluation batch size",
    "max_eval_rows": "evaluate on at most this many held-out rows",
    "checkpoint_every": "checkpoint every N steps (0: at the end of each epoch)",
    "keep_checkpoints": "how many checkpoints to keep (and the checkpoints their chains need)",
    "checkpoint_chain": "incremental checkpoints: after a full checkpoint, each writes only the rows changed since "
                        "the previous one, until a chain of this many; then a full one again (1: every checkpoint "
                        "full)",
    "log_every": "write a JSONL training record every N steps",
    "num_threads": "torch intra-op threads (default: torch's choice, one fewer while a look-ahead worker prefetches SSD "
                   "rows: it gets a core of its own)",
    "device": "where dense layers and in-memory tables live",
    "progress": "show progress bars (only on a terminal)",
    "carbon_region": "grid region for operational CO2e, e.g. FR, DE, US (default: $TIEREC_REGION or world average)",
    "carbon_intensity": "grid carbon intensity in gCO2e/kWh (overrides --carbon-region)",
    "memory_budget": "memory for embedding storage, e.g. 2GiB: tables that fit stay in memory, the rest go to SSD "
                     "behind caches sized by access share (default: everything in memory)",
    "storage_dir": "directory for SSD table files (default: OUT/tables)",
    "cache_policy": "eviction policy of SSD tables' caches; lookahead: prefetch and evict (Belady) from the "
                    "batches read ahead, overlapped with compute",
    "lookahead": "cache-policy lookahead: batches read ahead (the window the oracle sees)",
    "prefetch_depth": "cache-policy lookahead: steps whose rows are made resident ahead of the trainer",
    "lookahead_memory": "cache-policy lookahead: most memory the window holds, e.g. 512MiB: its batches plus ~32 B "
                        "per unique ID per batch for the oracle; the window shrinks to fit, with a warning",
    "prefetch_threads": "cache-policy lookahead: threads prefetching tables in parallel (default: 4 with "
                        "--direct-io, whose batched AIO reads mostly wait on the device; else by cores, 1 on 2 "
                        "cores, at most 4)",
    "lookahead_trace": "cache-policy lookahead: before training, one pass over the run's batches (IDs only kept, "
                       "spilled to OUT, bounded by the window's memory) gives every lookup its next use, so eviction is "
                       "Belady's MIN over the whole run, not only the window, and write-backs are laid out by next "
                       "use (fewer device bytes read); --no-lookahead-trace: the window alone",
    "group_caches": "cache-policy lookahead: the SSD tables share ONE cache, their rows numbered one after "
                    "another (as FBGEMM's table-batched embeddings), so the prefetch worker does its bookkeeping "
                    "once per step instead of once per table; --no-group-caches: one cache per table",
    "host_cache": "host-DRAM cache tier between the device caches and the SSD files, e.g. 8GiB, split across "
                  "SSD tables like the device caches (for --device cuda; same policy)",
    "direct_io": "read SSD tables with O_DIRECT, bypassing the OS page cache",
    "ssd_row_align": "pad each row of the SSD working files to a multiple of this many bytes (0: packed). 512 "
                     "with --direct-io on a 512-byte-sector device: no two rows share a sector, so write-backs "
                     "need no read-modify-write (a third fewer I/Os) at up to 2x the disk space; checkpoints "
                     "stay packed",
    "ssd_layout": "plain (default): row r at file row r; hot: the SSD working files hold the rows the planning "
                  "pass counted most often together, hottest first, a look-ahead cache takes the rows that "
                  "share a missed row's device block when its window uses them: a higher hit rate and 8-21%% "
                  "fewer device bytes for more prefetch CPU per step (slower on a 2-core machine; for machines "
                  "with cores to spare: docs/storage.md)",
    "ssd_write_log": "with --direct-io, packed rows and --ssd-layout plain (the defaults): write-backs are appended "
                     "to a log region of each SSD working file in whole blocks, a map (8 B per moved row, 1/16 of "
                     "--memory-budget at "
                     "most) says where each row lives; --no-ssd-write-log: written in place, each one reading its "
                     "4 KiB block first (read-modify-write; docs/storage.md)",
    "plan_batches": "batches read to measure each table's access share for --memory-budget",
    "dedup": "look up user-side features once per unique row of a batch and expand (docs/dedup.md)",
    "table_kind": "fixed: a table of --table-rows rows, raw 64-bit IDs hashed into it (collisions share a row); "
                  "dynamic: every admitted ID its own row among --table-rows slots, allocated on admission and "
                  "freed on eviction (docs/dynamic.md); per table: [tables.NAME] kind in a config file",
    "table_rows": "rows of a fixed table over raw IDs, or a dynamic table's capacity in rows (default: the data "
                  "set's num_embeddings of the feature); per table: [tables.NAME] rows",
    "admit_count": "dynamic tables: an ID gets a row once seen this many times (count-min sketch; 1: at once)",
    "default_row": "dynamic tables: what an ID without a row reads: zero (it adds nothing to its bag) or unknown "
                   "(one shared, trained row); its own row gets no update either way",
    "evict": "dynamic tables: none (a full table rejects new IDs), ttl (IDs unseen for --ttl-steps leave; when "
             "full, the least recently seen), lfu (counts halve every --decay-every steps; when full, the "
             "lowest), l2 (rows below --l2-threshold leave; when full, as lfu)",
    "ttl_steps": "dynamic tables, --evict ttl: IDs unseen for more than this many steps leave",
    "decay_every": "dynamic tables: every this many steps LFU counts and the admission sketch halve, the TTL "
                   "sweep runs and --evict l2 measures the rows (0: never)",
    "l2_threshold": "dynamic tables, --evict l2: rows whose L2 norm is below this leave (measured every "
                    "--decay-every steps, applied a fixed number of steps later)",
    "id_index": "dynamic tables: where the raw ID -> slot index lives: memory, ssd (files beside the SSD tables, "
                "a bounded share of their pages in memory), or auto (ssd when it would take over a quarter of "
                "--memory-budget); the same map either way (docs/dynamic.md)",
    "id_partitions": "dynamic tables: split each table's IDs by a hash of the raw ID into this many partitions of "
                     "--table-rows / N slots, each admitting and evicting on its own; under torchrun a table is "
                     "then sharded row-wise on partition bounds (rows owned by hash of the raw ID)",
    "id_index_memory": "dynamic tables, index spilled to SSD: bytes of its pages kept in memory, e.g. 256MiB "
                       "(default: 1/16 of --memory-budget, at least 16 MiB; 64 MiB without a budget)",
    "input": "the input pipeline's settings: manual (the --input-* flags) or autotune (profiled at start, "
             "chosen by the operational model within the cores and the memory left after the tables, re-chosen when "
             "the measured stage rates drift; choices logged and recorded in metrics.jsonl; docs/input.md); the "
             "batches are the same either way",
    "profile_input": "before training, profile the input pipeline (each stage's rows/s, MB/s, CPU per row and memory, "
                     "alone and in the pipeline; a short training probe's consumption rate; the bottleneck) into "
                     "OUT/input-profile/ (txt, json, png); docs/input.md",
    "input_readers": "threads reading, decompressing and decoding Parquet row groups",
    "input_prefetch": "row-group reads in flight ahead of the trainer (0: each read on the trainer's thread when "
                      "it needs it)",
    "input_read_groups": "row groups per read (larger reads amortise per-read costs, hold more memory)",
    "input_batch_workers": "threads building batches (keyed jagged tensors, deduplication) ahead of the trainer "
                           "(0: on the trainer's thread)",
    "input_batch_prefetch": "batches built ahead of the trainer by the batch workers",
    "input_cache": "memory for a cache of decoded row groups reused by later epochs, e.g. 2GiB (0: none)",
    "input_reader_processes": "the --input-readers are worker processes, not threads: decoding runs beside the "
                              "trainer's Python without sharing its GIL; results come back through /dev/shm "
                              "(needs --input-prefetch >= 1, no --input-cache; docs/input.md)",
    "input_batch_processes": "the --input-batch-workers are worker processes, not threads (dedup and KJT building "
                             "without the trainer's GIL; each batch's chunk goes to them and the batch back)",
}
CONFIG_ONLY = {"tables", "sharding"}  # nested settings: config file only


def _float_list(s: str) -> list[float]:
    try:
        return [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from None


def _int_list(s: str) -> list[int]:
    try:
        return [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


def add_train_flags(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field; defaults are None so config-file values win over defaults."""
    hints = typing.get_type_hints(TrainConfig)
    defaults = TrainConfig(data="x")
    for f in fields(TrainConfig):
        if f.name in CONFIG_ONLY:
            continue
        flag = "--" + f.name.replace("_", "-")
        tp = hints[f.name]
        default = getattr(defaults, f.name)
        text = HELP.get(f.name, "")
        help_ = text + (f" (default: {default})" if f.name != "data" and "(default" not in text else "")
        args = typing.get_args(tp)
        if tp is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_)
        elif typing.get_origin(tp) is typing.Literal:
            p.add_argument(flag, choices=list(args), default=None, help=help_)
        elif any(typing.get_origin(a) is typing.Literal for a in args):  # an optional choice
            lit = next(a for a in args if typing.get_origin(a) is typing.Literal)
            p.add_argument(flag, choices=list(typing.get_args(lit)), default=None, help=help_)
        elif typing.get_origin(tp) is list or list in [typing.get_origin(a) for a in args]:
            floats = float in [a for x in [tp, *args] for a in typing.get_args(x)]
            p.add_argument(flag, type=_float_list if floats else _int_list, default=None,
                           metavar="X,X,..." if floats else "N,N,...", help=help_)
        else:
            base = next((a for a in args if a is not type(None)), tp) if args else tp
            p.add_argument(flag, type=base, default=None, help=help_)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model on a tierec data set")
    p.add_argument("--config", metavar="FILE", help="TOML or YAML file with any of the options below; flags override it")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in an --out that already holds a run (deletes its metrics, checkpoints and "
                        "working tables)")
    p.add_argument("--allow-config-change", action="store_true",
                   help="--resume even though a setting that changes the training trajectory (batch size, learning "
                        "rates, seed, model shape, data, ...) differs from the checkpoint's")
    add_train_flags(p)
    p.set_defaults(func=_train)

    p = sub.add_parser("eval", help="evaluate a checkpoint: AUC and log-loss (sasrec: HR@10 and NDCG@10; "
                                    "lightgcn: Recall@20 and NDCG@20)")
    p.add_argument("checkpoint", help="run directory or checkpoint directory")
    p.add_argument("--data", help="data set to evaluate on (default: the one it was trained on)")
    p.add_argument("--split", default="test", help="split to evaluate (default: test)")
    p.add_argument("--batch-size", type=int, default=8192)
    p.add_argument("--max-rows", type=int, default=None)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.set_defaults(func=_eval)


def _train(args) -> int:
    overrides = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if f.name not in CONFIG_ONLY}
    cfg = make_config(args.config, overrides)
    if cfg.model == "lightgcn":  # the user-item graph of sequence data: its own loop (tierec.train.graph)
        from tierec.train.graph import train_lightgcn

        print(json.dumps(train_lightgcn(cfg, resume=args.resume, overwrite=args.overwrite), indent=2))
        return 0
    if cfg.model == "sasrec":  # sequence data: its own loop (tierec.train.sequence)
        from tierec.train.sequence import train_sasrec

        print(json.dumps(train_sasrec(cfg, resume=args.resume, overwrite=args.overwrite), indent=2))
        return 0
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # started by torchrun with several processes
        from tierec.distributed.run import train_distributed

        rc = train_distributed(cfg, resume=args.resume, overwrite=args.overwrite,
                               allow_config_change=args.allow_config_change)
        return rc or 0  # None: torchrun's `record` wrapper caught a SystemExit(0)
    from tierec.train.trainer import Trainer

    summary = Trainer(cfg, resume=args.resume, overwrite=args.overwrite,
                      allow_config_change=args.allow_config_change).fit()
    print(json.dumps(summary, indent=2))
    return 0


def _eval(args) -> int:
    from tierec.errors import TierecError
    from tierec.train.trainer import evaluate, load_for_eval, load_id_maps

    if args.batch_size <= 0:
        raise TierecError(f"--batch-size must be > 0, got {args.batch_size}")
    from tierec.train import graph

    if graph.is_lightgcn_checkpoint(args.checkpoint):  # Recall@20 / NDCG@20 on its graph's test pairs
        if args.split != "test":
            raise TierecError(f"--split for a lightgcn checkpoint must be test, got {args.split!r}")
        print(json.dumps(graph.eval_checkpoint(args.checkpoint, args.data, args.device, args.batch_size), indent=2))
        return 0
    from tierec.train.sequence import eval_checkpoint, is_sasrec_checkpoint

    if is_sasrec_checkpoint(args.checkpoint):  # HR@10 / NDCG@10 on a sequence data set's valid or test targets
        if args.split not in ("valid", "test"):
            raise TierecError(f"--split for a sasrec checkpoint must be valid or test, got {args.split!r}")
        print(json.dumps(eval_checkpoint(args.checkpoint, args.data, args.split, args.device), indent=2))
        return 0
    from tierec import energy

    model, ds, manifest = load_for_eval(args.checkpoint, args.data, args.device)
    id_maps = load_id_maps(args.checkpoint, ds.schema)
    with energy.meter(work_unit="samples") as m:
        res = evaluate(model, ds, args.split, args.batch_size, next(model.parameters()).device, args.max_rows,
                       id_maps=id_maps)
        m.add_work(res["rows"])
    report = m.report()
    res["checkpoint_step"] = manifest["step"]
    res["energy"] = report.columns() | {"summary": report.summary_line()}
    print(json.dumps(res, indent=2))
    return 0
