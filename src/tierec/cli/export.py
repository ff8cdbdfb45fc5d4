"""`tierec export CHECKPOINT --out DIR --row-dtype DTYPE`: a serving export of a checkpoint (docs/serving.md)."""

from __future__ import annotations

import argparse

from tierec.storage.quantized import ROW_DTYPES

HELP_DTYPE = ("how the tables' rows are stored: fp32 (the checkpoint's weights as they are), fp16 or bf16 (half "
              "the bytes, rounded to nearest), int8 (row-wise: uint8 codes + a float32 scale and bias per row, "
              "FBGEMM's fused 8-bit layout; dim 64: 72 B a row instead of 256), int4 (two codes a byte + scale and "
              f"bias; dim 64: 40 B). One of: {', '.join(ROW_DTYPES)}")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a checkpoint for serving, its tables as fp32/fp16/bf16/int8/int4 rows",
                       description="Writes DIR: the checkpoint's table weights (no optimizer state) as row files in "
                                   "the chosen dtype, its dense weights, config and schema, and a manifest with "
                                   "every file's sha256 (per 1M-row chunk for tables). `tierec serve DIR` serves "
                                   "it: tables in DRAM or read from the row files behind the DRAM cache, decoded "
                                   "after the gather (docs/serving.md, 'Quantized rows').")
    p.add_argument("checkpoint", metavar="CHECKPOINT",
                   help="a run directory (its newest checkpoint), its checkpoints directory or one step-N directory")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="the export directory to write (written beside it under a temporary name, then renamed)")
    p.add_argument("--row-dtype", required=True, metavar="DTYPE", help=HELP_DTYPE)
    p.add_argument("--overwrite", action="store_true", help="replace DIR if it holds an export already")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="a progress bar over the tables' rows (on a terminal)")
    p.set_defaults(func=_export)


def _export(args) -> int:
    from tierec.inference.export import write_export

    m = write_export(args.checkpoint, args.out, args.row_dtype, overwrite=args.overwrite, progress=args.progress)
    nbytes = sum(e["bytes"] for e in m["files"].values())
    rows = sum(t["num_embeddings"] for t in m["tables"])
    rb = m["tables"][0]["row_bytes"] if m["tables"] else 0
    print(f"{args.out}: step {m['step']}, {len(m['tables'])} tables, {rows:,} rows of {m['row_dtype']} "
          f"({rb} B each), {nbytes:,} bytes")
    return 0
