"""The peers' own virtual environment: torch-rechub and DeepCTR-Torch never enter the project's venv.

Runs under the project's python with the standard library only. :func:`ensure_venv` creates the venv with
``python -m venv``, installs ``requirements.txt`` beside this file (the torch pin alone first, so that no
resolve can swap the local CPU build for a downloaded CUDA one) and records the requirements' sha256 in a
marker file. A venv whose marker matches is reused as it is; a changed requirements file rebuilds it.

Example:
    python -m benchmarks.peers.peer_venv --venv benchmarks/peers/.venv
    benchmarks/peers/.venv/bin/python benchmarks/peers/plain_mmoe.py --train t.parquet --test s.parquet ...
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
from pathlib import Path

REQUIREMENTS = Path(__file__).with_name("requirements.txt")
DEFAULT_VENV = Path(__file__).with_name(".venv")
MARKER = "peer-requirements.sha256"


def requirements_hash(requirements: Path = REQUIREMENTS) -> str:
    """The sha256 of the requirements file's bytes, as hex."""
    return hashlib.sha256(requirements.read_bytes()).hexdigest()


def torch_pin(requirements: Path = REQUIREMENTS) -> str:
    """The ``torch==X`` line of the requirements file.

    Raises:
        ValueError: the file pins no torch with ``==``.
    """
    for line in requirements.read_text().splitlines():
        spec = line.split("#", 1)[0].strip()
        if spec.replace(" ", "").startswith("torch=="):
            return spec.replace(" ", "")
    raise ValueError(f"requirements {requirements}: no 'torch==' pin (any other torch spec pulls CUDA)")


def venv_python(path: Path) -> Path:
    """The interpreter of the venv at ``path`` (which may not exist yet)."""
    return path / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _pip(python: Path, *args: str) -> None:
    # pip's chatter goes to stderr so that stdout carries only the interpreter's path.
    cmd = [str(python), "-m", "pip", "install", "--no-input", "--disable-pip-version-check", *args]
    subprocess.run(cmd, check=True, stdout=sys.stderr)


def _installed_torch(python: Path) -> str:
    code = "import importlib.metadata as m; print(m.version('torch'))"
    done = subprocess.run([str(python), "-c", code], check=True, capture_output=True, text=True)
    return done.stdout.strip()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def ensure_venv(path: Path, python: str = sys.executable, requirements: Path = REQUIREMENTS) -> Path:
    """Create (or reuse) the peers' venv at ``path`` and return its python.

    Args:
        path: the venv's folder; created if missing, rebuilt from scratch (``venv --clear``) when its marker
            does not hold the current requirements' hash.
        python: the interpreter that runs ``-m venv``; the new venv uses its base installation.
        requirements: the pinned requirements to install.

    Returns:
        The venv's python, e.g. ``benchmarks/peers/.venv/bin/python``.

    Raises:
        RuntimeError: pip installed a torch other than the pinned one.
        subprocess.CalledProcessError: ``venv`` or ``pip`` failed.
    """
    path = Path(path).absolute()
    digest = requirements_hash(requirements)
    marker = path / MARKER
    peer_python = venv_python(path)
    if peer_python.exists() and marker.exists() and marker.read_text().strip() == digest:
        return peer_python
    pin = torch_pin(requirements)
    subprocess.run([python, "-m", "venv", "--clear", str(path)], check=True, stdout=sys.stderr)
    _pip(peer_python, pin)
    _pip(peer_python, "-r", str(requirements))
    torch_version = _installed_torch(peer_python)
    if torch_version.split("+")[0] != pin.split("==")[1]:
        raise RuntimeError(f"{path}: pip installed torch {torch_version}, requirements pin {pin}")
    _write_atomic(marker, digest + "\n")
    return peer_python


def main(argv: list[str] | None = None) -> None:
    """Command line: make the venv if needed and print its python's path."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.peers.peer_venv",
        description="Create or reuse the peers' venv (torch-rechub, DeepCTR-Torch) from requirements.txt.",
    )
    parser.add_argument(
        "--venv", type=Path, default=DEFAULT_VENV, help="venv folder (default: beside this file)"
    )
    parser.add_argument("--python", default=sys.executable, help="interpreter that runs -m venv")
    args = parser.parse_args(argv)
    print(ensure_venv(args.venv, args.python))


if __name__ == "__main__":
    main()
