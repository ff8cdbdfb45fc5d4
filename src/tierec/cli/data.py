"""`tierec data synth | convert | cluster | info | verify`: make and inspect data sets."""

from __future__ import annotations

import argparse
import json
import time

from tierec.data import convert
from tierec.data.cluster import DEFAULT_WINDOW
from tierec.data.loader import LoaderSettings
from tierec.data.readers import DEFAULT_NUM_EMBEDDINGS, FORMATS
from tierec.data.synth import (
    CONVERSION_RATE,
    MAX_TASKS,
    MLPERF_MULTI_HOT,
    SynthConfig,
    generate,
    parse_cardinalities,
    write_criteo_tsv,
)


def register(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="make and inspect data sets (synth, convert, cluster, info, verify)")
    dsub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)

    p = dsub.add_parser("synth", help="generate a synthetic Criteo-shaped data set, reproducible from a seed",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_synth_arguments(p)
    p.set_defaults(func=synth_main)

    p = dsub.add_parser("convert", help="convert Criteo / libSVM / MovieLens text into a tierec data set",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_convert_arguments(p)
    p.set_defaults(func=convert_main)

    p = dsub.add_parser("cluster", help="rewrite a data set with sessions clustered (or rows shuffled) within windows",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("dataset", help="source data set directory")
    p.add_argument("--out", required=True, help="output data set directory")
    p.add_argument("--by", choices=["session", "shuffle", "none"], default="session",
                   help="session: a session's rows together, user-side lists once per run; shuffle: interleave rows")
    p.add_argument("--window", type=int, default=1 << 18, metavar="ROWS", help="rows reordered at a time")
    p.add_argument("--seed", type=int, default=0, help="seed of the order of sessions / rows within a window")
    p.set_defaults(func=_cluster)

    p = dsub.add_parser("info", help="print a data set's schema and row counts")
    p.add_argument("dataset", help="data set directory")
    p.set_defaults(func=_info)

    p = dsub.add_parser("profile", help="profile the input pipeline: each stage's rate alone and in the pipeline, "
                                        "the trainer's consumption rate, the bottleneck (docs/input.md)",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_profile_arguments(p)
    p.set_defaults(func=_profile)

    p = dsub.add_parser("verify", help="check every file of a data set against its manifest's sha256 and "
                                          "row-group and footer checksums")
    p.add_argument("dataset", help="data set directory")
    p.set_defaults(func=_verify)


def _info(args) -> int:
    from tierec.data.dataset import Dataset

    ds = Dataset(args.dataset)
    m = dict(ds.manifest)
    m["schema"] = ds.schema.to_json()  # as read: every sparse feature's encoding and raw flag, also where unrecorded
    m["splits"] = {k: {"rows": v["rows"], "files": len(v["files"])} for k, v in m["splits"].items()}
    print(json.dumps(m, indent=2))
    return 0


def _cluster(args) -> int:
    from tierec.data.cluster import recluster

    m = recluster(args.dataset, args.out, args.by, args.window, args.seed)
    total = sum(v["rows"] for v in m["splits"].values())
    size = sum(f["bytes"] for v in m["splits"].values() for f in v["files"])
    print(f"{args.out}: wrote {total:,} rows ({args.by}, window {args.window:,} rows); {size:,} bytes of Parquet")
    return 0


def _verify(args) -> int:
    from tierec.data.dataset import Dataset

    ds = Dataset(args.dataset)
    ds.verify()
    print(f"{args.dataset}: OK ({sum(ds.num_rows(s) for s in ds.splits)} rows, checksums match)")
    return 0


# --------------------------------------------------------------------------- profile
def add_profile_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dataset", help="data set directory")
    p.add_argument("--out", default="runs/input-profile", metavar="DIR",
                   help="where the table (input-profile.txt), its data (.json) and the plot (.png) go")
    p.add_argument("--split", default="train", help="split to read")
    p.add_argument("--batch-size", type=int, default=1024, help="batch size (samples)")
    p.add_argument("--sample-rows", type=int, default=131072, help="rows each stage is timed on alone")
    p.add_argument("--rows", type=int, default=262144, help="rows the whole pipeline is timed on")
    p.add_argument("--no-dedup", action="store_true", help="batches without the inverse KJT of user-side keys")
    p.add_argument("--model", default="dlrm", choices=["dlrm", "dcnv2", "two-tower", "mmoe", "ple"],
                   help="architecture of the training probe")
    p.add_argument("--embedding-dim", type=int, default=16, help="embedding dimension of the training probe")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="device of the probe and h2d")
    p.add_argument("--lookahead", action="store_true",
                   help="the run uses --cache-policy lookahead: the look-ahead ID extraction (ids) is on the path "
                        "(it is measured either way)")
    p.add_argument("--no-train-probe", action="store_true", help="skip the training probe (the trainer's rate)")
    p.add_argument("--sweep", action="store_true",
                   help="also check the operational model: predicted vs measured rows/s over a sweep of "
                        "configurations")
    p.add_argument("--autotune", action="store_true", help="also print what `tierec train --input autotune` would "
                                                           "choose")
    d = LoaderSettings()
    p.add_argument("--reader-threads", type=int, default=d.reader_threads, help="threads reading row groups")
    p.add_argument("--prefetch", type=int, default=d.prefetch, help="row-group reads in flight (0: on demand)")
    p.add_argument("--read-groups", type=int, default=d.read_groups, help="row groups per read")
    p.add_argument("--batch-workers", type=int, default=d.batch_workers,
                   help="threads building batches (0: on the consumer's thread)")
    p.add_argument("--batch-prefetch", type=int, default=d.batch_prefetch, help="batches built ahead")
    p.add_argument("--cache", default="0", help="memory for decoded row groups, e.g. 1GiB")
    p.add_argument("--reader-processes", action="store_true",
                   help="the reader workers are processes, not threads (needs --prefetch >= 1, no --cache)")
    p.add_argument("--batch-processes", action="store_true",
                   help="the batch workers are processes, not threads (needs --batch-workers >= 1)")


def _profile(args) -> int:
    import logging

    from tierec.data.autotune import TuneBudget, choose
    from tierec.data.dataset import Dataset
    from tierec.data.profile import cpu_count
    from tierec.errors import TierecError
    from tierec.train.config import TrainConfig
    from tierec.train.input_probe import profile_input
    from tierec.train.trainer import pick_device

    for name in ("batch_size", "sample_rows", "rows", "embedding_dim"):
        if getattr(args, name) <= 0:
            raise TierecError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    ds = Dataset(args.dataset)
    if args.split not in ds.splits or ds.num_rows(args.split) == 0:
        raise TierecError(f"{args.dataset}: no rows in split {args.split!r} (has: {', '.join(ds.splits)})")
    cfg = TrainConfig(data=args.dataset, batch_size=args.batch_size, model=args.model,
                      embedding_dim=args.embedding_dim, dedup=not args.no_dedup, input_readers=args.reader_threads,
                      input_prefetch=args.prefetch, input_read_groups=args.read_groups,
                      input_batch_workers=args.batch_workers, input_batch_prefetch=args.batch_prefetch,
                      input_cache=args.cache, input_reader_processes=args.reader_processes,
                      input_batch_processes=args.batch_processes)
    logging.getLogger("tierec").setLevel(logging.INFO)
    prof = profile_input(cfg, ds, cfg.loader_settings(), pick_device(args.device), probe=not args.no_train_probe,
                         sweep=args.sweep, sample_rows=args.sample_rows, pipeline_rows=args.rows,
                         ids=True if args.lookahead else None,
                         split=args.split)
    paths = prof.save(args.out)
    print(prof.to_text())
    if args.autotune:
        budget = TuneBudget(prof.machine, cpu_count(), ds.num_rows(args.split),
                            prof.stages["parquet"].out_bytes_per_row, 1.0)
        c = choose(prof.models(), budget, prof.trainer, prof.group_rows, prof.batch_size)
        print(f"\nautotune would choose: {c.settings.describe()} (predicted {c.rows_per_s:,.0f} rows/s"
              f"{' of training' if prof.trainer else ''}; {'; '.join(c.reasons)})")
    print(f"\nwrote {paths['text']}, {paths['json']}, {paths['plot']}")
    return 0


# --------------------------------------------------------------------------- synth
def add_synth_arguments(p: argparse.ArgumentParser) -> None:
    d = SynthConfig()
    p.add_argument("--out", required=True, help="output data set directory (new, empty, or an earlier tierec data set); "
                                                "a file with --format criteo-tsv")
    p.add_argument("--format", choices=["dataset", "criteo-tsv"], default="dataset",
                   help="a tierec data set, or raw Criteo Kaggle text for `tierec data convert`")
    p.add_argument("--rows", type=int, default=d.rows, help="rows in all, train + test")
    p.add_argument("--test-fraction", type=float, default=d.test_fraction,
                   help="the last fraction of rows, held out as the test split")
    p.add_argument("--seed", type=int, default=d.seed, help="same seed, same bytes")
    p.add_argument("--num-sparse", type=int, default=None, metavar="K",
                   help="sparse features C1..CK (default: as many as --cardinalities, else 26)")
    p.add_argument("--cardinalities", default=None, metavar="LIST",
                   help="table sizes, comma-separated in feature order, or one size for all (k/M suffixes ok); "
                        "default: Criteo Kaggle's 26 published cardinalities, cycled")
    p.add_argument("--max-cardinality", type=int, default=d.max_cardinality, metavar="CAP",
                   help="cap on every table size; 0: no cap (the published sizes, 33.8M rows in all)")
    p.add_argument("--num-dense", type=int, default=d.num_dense, help="dense features I1..IN")
    p.add_argument("--multi-hot", default=d.multi_hot, metavar="SPEC",
                   help="IDs per row: fixed:K, uniform:A-B, poisson:M (1+Poisson(M-1)), poisson0:M (may be empty); "
                        "one SPEC for all features plus optional per-feature overrides, e.g. 'fixed:1,C3=poisson:8'; "
                        "or 'mlperf': the fixed multi-hot sizes of MLPerf DLRM-DCNv2's 26 features (Criteo 1TB "
                        "multi-hot: " + ", ".join(map(str, MLPERF_MULTI_HOT)) + "; needs 26 sparse features), "
                        "overrides allowed, e.g. 'mlperf,C21=fixed:50'")
    p.add_argument("--zipf", default="auto", metavar="ALPHA|auto",
                   help="ID popularity: 'auto' = calibrated to Meta's DLRM locality statistics; "
                        "a number = plain Zipf exponent (0 = uniform)")
    p.add_argument("--session-length", type=float, default=d.session_length, metavar="MEAN",
                   help="mean rows per session (geometric); 1 = no sessions")
    p.add_argument("--user-features", type=int, default=d.user_features, metavar="K",
                   help="the first K sparse features are user-side: constant within a session")
    p.add_argument("--positive-rate", type=float, default=d.positive_rate,
                   help="target fraction of positive (click) labels")
    p.add_argument("--tasks", type=int, default=d.tasks, metavar="N",
                   help=f"labels per sample, 1..{MAX_TASKS}: the click label, then N-1 conversion-style labels "
                        f"(1 only where the click label is 1, about {round(CONVERSION_RATE * 100)}%% of clicks; named "
                        "conversion, label_2, ...) for multi-task models")
    p.add_argument("--signal", type=float, default=d.signal,
                   help="strength of the hidden label model (scales its logit); > 1: easier to learn")
    p.add_argument("--rows-per-file", type=int, default=d.rows_per_file, help="rows per Parquet shard")
    p.add_argument("--row-group-size", type=int, default=d.row_group_size, help="rows per Parquet row group")
    p.add_argument("--raw-ids", action="store_true",
                   help="write raw 64-bit IDs (a per-feature bijection of the IDs; same rows and labels) for "
                        "collision-free dynamic tables; a fixed table reduces them mod its size")
    p.add_argument("--cluster-by", choices=["none", "session", "shuffle"], default="none",
                   help="session: shuffle whole sessions within each window, user-side lists stored once per run; "
                        "shuffle: interleave rows within each window (unclustered baseline)")
    p.add_argument("--cluster-window", type=int, default=1 << 18, metavar="ROWS",
                   help="rows reordered at a time with --cluster-by")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (it is off anyway when not a TTY)")


def config_from_args(args) -> SynthConfig:
    return SynthConfig(
        rows=args.rows, test_fraction=args.test_fraction, seed=args.seed, num_sparse=args.num_sparse,
        cardinalities=parse_cardinalities(args.cardinalities) if args.cardinalities else None,
        max_cardinality=args.max_cardinality, num_dense=args.num_dense, multi_hot=args.multi_hot,
        zipf=args.zipf, session_length=args.session_length, user_features=args.user_features,
        positive_rate=args.positive_rate, signal=args.signal, rows_per_file=args.rows_per_file,
        row_group_size=args.row_group_size, raw_ids=bool(getattr(args, "raw_ids", False)),
        tasks=getattr(args, "tasks", 1), progress=not getattr(args, "no_progress", False))


def synth_main(args) -> int:
    t0 = time.perf_counter()
    cfg = config_from_args(args)
    if args.format == "criteo-tsv":
        n = write_criteo_tsv(cfg, args.out)
        print(f"{args.out}: wrote {n:,} rows of Criteo-format text; "
              f"{n / max(time.perf_counter() - t0, 1e-9):,.0f} rows/s")
        return 0
    m = generate(cfg, args.out, cluster_by=args.cluster_by, cluster_window=args.cluster_window)
    dt = max(time.perf_counter() - t0, 1e-9)
    rows = {k: v["rows"] for k, v in m["splits"].items()}
    total = sum(rows.values())
    sch = cfg.schema()
    labels = f"; labels {', '.join(sch.labels)}" if sch.num_tasks > 1 else ""
    print(f"{args.out}: wrote {total:,} rows (train {rows['train']:,}, test {rows['test']:,}); "
          f"{len(sch.sparse)} sparse, {len(sch.dense)} dense features{labels}; {total / dt:,.0f} rows/s")
    return 0


# --------------------------------------------------------------------------- convert
def add_convert_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="input file (.gz/.bz2/.xz/.zst are decompressed on the fly)")
    p.add_argument("--format", required=True, choices=[*FORMATS, "sequences"], dest="fmt",
                   help="criteo-tsv: Criteo Kaggle/Terabyte train.txt / day_N (tab-separated, no header); "
                        "criteo-csv: same columns, comma-separated, header optional; libsvm: 'label idx:val ...'; "
                        "libfm: 'label field:idx:val ...'; movielens: u.data or RecBole .inter; sequences: "
                        "'user item' lines, each user's in time order, into a sequence data set for --model sasrec "
                        "(only --out and --skip-bad-rows apply)")
    p.add_argument("--out", required=True, help="output data set directory (new, empty, or an earlier conversion)")
    p.add_argument("--num-embeddings", type=int, default=None,
                   help=f"rows per embedding table; for Criteo, the cap on the published Kaggle cardinalities "
                        f"(default: {DEFAULT_NUM_EMBEDDINGS}; with --id-encoding identity: the largest ID + 1)")
    p.add_argument("--id-encoding", default=None, metavar="hash|identity|NAME=ENC,...",
                   help="how raw IDs become rows: hash (strings hashed, libSVM/libFM indices hashed as integers; "
                        "collisions possible) or identity (IDs are rows already, e.g. compact 0..N-1 item IDs: no "
                        "collisions); or per feature, e.g. item_id=identity (default: hash). Recorded in the "
                        "manifest; serving encodes requests the same way")
    p.add_argument("--raw-ids", action="store_true",
                   help="store raw 64-bit IDs: the hashes unreduced (identity: the integers), for collision-free "
                        "dynamic tables; the table sizes are still recorded, and a fixed table reduces the IDs mod "
                        "its size to the rows a conversion without this flag writes")
    p.add_argument("--table-sizes", default=None, metavar="FILE_OR_LIST",
                   help="per-feature table sizes, overriding --num-embeddings: '1000,20,...' in feature order, "
                        "'C1=1000,C3=50', or a YAML/JSON file holding such a list or mapping")
    p.add_argument("--num-labels", type=int, default=None, metavar="N",
                   help="criteo-tsv/criteo-csv: each row starts with N labels (0 or 1) instead of one, e.g. click "
                        "and conversion for multi-task models (default: 1, or as many as --label-names)")
    p.add_argument("--label-names", default=None, metavar="A,B,...",
                   help="names of the labels, comma-separated (default: label, then conversion, label_2, ...)")
    p.add_argument("--test-fraction", type=float, default=0.1, help="fraction of rows held out as the test split")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/test split")
    p.add_argument("--skip-bad-rows", action="store_true",
                   help="skip and count malformed rows instead of stopping at the first one")
    p.add_argument("--rows-per-file", type=int, default=1 << 20, help="rows per Parquet shard")
    p.add_argument("--row-group-size", type=int, default=65536, help="rows per Parquet row group")
    p.add_argument("--field-map", default=None, metavar="FILE",
                   help="libsvm/libfm: YAML/JSON mapping of indices / fields to named features (docs/data.md)")
    p.add_argument("--max-rows", type=int, default=None, help="stop after this many good rows")
    p.add_argument("--rating-threshold", type=float, default=4.0,
                   help="movielens: label = 1 when rating >= this, else 0")
    p.add_argument("--cluster-by", choices=["none", "session", "shuffle"], default="none",
                   help="session: write a session's rows together (user-side lists stored once per run), "
                        "sessions in random order within each window; shuffle: permute rows within each window")
    p.add_argument("--cluster-window", type=int, default=DEFAULT_WINDOW, metavar="ROWS",
                   help="rows buffered and reordered at a time (bounds memory and how far a row moves)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (it is off anyway when not a TTY)")


def convert_main(args) -> int:
    t0 = time.perf_counter()
    if args.fmt == "sequences":
        from tierec.data.sequences import convert_sequences

        sm = convert_sequences(args.input, args.out, skip_bad_rows=args.skip_bad_rows)
        print(f"{args.out}: wrote {sm['num_interactions']:,} interactions of {sm['num_users']:,} users over "
              f"{sm['num_items']:,} items ({sm['eval_users']:,} users with valid/test targets); bad rows skipped: "
              f"{sm['source']['bad_rows_skipped']:,}; {time.perf_counter() - t0:.1f} s")
        return 0
    m = convert.convert(args.input, args.out, args.fmt, num_embeddings=args.num_embeddings, table_sizes=args.table_sizes,
                test_fraction=args.test_fraction, seed=args.seed, skip_bad_rows=args.skip_bad_rows,
                rows_per_file=args.rows_per_file, row_group_size=args.row_group_size, field_map=args.field_map,
                max_rows=args.max_rows, rating_threshold=args.rating_threshold,
                progress=not getattr(args, "no_progress", False), cluster_by=args.cluster_by,
                cluster_window=args.cluster_window, id_encoding=args.id_encoding, raw_ids=args.raw_ids,
                num_labels=args.num_labels, label_names=args.label_names)
    dt = max(time.perf_counter() - t0, 1e-9)
    rows = {k: v["rows"] for k, v in m["splits"].items()}
    total = sum(rows.values())
    print(f"{args.out}: wrote {total:,} rows (train {rows['train']:,}, test {rows['test']:,}); "
          f"bad rows skipped: {m['source']['bad_rows_skipped']:,}; {total / dt:,.0f} rows/s")
    return 0
