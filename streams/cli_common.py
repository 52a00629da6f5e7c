"""Conventions every `profilestream` command follows (docs/operations.md has the table).

* Exit codes: :data:`EXIT_OK`, :data:`EXIT_FAILURE`, :data:`EXIT_USAGE`,
  :data:`EXIT_UNAVAILABLE`, :data:`EXIT_DECLINED`.  An operator's mistake is
  raised as :class:`CliError` and printed as one line by ``streams.cli.main``,
  never as a traceback.
* Commands that report end with one result: a short human text on stdout, or
  with ``--json`` one JSON object on stdout (logs and progress go to stderr).
* Files or directories a command writes are named by ``-o/--output``.
* Long jobs show a tqdm bar on stderr, off with ``--quiet``/``--json`` or when
  stderr is not a terminal.
* Destructive commands ask first, or take ``--yes``; without a terminal to
  ask on and no ``--yes`` they refuse.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

EXIT_OK = 0
#: The job ran and failed (events not delivered, workers not ready, ...).
EXIT_FAILURE = 1
#: Bad flags or arguments (argparse's own code).
EXIT_USAGE = 2
#: Something named does not exist or cannot be reached: a file, a directory, Kafka, a worker.
EXIT_UNAVAILABLE = 3
#: A destructive command was not confirmed.
EXIT_DECLINED = 4


class CliError(Exception):
    """An error the operator can act on: printed as one line, exits with ``code``."""

    def __init__(self, message: str, code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.code = code


class Parser(argparse.ArgumentParser):
    """The parser class of every `profilestream` sub-command: docstrings kept as written, and
    every option's default shown in its help.

    argparse's ArgumentDefaultsHelpFormatter would also print "(default: None)"
    for required options and "(default: False)" for flags, which says nothing;
    a help text that states its default itself ("default: ...") is left as
    written.  The text is set where the option is added (a public method), not
    in a formatter subclass, whose methods argparse calls implementation details.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        kwargs.setdefault("allow_abbrev", False)  # a renamed flag fails loudly instead of matching a prefix
        super().__init__(*args, **kwargs)

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        action = super().add_argument(*args, **kwargs)
        text = action.help or ""
        if not ("%(default)" in text or "default:" in text or action.required or not action.option_strings
                or action.default in (None, False, argparse.SUPPRESS)):
            action.help = f"{text} (default: %(default)s)"
        return action


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true",
                        help="print the result as one JSON object on stdout (no progress bars)")


def add_quiet_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def add_output_flag(parser: argparse.ArgumentParser, what: str, required: bool = True) -> None:
    parser.add_argument("-o", "--output", type=Path, required=required, default=None, help=what)


def add_yes_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-y", "--yes", action="store_true",
                        help="do not ask for confirmation (required when not run from a terminal)")


def show_progress(args: argparse.Namespace) -> bool:
    """Whether a long job of this command should draw a progress bar."""
    return not (getattr(args, "quiet", False) or getattr(args, "json", False)) and sys.stderr.isatty()


def progress_bar(args: argparse.Namespace, desc: str, unit: str, total: float | None = None,
                 unit_scale: bool = False) -> tqdm:
    """A tqdm bar on stderr, disabled (drawing and counting nothing) where :func:`show_progress` says so."""
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit_scale, dynamic_ncols=True,
                disable=not show_progress(args), file=sys.stderr)


def emit(args: argparse.Namespace, result: dict[str, Any], human: str) -> None:
    """The command's one result: ``result`` as JSON with ``--json``, else ``human``."""
    print(json.dumps(result) if getattr(args, "json", False) else human, flush=True)


def confirm(args: argparse.Namespace, action: str) -> None:
    """Ask "``action``? [y/N]" on the terminal unless ``--yes``; :class:`CliError` when not confirmed."""
    if args.yes:
        return
    if not sys.stdin.isatty():
        raise CliError(f"refusing to {action} without confirmation: no terminal to ask on; pass --yes",
                       EXIT_DECLINED)
    sys.stderr.write(f"{action}? [y/N] ")
    sys.stderr.flush()
    if sys.stdin.readline().strip().lower() not in ("y", "yes"):
        raise CliError(f"not confirmed: did not {action}", EXIT_DECLINED)

