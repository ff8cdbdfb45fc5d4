"""`tierec data ...`: make and inspect data sets."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    from tierec.data import convert, synth

    data = sub.add_parser("data", help="make and inspect data sets (synth, convert, cluster, info, verify)")
    dsub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)

    p = dsub.add_parser("synth", help="generate a synthetic Criteo-shaped data set, reproducible from a seed",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    synth.add_arguments(p)
    p.set_defaults(func=synth.main)

    p = dsub.add_parser("convert", help="convert Criteo / libSVM / MovieLens text into a tierec data set",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    convert.add_arguments(p)
    p.set_defaults(func=convert.main)

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

    p = dsub.add_parser("verify", help="check every file of a data set against its manifest's sha256 and "
                                          "row-group and footer checksums")
    p.add_argument("dataset", help="data set directory")
    p.set_defaults(func=_verify)


def _info(args) -> int:
    from tierec.data.dataset import Dataset

    ds = Dataset(args.dataset)
    m = dict(ds.manifest)
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
