"""The quiet console: the story on screen, everything else in the log file (real processes, real Ray)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from features import console


def _run(code: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        timeout=300,
    )


def test_a_session_puts_the_story_on_screen_and_the_chatter_in_the_log(tmp_path):
    log = tmp_path / "run" / "run.log"
    done = _run(
        f"""
        import os, sys, warnings
        from features import console
        with console.session({str(log)!r}):
            print("python chatter")
            os.write(1, b"C++ chatter on fd 1\\n")
            os.write(2, b"C++ chatter on fd 2\\n")
            warnings.warn("a deprecation")
            console.story("epoch 1: valid/click/auc 0.7000")
            for _ in console.progress(range(3), desc="scoring"):
                pass
            console.error("error: a bad value")
        print("after the session")
        """,
        tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["epoch 1: valid/click/auc 0.7000", "after the session"]
    assert "error: a bad value" in done.stderr and "scoring" not in done.stderr  # no bar into a pipe
    assert "chatter" not in done.stdout + done.stderr and "deprecation" not in done.stderr
    text = log.read_text()
    for line in ("python chatter", "C++ chatter on fd 1", "C++ chatter on fd 2", "a deprecation", "epoch 1"):
        assert line in text


def test_an_exception_reaches_the_screen_in_full_and_the_log(tmp_path):
    log = tmp_path / "run.log"
    done = _run(
        f"""
        from features import console
        with console.session({str(log)!r}):
            print("before")
            raise RuntimeError("the real cause")
        """,
        tmp_path,
    )
    assert done.returncode == 1
    assert "Traceback" in done.stderr and "RuntimeError: the real cause" in done.stderr
    assert "RuntimeError: the real cause" in log.read_text() and "before" in log.read_text()


def test_verbose_redirects_nothing(tmp_path, capsys):
    with console.session(tmp_path / "run.log", verbose=True):
        print("chatter")
        console.story("story")
    assert capsys.readouterr().out == "chatter\nstory\n"
    assert not (tmp_path / "run.log").exists()


def test_ray_workers_story_reaches_the_screen_and_their_chatter_the_log(tmp_path):
    log = tmp_path / "run.log"
    done = _run(
        f"""
        import ray
        from features import console
        from recsys.runtime import init_ray
        with console.session({str(log)!r}):
            init_ray("scoring", num_cpus=1)
            @ray.remote
            def work():
                print("worker chatter")
                console.story("a story line from a worker")
                return 1
            assert ray.get(work.remote()) == 1
            import time; time.sleep(2)  # Ray forwards worker output in batches
            ray.shutdown()
        """,
        tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines() == ["a story line from a worker"]
    assert "worker chatter" in log.read_text() and "worker chatter" not in done.stdout + done.stderr
    assert console.MARK not in done.stdout


@pytest.mark.parametrize("purpose", ["nonsense"])
def test_init_ray_names_a_bad_purpose(purpose):
    from recsys.runtime import init_ray

    with pytest.raises(ValueError, match="init_ray: purpose: expected one of .*'nonsense'"):
        init_ray(purpose)


def test_progress_bars_are_drawn_on_a_terminal_and_not_into_a_file(tmp_path):
    import fcntl
    import os
    import pty
    import struct
    import termios

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 24 rows, 100 columns
    with os.fdopen(follower, "w") as tty, open(tmp_path / "out.txt", "w") as plain:
        for stream in (tty, plain):
            for _ in console.progress(range(3), desc="scoring", file=stream):
                pass
    drawn = b""
    while True:  # one read returns what the terminal holds at that moment: read until it is drained
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # EIO: the terminal's other side is closed and nothing is left
            break
        if not chunk:
            break
        drawn += chunk
    drawn = drawn.decode()
    os.close(leader)
    assert "scoring: 100%" in drawn
    assert (tmp_path / "out.txt").read_text() == ""


def test_a_nested_session_writes_to_the_outer_log(tmp_path):
    done = _run(
        f"""
        from features import console
        with console.session({str(tmp_path / "outer.log")!r}) as outer:
            with console.session({str(tmp_path / "inner.log")!r}) as inner:
                print("inner chatter")
            assert inner == outer, (inner, outer)
        """,
        tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "inner chatter" in (tmp_path / "outer.log").read_text()
    assert not (tmp_path / "inner.log").exists()


def test_without_a_session_a_workers_story_prints_without_its_mark(tmp_path):
    done = _run(
        """
        import time
        import ray
        from features import console
        from recsys.runtime import init_ray
        init_ray("scoring", num_cpus=1)
        @ray.remote
        def work():
            console.story("a story line from a worker")
        ray.get(work.remote())
        time.sleep(2)  # Ray forwards worker output in batches
        ray.shutdown()
        """,
        tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "a story line from a worker" in done.stdout and console.MARK not in done.stdout


def test_a_failed_command_still_says_where_its_log_is(tmp_path):
    done = _run(
        f"""
        import argparse
        from pipelines.cli import quiet_console
        args = argparse.Namespace(verbose=False, log_file=None)
        with quiet_console(args, {str(tmp_path / "run.log")!r}):
            raise RuntimeError("the real cause")
        """,
        tmp_path,
    )
    assert done.returncode == 1 and "RuntimeError: the real cause" in done.stderr
    assert f"log: {tmp_path / 'run.log'}" in done.stdout
