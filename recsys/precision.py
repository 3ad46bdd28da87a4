"""Precision as a setting: bf16 autocast of the dense layers, and fp16/int8/int4 embedding tables for scoring.

``bf16`` runs the matrix products of the dense part (interaction, experts, gates, towers) under
``torch.autocast`` in bfloat16; the embedding tables, their lookups and optimizer, the losses and the
optimizer state stay fp32. ``auto`` is ``bf16`` on a CPU with AVX-512 bf16 or AMX units or on a GPU with bf16
support, else ``fp32``. On a CPU without bf16 units, bf16 is emulated and slower than fp32: ``bf16`` still
runs there, and :func:`resolve_precision` says so.

For scoring, :func:`quantize_embeddings` swaps the tables of a trained model for row-wise quantized ones:
fp16, or int8 / int4 with a per-row scale and bias. The pooled tables become
:class:`~recsys.modules.quantized.QuantizedBags` (FBGEMM's CPU embedding-bag kernels; an int8 row of dimension
16 takes 24 bytes instead of 64), the attended ones of target attention TorchRec's quantized inference
``EmbeddingCollection`` (``torchrec.quant``, rows padded to 4 bytes). The outputs stay fp32.

Example:
    >>> dtype, message = resolve_precision("fp32", torch.device("cpu"))
    >>> dtype is None, message
    (True, 'precision fp32')
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from recsys.modules.quantized import QUANTIZED_DTYPES, QuantizedBags

PRECISIONS = ("fp32", "bf16", "auto")
EMBEDDING_DTYPES = ("fp32", *QUANTIZED_DTYPES)
_WEIGHT_DTYPES = {"fp16": torch.float16, "int8": torch.qint8, "int4": torch.quint4x2}
ROW_ALIGNMENT = 4  # bytes; TorchRec's default of 16 would pad an int8 row of dimension 16 from 20 to 32 bytes


def bf16_supported(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 matrix products in hardware (AVX-512 bf16 or AMX; a bf16 GPU)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def resolve_precision(
    name: str, device: torch.device, field: str = "training.precision"
) -> tuple[torch.dtype | None, str]:
    """The autocast dtype of a precision setting (None: fp32) and a line that says what was chosen and why.

    Args:
        name: one of :data:`PRECISIONS`.
        device: where the model runs.
        field: the setting's name in the error message (``score.compute_dtype`` for scoring).

    Raises:
        ValueError: ``name`` is not one of :data:`PRECISIONS`.
    """
    if name not in PRECISIONS:
        raise ValueError(f"{field}: expected one of {list(PRECISIONS)}, got {name!r}")
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


def check_embedding_dtype(name: str, field: str = "embedding_dtype") -> str:
    """``name`` if it is one of :data:`EMBEDDING_DTYPES`.

    Raises:
        ValueError: it is not (the message names ``field`` and the value).
    """
    if name not in EMBEDDING_DTYPES:
        raise ValueError(f"{field}: expected one of {list(EMBEDDING_DTYPES)}, got {name!r}")
    return name


def _qconfig(dtype: str) -> torch.ao.quantization.QConfig:
    """TorchRec's quantization config: fp32 outputs, tables of ``dtype``."""
    quant = torch.ao.quantization
    return quant.QConfig(
        activation=quant.PlaceholderObserver.with_args(dtype=torch.float),
        weight=quant.PlaceholderObserver.with_args(dtype=_WEIGHT_DTYPES[dtype]),
    )


def _quantized_attended(collection: nn.Module, dtype: str) -> nn.Module:
    """TorchRec's inference ``EmbeddingCollection`` of the float one of target attention (unpooled rows)."""
    from torchrec.quant import embedding_modules as qmodules

    collection.qconfig = _qconfig(dtype)
    setattr(collection, qmodules.MODULE_ATTR_ROW_ALIGNMENT_INT, ROW_ALIGNMENT)
    try:
        return qmodules.EmbeddingCollection.from_float(collection)
    finally:
        del collection.qconfig


def quantize_embeddings(model: nn.Module, dtype: str) -> nn.Module:
    """Replaces ``model``'s embedding tables (pooled and attended) by row-wise quantized ones, in place.

    For inference only: the quantized tables have no gradient. ``fp32`` leaves the model as it is. A model
    whose tables are already quantized is refused (quantizing twice would add the error of both).

    Args:
        model: a :class:`~recsys.model.RankingModel` on the CPU, with fp32 tables.
        dtype: one of :data:`EMBEDDING_DTYPES`.

    Returns:
        ``model``.

    Raises:
        ValueError: unknown ``dtype``, or tables that are not fp32.
    """
    check_embedding_dtype(dtype)
    if dtype == "fp32":
        return model
    if embedding_dtype_of(model) != "fp32":
        raise ValueError(
            f"embedding_dtype: the model's tables are already quantized; cannot make them {dtype}"
        )
    sparse_arch = getattr(model, "sparse_arch", None)
    history_arch = getattr(model, "history_arch", None)
    if sparse_arch is not None:
        sparse_arch.embedding_bag_collection = QuantizedBags(sparse_arch.embedding_bag_collection, dtype)
    if history_arch is not None:
        history_arch.embedding_collection = _quantized_attended(history_arch.embedding_collection, dtype)
    return model


def embedding_dtype_of(model: nn.Module) -> str:
    """``fp32``, or the dtype of ``model``'s tables as :func:`quantize_embeddings` made them."""
    names = {"FP16": "fp16", "INT8": "int8", "INT4": "int4"}
    for module in model.modules():
        if isinstance(module, QuantizedBags):
            return module.dtype
        if type(module).__module__.startswith("torchrec.quant") and hasattr(module, "embedding_configs"):
            return names[module.embedding_configs()[0].data_type.name]
    return "fp32"


def plain_tensor(value: torch.Tensor) -> torch.Tensor:
    """The bytes of a packed int4/int2 table (TorchRec's ``UIntXTensor`` wrapper) as a plain uint8 tensor.

    ``torch.load(weights_only=True)`` accepts plain tensors only; :func:`packed_state` wraps them again.
    Any other tensor is returned as it is.
    """
    from torchrec.tensor_types import UIntXTensor

    return value.elem if isinstance(value, UIntXTensor) else value


def packed_state(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with the plain bytes of :func:`plain_tensor` wrapped as ``model``'s packed tables expect."""
    from torchrec.tensor_types import UIntXTensor

    current = model.state_dict()
    return {
        name: type(current[name])(value) if isinstance(current.get(name), UIntXTensor) else value
        for name, value in state.items()
    }
