"""`tierec distill-exit CHECKPOINT --out FILE`: an exit head for early exits in `tierec serve --exit-head`."""

from __future__ import annotations

import argparse
import json
import logging

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "distill-exit", help="distill a cheap exit head from a dlrm/dcnv2 checkpoint (tierec serve --exit-head)",
        description="Trains a linear head (or one small hidden layer) over the ranker's bottom output and pooled "
                    "embeddings to reproduce the ranker's probabilities on the training split, writes it to --out, "
                    "and prints per confidence threshold the share of test samples that would exit, the dense "
                    "FLOPs per sample and the AUC / log-loss against the full ranker (docs/serving.md).")
    p.add_argument("checkpoint", help="a dlrm or dcnv2 run directory or checkpoint directory")
    p.add_argument("--out", required=True, help="the exit head file to write")
    p.add_argument("--data", default=None, help="data set (default: the one the checkpoint was trained on)")
    p.add_argument("--hidden", type=int, default=0, help="hidden units of the head (0: linear; default: 0)")
    p.add_argument("--epochs", type=int, default=2, help="passes over the training rows (default: 2)")
    p.add_argument("--batch-size", type=int, default=4096, help="rows per step (default: 4096)")
    p.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate (default: 0.003)")
    p.add_argument("--max-rows", type=int, default=None, help="training rows per epoch (default: all)")
    p.add_argument("--eval-rows", type=int, default=None, help="test rows for the table (default: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the head's initialisation and shuffling")
    p.add_argument("--thresholds", default=None,
                   help="comma-separated confidence thresholds to report (default: 0.49,0.48,0.45,0.4,0.3,0.2,0)")
    p.add_argument("--json", default=None, help="also write the table as JSON here")
    p.set_defaults(func=_distill)


def _thresholds(text: str | None) -> tuple[float, ...]:
    from tierec.errors import ConfigError
    from tierec.inference.cascade import DEFAULT_THRESHOLDS

    if text is None:
        return DEFAULT_THRESHOLDS
    try:
        out = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise ConfigError(f"--thresholds {text!r}: comma-separated numbers in [0, 1]") from None
    if not out or any(not 0 <= t <= 1 for t in out):
        raise ConfigError(f"--thresholds {text!r}: comma-separated numbers in [0, 1]")
    return out


def _distill(args) -> int:
    from pathlib import Path

    from tierec.data.dataset import Dataset
    from tierec.errors import ConfigError
    from tierec.inference.cascade import (
        DistillSettings,
        check_fits,
        distill,
        format_points,
        operating_points,
        path_flops,
        save_exit_head,
        split_scores,
    )
    from tierec.inference.model_store import ServeOptions, load_model
    from tierec.train import checkpoint as ckpt

    settings = DistillSettings(args.hidden, args.epochs, args.batch_size, args.lr, args.max_rows, args.eval_rows,
                               args.seed)
    thresholds = _thresholds(args.thresholds)
    out = Path(args.out)
    if out.is_dir() or not out.parent.is_dir():
        raise ConfigError(f"--out {args.out}: must be a file in an existing directory")
    lm = load_model(args.checkpoint, ServeOptions(tables="dram", warm_rows=0))
    if lm.lookup is None or lm.kind not in ("dlrm", "dcnv2"):
        raise ConfigError(f"{args.checkpoint}: early exits need a dlrm or dcnv2 checkpoint, this is a {lm.kind} model")
    ds = Dataset(args.data or ckpt.saved_data_path(lm.manifest["config"], lm.path))
    if ds.schema.to_json() != lm.schema.to_json():
        raise ConfigError(f"{ds.root}: not the data set schema the checkpoint was trained on")
    head = distill(lm, ds, settings, progress=log.info)
    check_fits(head, lm)
    flops = path_flops(lm.model, head)
    points = operating_points(split_scores(lm, head, ds, settings.batch_size, settings.eval_rows), flops, thresholds)
    head.meta["operating_points"] = points
    save_exit_head(out, head)
    print(f"exit head for {lm.path} (step {lm.step}, {lm.kind}): {'linear' if not head.hidden else f'{head.hidden} hidden'}"
          f", {head.flops():,} FLOPs per sample; full ranker {flops[0]:,}, exit path (bottom MLP + head) {flops[1]:,}")
    print(f"test split ({points[0]['auc']:.4f} AUC for the full ranker); a sample exits when |p_head - 0.5| >= "
          "threshold:")
    print(format_points(points))
    print(f"wrote {out} (serve it: tierec serve {args.checkpoint} --exit-head {out} --exit-threshold T)")
    if args.json:
        Path(args.json).write_text(json.dumps({"checkpoint": str(lm.path), "step": lm.step, "flops": flops,
                                               "points": points}, indent=2))
    return 0
