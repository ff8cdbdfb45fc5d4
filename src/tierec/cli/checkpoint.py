"""`tierec checkpoint`: list, verify and compact a run's checkpoints (incremental chains included)."""

from __future__ import annotations

import argparse
import json
import logging

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("checkpoint", help="list, verify or compact checkpoints",
                       description="A run's checkpoints: a full one, then incremental ones that hold only the rows "
                                   "changed since the previous (see docs/training.md, 'Checkpoints').")
    cmds = p.add_subparsers(dest="checkpoint_command", metavar="{list,verify,compact}", required=True)
    ls = cmds.add_parser("list", help="every checkpoint of a run: step, full or incremental, rows, bytes")
    ls.add_argument("run", metavar="RUN", help="a run directory (or its checkpoints directory)")
    ls.set_defaults(func=_list)
    v = cmds.add_parser("verify", help="check every file of a checkpoint and of the chain below it",
                        description="Checks the manifests, the dense state and every table file (row sets chunk "
                                    "by chunk) of a checkpoint and of every checkpoint its chain needs.")
    v.add_argument("path", metavar="PATH", help="a run directory (its newest checkpoint) or a checkpoint directory")
    v.add_argument("--json", action="store_true", help="print the result as JSON")
    v.set_defaults(func=_verify)
    c = cmds.add_parser("compact", help="fold an incremental checkpoint's chain into one full checkpoint",
                        description="Writes CHECKPOINT-full beside it: the newest version of every row of the chain, "
                                    "the same dense state and step, no chain (eval, serve and resume then read one "
                                    "checkpoint). When it is the newest checkpoint it becomes LATEST.")
    c.add_argument("path", metavar="PATH", help="a run directory (its newest checkpoint) or a checkpoint directory")
    c.add_argument("--keep", type=int, default=None,
                   help="checkpoints to keep after compacting the newest (default: all the chain used)")
    c.set_defaults(func=_compact)


def _list(args) -> int:
    from pathlib import Path

    from tierec.errors import CheckpointError
    from tierec.train import checkpoint as ckpt

    root = Path(args.run)
    root = root / "checkpoints" if (root / "checkpoints").is_dir() else root
    if not root.is_dir():
        raise CheckpointError(f"{args.run}: no checkpoints directory")
    latest = ckpt.latest_or_none(root.parent)
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and ".tmp-" not in p.name)
    print(f"{'checkpoint':<24} {'step':>8} {'kind':<18} {'rows':>12} {'bytes':>14}")
    for d in dirs:
        try:
            m = ckpt.read_manifest(d)
        except CheckpointError as e:
            print(f"{d.name:<24} unreadable: {e}")
            continue
        rows = sum(e.get("rows", 0) for e in m["files"].values())
        nbytes = sum(e["bytes"] for e in m["files"].values())
        chain = m.get("chain") or []
        kind = f"incremental ({len(chain) + 1})" if chain else "full"
        mark = " <- LATEST" if latest == d else ""
        print(f"{d.name:<24} {m['step']:>8} {kind:<18} {rows:>12,} {nbytes:>14,}{mark}")
    return 0


def _verify(args) -> int:
    from tierec.train import checkpoint as ckpt

    path = ckpt.resolve_checkpoint(args.path)
    res = ckpt.verify_checkpoint(path)
    if args.json:
        print(json.dumps({"checkpoint": str(path), **res}))
    else:
        print(f"{path}: OK ({len(res['links'])} checkpoint(s) checked: {', '.join(res['links'])}; "
              f"{res['tables']} tables, {res['bytes']:,} bytes)")
    return 0


def _compact(args) -> int:
    from tierec.errors import ConfigError
    from tierec.train import checkpoint as ckpt

    if args.keep is not None and args.keep < 1:
        raise ConfigError(f"--keep must be >= 1, got {args.keep}")
    path = ckpt.resolve_checkpoint(args.path)
    out = ckpt.compact_checkpoint(path, args.keep)
    print(f"{path}: already full" if out == path else f"{path} -> {out}")
    return 0
