"""The operators' CLI: the conventions of every command (help, --json, -o/--output, exit
codes, one-line errors, confirmation, progress) and `profilestream status` against a
running worker on the embedded broker.

Commands run as `python -m streams.cli` subprocesses, as an operator runs them; the
conventions table of docs/operations.md is checked against the real parser.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import pty
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from tqdm import tqdm

from models import ProfileModel
from models.data import group_by_user
from models.evaluate import evaluate
from models.events import event_to_dict
from models.loaders import load_events
from streams.ops.backfill import compute, load
from streams.dev.embedded_broker import free_port
from streams.cli import build_parser
from streams.cli_common import EXIT_DECLINED, EXIT_FAILURE, EXIT_OK, EXIT_UNAVAILABLE, EXIT_USAGE
from streams.pipeline.control import CONTROL_HEADER
from streams.ops.snapshot import MANIFEST, STATES, restore, take_snapshot
from streams.ops.cluster_status import collect

from ..harness import REPO, DemoTraffic, Deployment, metric_sum, synthetic, wait_for

OPERATIONS = REPO / "docs" / "operations.md"

#: Every command and whether it reports a result (so takes --json) and runs long enough
#: for a progress bar (so takes -q/--quiet).  worker, demo and broker are services.
COMMANDS = {
    "worker": (False, False), "demo": (False, False), "broker": (False, False),
    "status": (True, False), "produce": (True, True), "bench": (True, False), "forget": (True, False),
    "backfill": (True, True), "snapshot": (True, True), "restore": (True, True),
    "train": (True, True), "evaluate": (True, True), "replay": (True, True),
}
DESTRUCTIVE = {"restore", "backfill", "forget"}


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.option_strings and a.dest != "help"}


def run_cli(*args: str, env: dict[str, str] | None = None, stdin: str | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "streams.cli", *args], cwd=REPO, text=True, capture_output=True,
                          env=env, input=stdin, stdin=None if stdin is not None else subprocess.DEVNULL,
                          timeout=timeout)


def assert_one_line_error(proc: subprocess.CompletedProcess[str], command: str, code: int, says: str) -> None:
    """Exit ``code`` and, as the last stderr line, ``profilestream <command>: error: ...`` -- no traceback."""
    assert proc.returncode == code, f"exit {proc.returncode}, not {code}:\n{proc.stdout}\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"profilestream {command}: error: ") and says in last, proc.stderr


# --- the conventions, on the real parser ------------------------------------------------

def test_every_command_is_in_the_table_and_the_docs() -> None:
    assert set(subcommands()) == set(COMMANDS)
    docs = OPERATIONS.read_text()
    for command in COMMANDS:
        assert f"| `{command}` |" in docs, f"docs/operations.md has no row for {command}"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_shows_every_default(command: str) -> None:
    parser = subcommands()[command]
    text = " ".join(parser.format_help().split())  # unwrapped
    for action in options(parser).values():
        if action.default not in (None, False) and not action.required:
            shown = f"default: {action.default}" if not isinstance(action.default, (list, tuple)) else "default:"
            help_text = " ".join((action.help or "").split())
            assert shown in text and help_text.split(" (default")[0] in text, (command, action.dest)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_flags_are_named_one_way(command: str) -> None:
    reports, long_running = COMMANDS[command]
    opts = options(subcommands()[command])
    assert ("json" in opts) == reports, command
    assert ("quiet" in opts) == long_running, command
    if "quiet" in opts:
        assert opts["quiet"].option_strings == ["-q", "--quiet"]
    assert ("yes" in opts) == (command in DESTRUCTIVE), command
    if "yes" in opts:
        assert opts["yes"].option_strings == ["-y", "--yes"]
    # Whatever a command writes is -o/--output; the old spellings are gone.
    if "output" in opts:
        assert opts["output"].option_strings == ["-o", "--output"], command
    for action in opts.values():
        assert not set(action.option_strings) & {"--out", "--dump-profiles"}, (command, action.option_strings)


def test_every_command_in_the_operations_doc_parses() -> None:
    parser = build_parser()
    commands = re.findall(r"^(?:\$ )?profilestream ([^\n#|`]+)", OPERATIONS.read_text(), flags=re.M)
    assert len(commands) >= 8
    for line in commands:
        parser.parse_args(line.replace("\\", "").split())


def test_version() -> None:
    proc = run_cli("--version")
    assert proc.returncode == 0 and re.fullmatch(r"profilestream \d+\.\d+\.\d+\S*\n", proc.stdout), proc


# --- exit codes and one-line errors for the usual mistakes --------------------------------

def fake_snapshot(path: Path, partitions: int = 4) -> Path:
    """A snapshot directory as `snapshot` writes it, holding no states."""
    path.mkdir()
    (path / MANIFEST).write_text(json.dumps({"format": 1, "partitions": partitions, "count": 0,
                                             "fingerprints": {}, "events_offsets": {}}))
    (path / STATES).write_bytes(b"")
    return path


def test_usual_mistakes_are_one_line_with_their_exit_code(deployment: Deployment, tmp_path: Path) -> None:
    env = deployment.env(tmp_path / "cli", 0)
    missing = tmp_path / "nowhere"
    events = tmp_path / "events.jsonl"
    events.write_text("")
    cases: list[tuple[list[str], str | None, str, int, str]] = [
        # (argv, stdin, command, exit code, the error says)
        (["restore", "--yes", "--from", str(missing)], None, "restore", EXIT_UNAVAILABLE, "is not a snapshot"),
        (["restore", "--from", str(fake_snapshot(tmp_path / "snap"))], None, "restore", EXIT_DECLINED, "--yes"),
        (["forget", "u1"], None, "forget", EXIT_DECLINED, "pass --yes"),
        (["forget", "--yes"], None, "forget", EXIT_USAGE, "no user ids"),
        (["forget", "--yes", "x" * 300], None, "forget", EXIT_USAGE, "not user ids"),
        (["forget", "--yes", "--ids-from", str(missing)], None, "forget", EXIT_UNAVAILABLE, str(missing)),
        (["backfill", "--rewind", "--model", str(missing), "--data", str(events), "--format", "jsonl"], None,
         "backfill", EXIT_DECLINED, "pass --yes"),
        (["evaluate", "--data", str(missing), "--format", "jsonl"], None, "evaluate", EXIT_UNAVAILABLE,
         f"No such file or directory: {missing}"),
        (["produce", "--data", str(events), "--forever"], None, "produce", EXIT_USAGE, "--forever only applies"),
        (["evaluate", "--model", str(missing), "--data", str(events), "--format", "jsonl"], None, "evaluate",
         EXIT_UNAVAILABLE, "does not exist"),
        (["replay", "--model", str(events), "--data", str(events), "--format", "jsonl", "-o", str(tmp_path / "p")],
         None, "replay", EXIT_UNAVAILABLE, "is not a readable torch file"),
    ]
    for argv, stdin, command, code, says in cases:
        assert_one_line_error(run_cli(*argv, env=env, stdin=stdin), command, code, says)

    # At a terminal the command asks; anything but y/yes declines.
    controller, terminal = pty.openpty()
    try:
        os.write(controller, b"n\n")
        proc = subprocess.run([sys.executable, "-m", "streams.cli", "restore", "--from", str(tmp_path / "snap")],
                              cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              stdin=terminal, env=env, timeout=120)
    finally:
        os.close(controller)
        os.close(terminal)
    prompt, _, after = proc.stderr.rpartition("? [y/N] ")  # the terminal, not stderr, echoed the answer
    assert "replace all user state" in prompt
    assert_one_line_error(subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout, after),
                          "restore", EXIT_DECLINED, "not confirmed")

    # Kafka unreachable: one line naming where it was looked for.
    nowhere = {**env, "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}"}
    proc = run_cli("snapshot", "-o", str(tmp_path / "out"), env=nowhere)
    assert_one_line_error(proc, "snapshot", EXIT_UNAVAILABLE, "cannot reach Kafka at 127.0.0.1:")
    # argparse's own usage errors: exit 2, its one-line message.
    proc = run_cli("snapshot", "--dump-profiles", str(tmp_path / "x"), env=env)
    assert proc.returncode == EXIT_USAGE and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("profilestream snapshot: error: ")


# --- forget: ids from arguments, a file and stdin ----------------------------------------

def forget_requests(deployment: Deployment) -> list[str]:
    return [r.key.decode() for r in deployment.read(deployment.settings.events_topic)
            if any(name == CONTROL_HEADER for name, _ in r.headers)]


def test_forget_reads_ids_from_a_file_and_stdin(deployment: Deployment, tmp_path: Path) -> None:
    env = deployment.env(tmp_path / "cli", 0)
    ids = tmp_path / "ids.txt"
    ids.write_text("file-1\n\nfile 2\nboth\n")
    proc = run_cli("forget", "--yes", "--json", "arg-1", "both", "--ids-from", str(ids), env=env)
    assert proc.returncode == EXIT_OK, proc.stderr
    assert json.loads(proc.stdout)["requested"] == 4  # "both" once
    proc = run_cli("forget", "--yes", "--ids-from", "-", env=env, stdin="stdin-1\nstdin-2\n")
    assert proc.returncode == EXIT_OK, proc.stderr
    assert "forget requested for 2 users" in proc.stdout
    # Each lands in its user's partition: the topic's order is by partition.
    assert sorted(forget_requests(deployment)) == ["arg-1", "both", "file 2", "file-1", "stdin-1", "stdin-2"]


# --- progress bars count the real work --------------------------------------------------

def counting_bar() -> tqdm:
    return tqdm(file=io.StringIO())  # enabled: it counts (a disabled bar counts nothing)


def test_progress_bars_count_the_work(deployment: Deployment, model: ProfileModel, tmp_path: Path) -> None:
    events = synthetic(600, users=40)
    path = tmp_path / "history.jsonl"
    path.write_text("".join(json.dumps(event_to_dict(e)) + "\n" for e in events))
    bar = counting_bar()
    loaded = load_events(path, "jsonl", progress=bar)
    assert len(loaded.events) == len(events) and bar.n == bar.total == path.stat().st_size

    bar = counting_bar()
    users = compute(model, loaded.events, bar)
    assert bar.n == bar.total == len(users) == 40

    settings = deployment.settings
    bar = counting_bar()
    asyncio.run(load(settings, users, progress=bar))
    assert bar.n == bar.total == 40  # the profile topic, after the changelog's 40

    bar = counting_bar()
    manifest = asyncio.run(take_snapshot(settings, tmp_path / "snap", bar))
    assert manifest["count"] == 40 and bar.n == bar.total == 40

    bar = counting_bar()
    asyncio.run(restore(settings, tmp_path / "snap", bar))
    assert bar.n == bar.total == 40

    bar = counting_bar()
    report = evaluate(model, list(group_by_user(loaded.events).values()), progress=bar)
    assert bar.n == bar.total == report["n_users"]


def test_no_progress_bar_without_a_terminal(deployment: Deployment, tmp_path: Path) -> None:
    """Captured stderr is no terminal: logs only, no bar's carriage returns."""
    proc = run_cli("produce", "--synthetic", "50", env=deployment.env(tmp_path / "cli", 0))
    assert proc.returncode == EXIT_OK and "\r" not in proc.stderr and "delivered 50 events" in proc.stdout


