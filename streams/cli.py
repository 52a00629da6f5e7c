"""The `profilestream` command: one entry point for the service and the model tools."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

from models.cli import add_commands as add_model_commands
from models.loaders import FORMATS

from .ops.backfill import add_backfill_command
from .dev.bench import add_bench_command
from .ops.forget import add_forget_command
from .dev.produce import add_produce_command
from .settings import Settings
from .ops.snapshot import add_snapshot_commands


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)


def cmd_worker(args: argparse.Namespace) -> int:
    from .service.worker import run_worker
    run_worker(Settings.from_env(**({"on_model_mismatch": "reset"} if args.reset_state else {})))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .dev.demo import DemoOptions, run_demo
    run_demo(DemoOptions(rate=args.rate, users=args.users, duration_s=args.duration,
                         summary_every_s=args.summary_every, data=args.data, data_format=args.format,
                         dump_profiles=args.dump_profiles))
    return 0


def cmd_broker(args: argparse.Namespace) -> int:
    from .dev.embedded_broker import EmbeddedBroker
    log = logging.getLogger("profilestream.broker")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with EmbeddedBroker(port=args.port) as broker:
        log.info("embedded broker ready: KAFKA_BOOTSTRAP_SERVERS=%s PROFILESTREAM_EMBEDDED_BROKER=1 "
                 "(Ctrl-C stops it; memory storage, nothing is kept)", broker.bootstrap_servers)
        stop.wait()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="profilestream", description=__doc__)
    parser.add_argument("--log-level", default=None, help="overrides PROFILESTREAM_LOG_LEVEL")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("worker", help="run a worker against the configured Kafka cluster (env vars)")
    p.add_argument("--reset-state", action="store_true",
                   help="discard stored states of another model (= PROFILESTREAM_ON_MODEL_MISMATCH=reset)")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("demo", help="embedded broker + worker + traffic, no configuration needed")
    p.add_argument("--rate", type=float, default=500.0, help="synthetic events per second (or replay rate)")
    p.add_argument("--users", type=int, default=2000, help="synthetic user population")
    p.add_argument("--duration", type=float, default=None, help="stop after S seconds (default: Ctrl-C)")
    p.add_argument("--summary-every", type=float, default=5.0, help="seconds between summary lines")
    p.add_argument("--data", type=Path, default=None, help="replay this log instead of synthetic traffic")
    p.add_argument("--format", choices=FORMATS, default="jsonl", help="format of --data")
    p.add_argument("--dump-profiles", type=Path, default=None,
                   help="on stop, write the last published profile per user (JSONL)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("broker", help="run the embedded Kafka-protocol broker alone (development)")
    p.add_argument("--port", type=int, default=9092)
    p.set_defaults(func=cmd_broker)

    add_produce_command(sub)
    add_bench_command(sub)
    add_forget_command(sub)
    add_backfill_command(sub)
    add_snapshot_commands(sub)
    add_model_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level or Settings.from_env().log_level)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
