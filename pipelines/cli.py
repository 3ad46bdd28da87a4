"""What every command line shares: ``--verbose`` and ``--log-file``, and the quiet console around its work.

A command's story (progress bars, one line per step, the summary) is on screen; library chatter goes to a
log file in the run's folder (see :mod:`features.console`); ``--verbose`` puts both on screen.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from pathlib import Path

from features import console


def add_console_flags(parser: argparse.ArgumentParser, default_log: str) -> None:
    """Adds ``--verbose`` and ``--log-file`` (default: ``default_log``, described in the help)."""
    group = parser.add_argument_group("console")
    group.add_argument(
        "--verbose", action="store_true", help="library output (FBGEMM, Ray, the planner) on screen too"
    )
    group.add_argument("--log-file", help=f"where library output goes (default: {default_log})")


@contextlib.contextmanager
def quiet_console(args: argparse.Namespace, default_log: str | Path) -> Iterator[Path]:
    """The quiet console for the block: library output into the log file, the story on screen."""
    log = None
    try:
        with console.session(args.log_file or default_log, verbose=args.verbose) as log:
            yield log
    finally:
        if log is not None and not args.verbose:
            console.story(f"log: {log}")  # after a failure too: the full story is there


def fail(exc: BaseException, status: int = 2) -> int:
    """Prints ``error: <reason>`` on screen and returns the exit status: 2 for bad input by default."""
    console.error(f"error: {exc}")
    return status
