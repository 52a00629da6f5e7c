"""The `profilestream` command: one entry point for the service, the operators' tools and the model tools.

Exit codes: 0 ok, 1 failure, 2 usage, 3 not found / unreachable, 4 not confirmed
(docs/operations.md lists every command, its flags and outputs).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import signal
import sys
import threading
from pathlib import Path

from aiokafka.errors import KafkaConnectionError
from kafka.errors import KafkaConnectionError as SyncKafkaConnectionError
from kafka.errors import KafkaTimeoutError

from models.checkpoint import CheckpointError
from models.cli import add_commands as add_model_commands
from models.loaders import FORMATS

from .cli_common import EXIT_UNAVAILABLE, CliError, Parser, add_output_flag
from .dev.bench import add_bench_command
from .dev.demo_limits import add_demo_memory_flags, limits_from_args
from .dev.produce import add_produce_command
from .ops.backfill import add_backfill_command
from .ops.cluster_status import add_status_command
from .ops.forget import add_forget_command
from .ops.snapshot import add_snapshot_commands
from .settings import Settings


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
                         dump_profiles=args.output, keep_profiles=args.keep_profiles,
                         limits=limits_from_args(args)))
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
    parser = Parser(prog="profilestream", description=__doc__)
    parser.add_argument("--version", action="version",
                        version=f"%(prog)s {importlib.metadata.version('profilestream')}")
    parser.add_argument("--log-level", default=None, help="overrides PROFILESTREAM_LOG_LEVEL")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

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
    add_output_flag(p, "on stop, write the last published profile of each user the demo keeps (see "
                       "--keep-profiles) to this JSONL file", required=False)
    add_demo_memory_flags(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("broker", help="run the embedded Kafka-protocol broker alone (development)")
    p.add_argument("--port", type=int, default=9092, help="Kafka port to listen on")
    p.set_defaults(func=cmd_broker)

    add_status_command(sub)
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
    try:
        return int(args.func(args) or 0)
    except CliError as exc:
        return _fail(args, str(exc), exc.code)
    except (KafkaConnectionError, SyncKafkaConnectionError, KafkaTimeoutError) as exc:
        return _fail(args, f"cannot reach Kafka at {Settings.from_env().bootstrap_servers} "
                           f"(KAFKA_BOOTSTRAP_SERVERS): {exc}", EXIT_UNAVAILABLE)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as exc:
        return _fail(args, f"{exc.strerror}: {exc.filename}", EXIT_UNAVAILABLE)
    except CheckpointError as exc:  # --model: missing, not a checkpoint, corrupt, or for other code
        return _fail(args, str(exc), EXIT_UNAVAILABLE)


def _fail(args: argparse.Namespace, message: str, code: int) -> int:
    """One line on stderr, as argparse reports usage errors; no traceback for an operator's mistake.

    Only the message's first line: some libraries' messages (torch.load's) go on with advice.
    """
    first = message.strip().splitlines()[0] if message.strip() else "(no message)"
    sys.stderr.write(f"profilestream {args.command}: error: {first}\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
