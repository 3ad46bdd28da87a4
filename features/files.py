"""Atomic file writes: a reader sees the old file or folder or the new one, never a part.

Every write goes to a temporary name in the target's folder (same file system) and is renamed over the
target in one step: :func:`atomic_write` for a whole content at once, :func:`staged_file` for a file
written piece by piece, :func:`staged_dir` and :func:`replace_dir` for folders.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _read_umask() -> int:
    mask = os.umask(0)  # the only way to read it; once, at import, before threads write files
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def atomic_write(path: str | Path, data: str | bytes, *, fsync: bool = True) -> None:
    """Writes ``data`` (text as UTF-8) to ``path`` atomically; creates the folder if needed.

    Args:
        path: the file to write.
        data: its whole content.
        fsync: flush the data to disk before the rename, so a crash leaves the old or the new file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; a written file gets the usual mode
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def staged_file(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path beside ``path`` to write, then renames it onto ``path``.

    For files written piece by piece (a Parquet writer, a copy). If the block fails, the temporary file
    is removed and ``path`` is left as it was.

    Example:
        >>> with staged_file("out/history.parquet") as tmp:  # doctest: +SKIP
        ...     table.write_parquet(tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def staged_dir(path: str | Path) -> Iterator[Path]:
    """Yields an empty temporary folder beside ``path`` to fill, then puts it in place of ``path``.

    An existing ``path`` is renamed away first and deleted last (:func:`replace_dir`). If the block fails,
    the temporary folder is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        yield tmp
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(new: str | Path, target: str | Path) -> None:
    """Moves folder ``new`` to ``target``; an old ``target`` is renamed away first and deleted last.

    Two renames, so that ``target`` is missing only between them and never half written.
    """
    new, target = Path(new), Path(target)
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-")) / "old"
        os.replace(target, old)
    os.replace(new, target)
    if old is not None:
        shutil.rmtree(old.parent, ignore_errors=True)
