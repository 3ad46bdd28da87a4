"""Compute precision as a setting: fp32, or bf16 autocast of the dense layers where there are bf16 units.

``bf16`` runs the matrix products of the dense part (interaction, experts, gates, towers) under
``torch.autocast`` in bfloat16; the embedding tables, their lookups and optimizer, the losses and the
optimizer state stay fp32. ``auto`` is ``bf16`` on a CPU with AVX-512 bf16 or AMX units or on a GPU with bf16
support, else ``fp32``. On a CPU without bf16 units, bf16 is emulated and slower than fp32: ``bf16`` still
runs there, and :func:`resolve_precision` says so.

Example:
    >>> dtype, message = resolve_precision("fp32", torch.device("cpu"))
    >>> dtype is None, message
    (True, 'precision fp32')
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

PRECISIONS = ("fp32", "bf16", "auto")


def bf16_supported(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 matrix products in hardware (AVX-512 bf16 or AMX; a bf16 GPU)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def resolve_precision(name: str, device: torch.device) -> tuple[torch.dtype | None, str]:
    """The autocast dtype of a precision setting (None: fp32) and a line that says what was chosen and why.

    Raises:
        ValueError: ``name`` is not one of :data:`PRECISIONS`.
    """
    if name not in PRECISIONS:
        raise ValueError(f"training.precision: expected one of {list(PRECISIONS)}, got {name!r}")
    if name == "fp32":
        return None, "precision fp32"
    has_bf16 = bf16_supported(device)
    if name == "bf16":
        if has_bf16:
            return torch.bfloat16, f"precision bf16 (dense layers; {device.type} has bf16 units)"
        return (
            torch.bfloat16,
            f"precision bf16: this {device.type} has no bf16 units; bf16 is emulated and slow",
        )
    if has_bf16:
        return torch.bfloat16, f"precision auto: bf16 (dense layers; {device.type} has bf16 units)"
    return None, f"precision auto: fp32 (this {device.type} has no bf16 units)"


@contextlib.contextmanager
def autocast(dtype: torch.dtype | None, device: torch.device) -> Iterator[None]:
    """``torch.autocast`` to ``dtype`` on ``device``'s type; nothing when ``dtype`` is None (fp32)."""
    if dtype is None:
        yield
        return
    with torch.autocast(device.type, dtype=dtype):
        yield
