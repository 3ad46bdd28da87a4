"""A quiet console: the run's story on screen, library chatter in the run's log file.

A command line wraps its work in :func:`session`. Inside it, file descriptors 1 and 2 point at the log file,
so everything written to them (FBGEMM's C++ messages, TBE settings, the planner's tables, warnings, Ray's
own output and what its workers print) lands there. The story reaches the screen through :func:`story`
and :func:`progress` only. Errors still reach the screen in full: the session restores the screen before an
exception leaves it, and the traceback goes into the log as well.

Ray workers and actors cannot write to the screen of the command that started them: their ``story`` lines
carry a mark (an invisible separator), and ``recsys.runtime.init_ray`` replaces Ray's printer of worker
output in the driver by one that puts marked lines on the screen and the rest in the log. Without a
session (tests, notebooks, ``--verbose``) everything prints as it always did.

Example:
    >>> with session("run.log", verbose=True):  # doctest: +SKIP
    ...     story("epoch 1: valid/click_auc 0.7123")
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import traceback
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

MARK = "\u2063"  # INVISIBLE SEPARATOR: starts a story line printed by a Ray worker or actor


class _Session:
    def __init__(self, path: Path, log: IO[str], out: IO[str], err: IO[str]) -> None:
        self.path = path
        self.log = log
        self.out = out  # the screen's standard output: the story
        self.err = err  # the screen's standard error: progress bars and errors

    def story(self, message: str, *, error: bool = False) -> None:
        screen = self.err if error else self.out
        before, after = _around_story if is_tty(screen) else (None, None)
        if before is not None:
            before()
        for stream in (screen, self.log):
            stream.write(message + "\n")
            stream.flush()
        if after is not None:
            after()


def is_tty(stream: IO[str]) -> bool:
    """Whether ``stream`` is a terminal (False for a closed or fd-less stream)."""
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


_session: _Session | None = None
# Held while a session starts or ends, and by whoever writes through a session from another thread (Ray's
# printer of worker output), so that no thread writes to a log that is being closed.
lock = threading.RLock()
_around_story: tuple[Callable[[], None] | None, Callable[[], None] | None] = (None, None)


def around_story(before: Callable[[], None], after: Callable[[], None]) -> None:
    """Calls ``before`` and ``after`` around every story line written to a terminal.

    For progress bars drawn by others (Ray's, in ``recsys.runtime``): hidden before a line, redrawn after.
    """
    global _around_story
    _around_story = (before, after)


def story(message: str) -> None:
    """Prints one line of the run's story (on screen and into the log)."""
    if _session is not None:
        _session.story(message)
    elif _in_ray_worker():
        # Not print(): Ray Train patches it in its workers to print and log each line, so it came twice.
        sys.stdout.write(MARK + message + "\n")
        sys.stdout.flush()
    else:
        print(message, flush=True)


def _in_ray_worker() -> bool:
    """True in a process that Ray started for a task or an actor (its output is forwarded, not shown).

    Looked up among the loaded modules: this package does not depend on Ray, and a process that has not
    loaded Ray is no Ray worker.
    """
    ray_worker = sys.modules.get("ray._private.worker")
    worker = getattr(ray_worker, "global_worker", None)
    return worker is not None and getattr(worker, "mode", None) == getattr(ray_worker, "WORKER_MODE", -1)


def current() -> _Session | None:
    """The active session of this process (its ``log``, ``out`` and ``err`` streams), or None."""
    return _session


def error(message: str) -> None:
    """Prints an error line on the screen's standard error (and into the log)."""
    if _session is not None:
        _session.story(message, error=True)
    else:
        print(message, file=sys.stderr, flush=True)


def terminal() -> IO[str]:
    """The stream progress bars write to: the screen inside a session, else ``sys.stderr``."""
    return _session.err if _session is not None else sys.stderr


def progress(iterable: Iterable[Any] | None = None, **kwargs: Any) -> Any:
    """A tqdm progress bar on the screen if it is a terminal (see :func:`terminal`); keywords go to tqdm."""
    from tqdm.auto import tqdm

    kwargs.setdefault("file", terminal())
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("disable", None)  # drawn on a terminal only: in a file or a pipe a bar is noise
    return tqdm(iterable, **kwargs)


def _screen(stream: IO[str], fd: int) -> tuple[IO[str], bool]:
    """The screen behind ``stream``: a new stream on a copy of ``fd`` if ``stream`` writes to ``fd``.

    A stream that writes elsewhere (pytest's ``capsys``, a notebook) stays the screen. The second value
    says whether a new stream was opened (and is to be closed).
    """
    try:
        if stream.fileno() == fd:
            return os.fdopen(os.dup(fd), "w", buffering=1), True
    except (AttributeError, OSError, ValueError):
        pass
    return stream, False


@contextlib.contextmanager
def session(log_file: str | Path, *, verbose: bool = False) -> Iterator[Path]:
    """Sends everything written to standard output and error to ``log_file`` (appended) for the block.

    Both the file descriptors 1 and 2 (so what C++ libraries and child processes write) and Python's
    ``sys.stdout`` and ``sys.stderr`` go to the log; :func:`story`, :func:`error` and :func:`progress`
    reach the screen. With ``verbose`` nothing is redirected. Yields the log's path.
    """
    global _session
    if _session is not None:  # nested: everything already goes to the outer session's log
        yield _session.path
        return
    path = Path(log_file).resolve()
    if verbose:
        yield path
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    (out, own_out), (err, own_err) = _screen(sys.stdout, 1), _screen(sys.stderr, 2)
    saved_fds, saved_streams = (os.dup(1), os.dup(2)), (sys.stdout, sys.stderr)
    log = open(path, "a", buffering=1)  # noqa: SIM115 - closed below, after the screen is back
    with lock:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        sys.stdout = sys.stderr = log
        _session = _Session(path, log, out, err)
    try:
        yield path
    except BaseException:
        log.write(traceback.format_exc())
        raise
    finally:
        with lock:
            _session = None
            log.flush()
            sys.stdout, sys.stderr = saved_streams
            os.dup2(saved_fds[0], 1)
            os.dup2(saved_fds[1], 2)
            for fd in saved_fds:
                os.close(fd)
            for stream, own in ((out, own_out), (err, own_err)):
                if own:
                    stream.close()
            log.close()