# --- status against a running worker ---------------------------------------------------

def status(deployment: Deployment, tmp_path: Path, *args: str, **env: str) -> tuple[int, Any]:
    proc = run_cli("status", "--json", *args, env={**deployment.env(tmp_path / "cli", 0), **env})
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def test_status_of_a_running_worker(deployment: Deployment, tmp_path: Path) -> None:
    token = "s3cret-token"
    worker = deployment.worker(PROFILESTREAM_MONITOR_INTERVAL_S="1", PROFILESTREAM_LOOKUP_TOKEN=token).start()
    url = f"http://127.0.0.1:{worker.web_port}"
    try:
        with DemoTraffic(deployment, rate=200.0, users=200):
            wait_for(lambda: metric_sum(worker.http("/metrics")[1].decode(),
                                        "profilestream_events_consumed_total") > 0, 60, what="events consumed")
            rebalances = metric_sum(worker.http("/metrics")[1].decode(), "profilestream_rebalances_total")

            # Without the token the worker refuses: exit 3, the reason names the setting.
            code, report = status(deployment, tmp_path, "--worker", url)
            assert code == EXIT_UNAVAILABLE
            assert "401" in report["workers"][0]["error"] and "PROFILESTREAM_LOOKUP_TOKEN" in report["workers"][0]["error"]

            # A seed named differently from the worker's own URL is recognised as the same worker.
            code, report = status(deployment, tmp_path, "--worker", f"http://localhost:{worker.web_port}/",
                                  "--sample-seconds", "2", PROFILESTREAM_LOOKUP_TOKEN=token)
            assert code == EXIT_OK, report
            (row,) = report["workers"]
            assert row["url"] == url and row["ready"] and row["recovered"] and not row["rebalancing"]
            assert row["partitions"] == list(range(deployment.partitions))
            assert row["recovery_remaining"] == {"active": 0, "standby": 0}
            assert row["events_per_second"] > 0 and row["lag_events"] is not None and row["lag_seconds"] is not None
            assert [p["partition"] for p in report["partitions"]] == list(range(deployment.partitions))
            for p in report["partitions"]:
                assert p["owner"] == url and 0 <= p["committed"] <= p["end"]
                assert p["lag_events"] == p["end"] - p["committed"]
            assert report["group"] == deployment.settings.app_id and report["kafka_error"] is None

            # The human table, by default.
            proc = run_cli("status", "--worker", url, "--sample-seconds", "0",
                           env={**deployment.env(tmp_path / "cli", 0), "PROFILESTREAM_LOOKUP_TOKEN": token})
            assert proc.returncode == EXIT_OK, proc.stderr
            lines = proc.stdout.splitlines()
            assert lines[0].split()[:3] == ["WORKER", "READY", "PARTITIONS"] and lines[1].startswith(f"{url}  yes")
            assert any(line.startswith("PARTITION ") for line in lines)
            # Asking does not disturb the group (status joins no group).
            assert metric_sum(worker.http("/metrics")[1].decode(), "profilestream_rebalances_total") == rebalances
    finally:
        worker.stop()

    # Worker gone: unreachable (exit 3), and Kafka still shows every partition's backlog, owned by no one.
    report = collect(deployment.settings, [url], 2.0, 0)
    assert report["exit_code"] == EXIT_UNAVAILABLE and "error" in report["workers"][0]
    assert [p["owner"] for p in report["partitions"]] == [None] * deployment.partitions


def test_status_exit_code_for_a_worker_that_is_not_ready(deployment: Deployment, tmp_path: Path) -> None:
    """A worker still starting (reachable, not ready) is degraded, exit 1, not unreachable."""
    worker = deployment.worker().start(wait_ready=False)
    try:
        def answered() -> dict[str, Any] | None:
            code, report = status(deployment, tmp_path, "--worker", f"http://127.0.0.1:{worker.web_port}",
                                  "--sample-seconds", "0")
            row = report["workers"][0]
            return report if "error" not in row else None

        report = wait_for(answered, 90, interval=0.2, what="the starting worker's /status")
        # Caught while starting or already ready: the code follows readiness either way.
        ready = report["workers"][0]["ready"]
        assert report["exit_code"] == (EXIT_OK if ready else EXIT_FAILURE)
    finally:
        worker.stop()
