"""Environment for the processes that run the model: Ray Train workers and scoring actors.

glibc's ``malloc`` serves every block above its mmap threshold (128 KiB at first, adapting up to 32 MiB)
with a fresh ``mmap`` and gives it back to the kernel when freed. A training step allocates and frees the
same activations every time (a ``(2048, 2048)`` float tensor is 16 MiB), so each step page-faults them in
again (measured in docs/performance.md). Keeping such blocks in the heap, and not trimming it, lets steps
reuse them. The memory kept is bounded by the peak of one step, so memory stays flat in the number of rows.
Tunables are read when a process starts, hence an environment variable for the processes Ray starts.

Example:
    >>> model_process_env({})["GLIBC_TUNABLES"]
    'glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=1073741824'
"""

from __future__ import annotations

import os
import secrets
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=1073741824"


def model_process_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment variables for a process that runs the model (to merge into a Ray ``runtime_env``).

    Args:
        environ: the environment to extend (default ``os.environ``); tunables already set there are kept
            and take precedence over ours.
    """
    current = (os.environ if environ is None else environ).get("GLIBC_TUNABLES", "")
    mine = {part.split("=")[0] for part in current.split(":") if part}
    ours = [t for t in MALLOC_TUNABLES.split(":") if t.split("=")[0] not in mine]
    return {"GLIBC_TUNABLES": ":".join([*ours, *([current] if current else [])])}


def reexec_with_model_env() -> None:
    """Restarts this command with :func:`model_process_env` set, unless it is set already.

    For benchmarks that run the model in their own process: their plain-loop figures then use the same
    allocator settings as the Ray workers they are compared with. Call it first thing in ``__main__``.
    """
    env = model_process_env()
    if os.environ.get("GLIBC_TUNABLES", "") != env["GLIBC_TUNABLES"]:
        os.execve(sys.executable, sys.orig_argv, {**os.environ, **env})


def embedded_ray_env() -> None:
    """Environment for a Ray cluster this process starts itself (``ray.init`` without an address).

    Ray starts its workers at nice 15 (``RAY_worker_niceness``), below its own processes (raylet, GCS,
    dashboard, log monitor), whose many small wake-ups then preempt the training threads (measured in
    docs/performance.md). A cluster started to train has no other work: its workers run at the normal
    priority, unless the variable is already set. Call it before ``ray.init``.
    """
    os.environ.setdefault("RAY_worker_niceness", "0")


PURPOSES = ("training", "tuning", "scoring")


def init_ray(
    purpose: str,
    *,
    address: str | None = None,
    num_cpus: int | None = None,
    object_store_memory: int | None = None,
) -> bool:
    """Connects to the cluster ``RAY_ADDRESS`` names, or starts an embedded local one: the one bootstrap.

    An embedded cluster runs its workers at the normal priority (:func:`embedded_ray_env`). Its gRPC
    servers (GCS, raylet, object manager, the agents) listen on all interfaces, at the node's address (Ray
    turns 127.0.0.1 into it); Ray's token authentication, on by default for a cluster ``ray.init`` starts,
    protects them, and its token file is readable by its owner only (:func:`protect_ray_token`).
    Training and tuning start its dashboard, whose HTTP server listens on 127.0.0.1: it serves the State
    API, which Ray Train's PlacementGroupCleaner polls; without it the cleaner logged "Failed to query Ray
    Train Controller actor state" every few seconds, and the CPUs of trials ASHA stopped were never freed.
    Scoring needs no dashboard (Ray still starts its API server, with one module and no web page). Worker
    output reaches this process, where :mod:`features.console` keeps the run's story on screen and the rest
    in the log file.

    Args:
        purpose: ``training``, ``tuning`` or ``scoring``.
        address: the cluster to connect to (default ``RAY_ADDRESS``; neither: an embedded cluster).
        num_cpus: logical CPUs of an embedded cluster (default: this machine's); ignored for a cluster.
        object_store_memory: bytes of an embedded cluster's object store (default: Ray's).

    Returns:
        True if this call started or connected Ray (the caller shuts it down), False if it was running.
    """
    import logging

    import ray

    if purpose not in PURPOSES:
        raise ValueError(f"init_ray: purpose: expected one of {list(PURPOSES)}, got {purpose!r}")
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    with_dashboard = purpose != "scoring" and dashboard_available()
    dashboard: dict[str, Any] = {"include_dashboard": with_dashboard}
    if with_dashboard:
        dashboard["dashboard_host"] = "127.0.0.1"
    protect_ray_token(create=not address)
    if address:
        ray.init(address=address, logging_level=logging.WARNING, **dashboard)
    else:
        embedded_ray_env()
        ray.init(
            num_cpus=num_cpus,
            object_store_memory=object_store_memory,
            logging_level=logging.WARNING,
            **dashboard,
        )
    route_ray_output()
    return True


def protect_ray_token(create: bool) -> None:
    """Makes Ray's token file readable by its owner only (mode 0600): the token lets one run code on Ray.

    Ray turns token authentication on for a cluster ``ray.init`` starts, and writes a missing
    ``~/.ray/auth_token`` with the umask's mode (0644: any local user could read it). With ``create``, the
    file is made here first, 0600, the way Ray makes it (64 hex digits); an existing token file of this
    user is set to 0600. Nothing happens where the token comes from ``RAY_AUTH_TOKEN``, or where
    ``RAY_AUTH_MODE`` turns authentication off.

    Args:
        create: write a missing token file (before ``ray.init`` starts a cluster, which would write one).
    """
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_MODE", "token").lower() != "token":
        return
    explicit = os.environ.get("RAY_AUTH_TOKEN_PATH")
    path = Path(explicit) if explicit else Path.home() / ".ray" / "auth_token"
    if create and not explicit and not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".auth_token.", suffix=".tmp")  # mode 0600
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_hex(32))  # ray._private.authentication's generator
            os.link(tmp, path)  # complete when it appears; another process's token, if first, is kept
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
    try:
        info = path.stat()
        if info.st_uid == os.getuid() and info.st_mode & 0o077:
            os.chmod(path, 0o600)
    except FileNotFoundError:
        pass  # no token file: Ray reports it if it needs one


def dashboard_available() -> bool:
    """Whether Ray's dashboard can start here: ``ray[default]``'s packages import.

    A minimal Ray install (``pip install ray``, as carried to a GPU machine by ``benchmarks/gpu_pack.py``)
    lacks them; Ray then runs without the dashboard, and Ray Train's PlacementGroupCleaner logs that it
    cannot query the controller's state (into the log file, not on screen).
    """
    import logging

    try:
        import ray.dashboard.optional_deps  # noqa: F401
    except ImportError as error:
        logging.getLogger(__name__).warning("Ray's dashboard is off: %s (install ray[default])", error)
        return False
    return True


def route_ray_output() -> None:
    """Routes what Ray workers print, in this (the driver's) process: the story to the screen.

    Replaces the handler ``ray.init`` registers with Ray's driver-side dispatcher of worker output. In a
    :func:`features.console.session`, lines marked by :func:`features.console.story` go to the screen,
    progress bars of ``ray.experimental.tqdm_ray`` are drawn on the screen if it is a terminal, and the
    rest goes to the log with Ray's ``(name pid=...)`` prefixes. Outside a session everything is printed
    by Ray's own printer, the marks taken off.
    """
    from ray._private import worker as ray_worker

    from features import console

    dispatcher = ray_worker.global_worker_stdstream_dispatcher
    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", _print_ray_lines)
    # A story line goes above Ray's progress bars, as Ray's own printer puts worker output.
    console.around_story(ray_worker.hide_tqdm, ray_worker.restore_tqdm)


def _print_ray_lines(data: dict[str, Any]) -> None:
    from ray._private import worker as ray_worker

    from features import console

    with console.lock:  # the session cannot end (and close its log) while these lines are written
        session = console.current()
        if session is None:
            lines = [line.removeprefix(console.MARK) for line in data.get("lines", [])]
            ray_worker.print_to_stdstream({**data, "lines": lines}, ignore_prefix=False)
        else:
            _into_session(session, data)


def _into_session(session: Any, data: dict[str, Any]) -> None:
    import contextlib

    from ray._private import worker as ray_worker
    from ray.experimental.tqdm_ray import RAY_TQDM_MAGIC

    from features import console

    # Bars redraw in place on a terminal; in a file they are noise. Ray Train's workers print each bar
    # update twice (their patched print also logs it, to stderr): the stdout copy is drawn.
    bars = console.is_tty(session.err) and not data.get("is_err")
    rest = []
    for line in data.get("lines", []):
        if line.startswith(console.MARK):
            session.story(line[len(console.MARK) :])
        elif RAY_TQDM_MAGIC in line:
            if bars:
                with contextlib.redirect_stderr(session.err):
                    ray_worker.process_tqdm(line)
        else:
            rest.append(line)
    if rest:
        # Written here rather than by Ray's printer, which redraws the progress bars around every line.
        who = data.get("actor_name") or data.get("task_name") or ""
        prefix = f"({who + ' ' if who else ''}pid={data.get('pid')}) "
        session.log.write("".join(prefix + line + "\n" for line in rest))
        session.log.flush()
