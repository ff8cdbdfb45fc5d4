"""`tierec serve-many --model NAME=CHECKPOINT ...`: several models, one `tierec serve` process each, behind one
router (docs/serving.md#several-models-on-one-machine)."""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

from tierec.errors import ConfigError

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve-many", help="serve several checkpoints, one process each, under /v1/models/NAME/... "
                                          "(docs/serving.md#several-models-on-one-machine)")
    p.add_argument("--model", action="append", default=[], metavar="NAME=CHECKPOINT", required=True,
                   help="a model to serve under /v1/models/NAME/ (repeatable): a checkpoint, run directory or export")
    p.add_argument("--model-args", action="append", default=[], metavar='NAME="FLAGS"',
                   help="more `tierec serve` flags for one model, e.g. small=\"--tables dram\" or "
                        "big=\"--cache-fraction 0.02 --dense-budget 64MiB\" (its memory budget and cache)")
    p.add_argument("--model-cpus", action="append", default=[], metavar="NAME=CORES",
                   help="pin one model's process to these cores, e.g. ranker=0,1 (default: any core)")
    p.add_argument("--host", default="127.0.0.1", help="address of the router: loopback unless --allow-remote")
    p.add_argument("--port", type=int, default=8000, help="TCP port of the router (default: 8000)")
    p.add_argument("--allow-remote", action="store_true", help="let --host be a non-loopback address")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body (default: 1 MiB)")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds a model may take to answer a request before the router answers 504 (default: 60)")
    p.add_argument("--log-dir", default=None, help="where each model's server writes its log (default: a temp dir)")
    p.set_defaults(func=_serve_many)


def _serve_many(args) -> int:
    from tierec.inference.multi import create_multi_app, parse_specs, start_children, stop_children
    from tierec.inference.service import is_loopback

    if not args.allow_remote and not is_loopback(args.host):
        raise ConfigError(f"--host {args.host!r} is not a loopback address; pass --allow-remote to listen there")
    if not 0 <= args.port < 65536 or args.max_body_bytes < 1 or not args.timeout > 0:
        raise ConfigError("--port must be in [0, 65536), --max-body-bytes >= 1 and --timeout > 0")
    specs = parse_specs(args.model, args.model_args, args.model_cpus)
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="tierec-serve-many-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    children = start_children(specs, log_dir)
    try:
        app = create_multi_app(children, args.max_body_bytes, args.timeout)
        log.info("serving %s on http://%s:%d/v1/models/NAME/ (model logs in %s)", ", ".join(children), args.host,
                 args.port, log_dir)
        try:
            app.serve(args.host, args.port)  # until SIGINT / SIGTERM
        except OSError as e:
            raise ConfigError(f"--host {args.host} --port {args.port}: cannot listen there ({e.strerror or e})") from None
    finally:
        stop_children(children)
    return 0
