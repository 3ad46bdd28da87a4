"""Atomic file writes: a reader sees the old file or folder or the new one, never a part.

Every write goes to a temporary name in the target's folder (same file system) and is renamed over the
target in one step: :func:`atomic_write` for a whole content at once, :func:`staged_file` for a file
written piece by piece, :func:`staged_dir` and :func:`replace_dir` for folders.

Output folders we write carry a marker file (:func:`mark_owned`): ``--overwrite`` replaces only a folder
that carries it (:func:`check_replaceable`), and an output is never the input, inside it, or around it
(:func:`refuse_overlap`).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import os
import shutil
import sys
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
        os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes 0700; a written folder gets the usual mode
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(new: str | Path, target: str | Path) -> None:
    """Moves folder ``new`` to ``target``; an old ``target`` is swapped out in one step and deleted last.

    On Linux the two folders are exchanged atomically (``renameat2(RENAME_EXCHANGE)``): a reader sees the
    old folder or the new one, never neither. Elsewhere, two renames: ``target`` is missing only between
    them and never half written.
    """
    new, target = Path(new), Path(target)
    if not target.exists():
        os.replace(new, target)
        return
    if _exchange(new, target):
        shutil.rmtree(new, ignore_errors=True)  # ``new`` now holds the old folder
        return
    old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-")) / "old"
    os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old.parent, ignore_errors=True)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swaps paths ``a`` and ``b`` atomically; False where the system cannot (then nothing moved)."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:  # glibc before 2.28
        return False
    ok = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0
    return ok  # EINVAL/ENOSYS (a file system without exchange): fall back to two renames


# ------------------------------------------------------------------------------ owned output folders

OWNER_MARKER = ".recsys-output.json"


def mark_owned(folder: str | Path, kind: str) -> None:
    """Marks ``folder`` as an output of ours of ``kind`` (``features``, ``scores``, ``package``)."""
    atomic_write(Path(folder) / OWNER_MARKER, json.dumps({"kind": kind, "written_by": "recsys-mmoe"}))


def owned_kind(folder: str | Path) -> str | None:
    """The ``kind`` of our marker in ``folder``, or None when it has none (or an unreadable one)."""
    try:
        data = json.loads((Path(folder) / OWNER_MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data.get("kind") if isinstance(data, dict) else None


def check_replaceable(out: str | Path, kind: str, overwrite: bool) -> None:
    """Raises unless writing output ``kind`` to folder ``out`` may remove what is there.

    A missing or empty folder is always fine. An existing one needs ``overwrite`` and our marker of the
    same ``kind``: a folder we did not write (raw tables, a user's files) is never deleted.

    Raises:
        FileExistsError: naming the folder, the flag, and what it holds when it is not ours.
    """
    out = Path(out)
    if not out.exists():
        return
    if not out.is_dir():
        raise FileExistsError(f"output {out} is a file, not a folder; choose another output folder")
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return
    if not overwrite:
        raise FileExistsError(f"output folder {out} exists; pass --overwrite to replace it")
    found = owned_kind(out)
    if found != kind:
        shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
        why = f"it is a {found} output" if found else f"it has no {OWNER_MARKER} marker"
        raise FileExistsError(
            f"refusing to replace output folder {out}: {why}, so it was not written as a {kind} output "
            f"by this tool (it holds {shown}); remove it yourself or choose another output folder"
        )


def refuse_overlap(out: str | Path, inputs: dict[str, str | Path]) -> None:
    """Raises ValueError when output folder ``out`` is an input, lies inside one, or contains one.

    Args:
        out: the output folder.
        inputs: each input's role (``--data``, ``impressions``) and its file or folder.
    """
    out = Path(out).resolve()
    for role, path in inputs.items():
        src = Path(path).resolve()
        if out == src:
            how = "is"
        elif src in out.parents:
            how = "is inside"
        elif out in src.parents:
            how = "contains"
        else:
            continue
        raise ValueError(
            f"output folder {out} {how} the input {role} {src}; writing there would read back or delete "
            "the input: choose an output folder outside the inputs"
        )
