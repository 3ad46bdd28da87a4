"""Atomic file writes: a reader sees the old file or the new one, never a part.

Every write goes to a temporary name in the target's folder (same file system), is flushed to disk, and
is renamed over the target in one step.
"""

from __future__ import annotations

import os
import tempfile
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
