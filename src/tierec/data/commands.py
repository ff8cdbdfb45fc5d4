"""`tierec data ...`: make and inspect data sets."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    from tierec.data import convert, synth

    data = sub.add_parser("data", help="make and inspect data sets (synth, convert, info, verify)")
    dsub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)

    p = dsub.add_parser("synth", help="generate a synthetic Criteo-shaped data set, reproducible from a seed",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    synth.add_arguments(p)
    p.set_defaults(func=synth.main)

    p = dsub.add_parser("convert", help="convert Criteo / libSVM / MovieLens text into a tierec data set",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    convert.add_arguments(p)
    p.set_defaults(func=convert.main)

    p = dsub.add_parser("info", help="print a data set's schema and row counts")
    p.add_argument("dataset", help="data set directory")
    p.set_defaults(func=_info)

    p = dsub.add_parser("verify", help="check every file of a data set against its manifest's sha256")
    p.add_argument("dataset", help="data set directory")
    p.set_defaults(func=_verify)


def _info(args) -> int:
    from tierec.data.dataset import Dataset

    ds = Dataset(args.dataset)
    m = dict(ds.manifest)
    m["splits"] = {k: {"rows": v["rows"], "files": len(v["files"])} for k, v in m["splits"].items()}
    print(json.dumps(m, indent=2))
    return 0


def _verify(args) -> int:
    from tierec.data.dataset import Dataset

    ds = Dataset(args.dataset)
    ds.verify()
    print(f"{args.dataset}: OK ({sum(ds.num_rows(s) for s in ds.splits)} rows, checksums match)")
    return 0
