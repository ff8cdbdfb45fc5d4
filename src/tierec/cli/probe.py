"""`tierec probe`: what the device under the SSD tier delivers (random reads at several queue depths)."""

from __future__ import annotations

import argparse
import json
import logging

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "probe", help="measure the SSD tier's device: random 4 KiB O_DIRECT reads (rate, latency tail)",
        description="Random 4 KiB O_DIRECT reads of table files (or of a scratch file) at several queue depths: "
                    "reads/s and latency p50/p99/p99.9, and the share of time the device stalled (a read slower "
                    "than 10 ms). A training step or a served request that misses N rows needs about N reads.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("paths", nargs="*", metavar="PATH",
                   help="table files (*.tbl), or folders searched for them (a run, a checkpoint)")
    p.add_argument("--scratch", metavar="DIR", help="no table files yet: write a scratch file in DIR, probe, remove it")
    p.add_argument("--size", default="1GiB", help="size of the --scratch file")
    p.add_argument("--queue-depths", default="1,8,32", help="reads in flight, comma-separated")
    p.add_argument("--seconds", type=float, default=2.0, help="per queue depth")
    p.add_argument("--json", metavar="FILE", help="also write the figures here")
    p.set_defaults(func=_probe)


def _probe(args) -> int:
    from pathlib import Path

    from tierec.config import parse_bytes
    from tierec.errors import ConfigError
    from tierec.storage.probe import probe_reads, scratch_file, table_files

    try:
        qds = tuple(int(x) for x in args.queue_depths.split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"--queue-depths: comma-separated integers, got {args.queue_depths!r}") from None
    if bool(args.paths) == bool(args.scratch):
        raise ConfigError("name table files / folders, or --scratch DIR (one of the two)")
    scratch = scratch_file(args.scratch, parse_bytes(args.size, "--size")) if args.scratch else None
    try:
        files = [scratch] if scratch else table_files(args.paths)
        total = sum(f.stat().st_size for f in files)
        print(f"random {4096} B reads over {len(files)} file(s), {total / 2**30:.2f} GiB, {args.seconds:g} s per depth")
        res = probe_reads(files, qds, args.seconds)
    finally:
        if scratch is not None:
            scratch.unlink(missing_ok=True)
    for r in res:
        print(r.line())
    if not all(r.direct for r in res):
        print("note: these files refused O_DIRECT, so the reads came from the page cache (memory), not the device")
    if args.json:
        Path(args.json).write_text(json.dumps([r.to_dict() for r in res], indent=2))
    return 0
