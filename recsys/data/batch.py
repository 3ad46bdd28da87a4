"""From model-ready Arrow data to model inputs: the feature layout and the batch builder.

:class:`FeatureLayout` is derived once from a :class:`~features.spec.FeatureSpec` (and the embedding
config's table sharing). The model and :func:`batch_from_arrow` both read it, so they agree on the
order of the ``KeyedJaggedTensor`` keys, of the dense columns and of the embedding tables.

:func:`batch_from_arrow` reads the Arrow buffers through numpy views: id columns are used as they are,
list columns through their offsets and child values, with no Python loop over rows. The one copy is the
concatenation of all keys' ids into the single values tensor a ``KeyedJaggedTensor`` holds.

Example:
    >>> import pyarrow as pa
    >>> layout = FeatureLayout(
    ...     sparse=(SparseFeature("item", 10), SparseFeature("hist", 10, multi_hot=True, table="item")),
    ...     dense=("price",), labels=("click",))
    >>> table = pa.table({"item": pa.array([3, 4]), "hist": pa.array([[1, 2], []]),
    ...                   "price": pa.array([0.5, 1.5], pa.float32()),
    ...                   "click": pa.array([1.0, 0.0], pa.float32())})
    >>> batch = batch_from_arrow(table, layout)
    >>> batch.sparse.values().tolist(), batch.sparse.lengths().tolist()
    ([3, 4, 1, 2], [1, 1, 2, 0])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys.config import EmbeddingConfig


@dataclass(frozen=True)
class SparseFeature:
    """One id or id-list input.

    Attributes:
        name: the column name, and the key in the ``KeyedJaggedTensor``.
        num_embeddings: ids lie in ``[0, num_embeddings)``; 0 is out of vocabulary.
        multi_hot: a list column (a bag of ids) rather than one id per row.
        table: the embedding table it looks up (defaults to ``name``).
    """

    name: str
    num_embeddings: int
    multi_hot: bool = False
    table: str = ""

    def __post_init__(self) -> None:
        if not self.table:
            object.__setattr__(self, "table", self.name)
        if not isinstance(self.num_embeddings, int) or self.num_embeddings < 1:
            raise ValueError(
                f"layout.sparse[{self.name}].num_embeddings: expected an integer >= 1, "
                f"got {self.num_embeddings!r}"
            )


@dataclass(frozen=True)
class FeatureLayout:
    """The model's inputs, in the order the batch builder and the model share.

    Attributes:
        sparse: the id and id-list features, in ``KeyedJaggedTensor`` key order.
        dense: the float features, in the column order of ``Batch.dense``.
        labels: the label columns.
    """

    sparse: tuple[SparseFeature, ...]
    dense: tuple[str, ...] = ()
    labels: tuple[str, ...] = ()
    _tables: dict[str, tuple[int, tuple[str, ...]]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sparse", tuple(self.sparse))
        object.__setattr__(self, "dense", tuple(self.dense))
        object.__setattr__(self, "labels", tuple(self.labels))
        names = [f.name for f in self.sparse] + list(self.dense)
        if len(names) != len(set(names)):
            raise ValueError(f"layout: feature names must be unique, got {names}")
        if not self.sparse and not self.dense:
            raise ValueError("layout: expected at least one sparse or dense feature, got none")
        tables: dict[str, tuple[int, tuple[str, ...]]] = {}
        for f in self.sparse:
            size, users = tables.get(f.table, (f.num_embeddings, ()))
            if size != f.num_embeddings:
                raise ValueError(
                    f"layout.sparse[{f.name}].table: table {f.table!r} has {size} embeddings, "
                    f"the feature {f.num_embeddings}"
                )
            tables[f.table] = (size, (*users, f.name))
        object.__setattr__(self, "_tables", tables)

    @property
    def keys(self) -> list[str]:
        """The ``KeyedJaggedTensor`` keys: the sparse feature names in layout order."""
        return [f.name for f in self.sparse]

    @property
    def tables(self) -> dict[str, tuple[int, tuple[str, ...]]]:
        """Per embedding table (in order of first use): its number of embeddings and its features."""
        return dict(self._tables)

    @classmethod
    def from_spec(cls, spec: Any, embedding: EmbeddingConfig | None = None) -> FeatureLayout:
        """The layout of a fitted feature spec.

        Args:
            spec: a :class:`features.spec.FeatureSpec`.
            embedding: the table sharing to apply (default: ``EmbeddingConfig()``, where multi-hot
                features with ``vocab_of`` share their vocabulary feature's table).
        """
        embedding = embedding or EmbeddingConfig()
        sizes = spec.sparse_features()
        table = {name: name for name in sizes}
        if embedding.share_vocab_tables:
            for name in sizes:
                other = spec.fitted[name].get("vocab_of")
                if other:
                    table[name] = table[other]
        for group in embedding.shared_tables:
            unknown = [n for n in group if n not in sizes]
            if unknown:
                raise ValueError(
                    f"model.embedding.shared_tables: unknown sparse feature(s) {unknown}; the "
                    f"spec's sparse features are {list(sizes)}"
                )
            members = {n for n, t in table.items() if t in {table[g] for g in group}}
            for n in members:
                table[n] = table[group[0]]
        sparse = tuple(
            SparseFeature(name, n, multi_hot=spec.fitted[name]["output"] == "id_list", table=table[name])
            for name, n in sizes.items()
        )
        return cls(sparse=sparse, dense=tuple(spec.dense_features()), labels=tuple(spec.label_names()))


@dataclass
class Batch:
    """One batch of model inputs.

    Attributes:
        dense: the float features, ``(B, n_dense)``.
        sparse: the id features, keys in layout order, ``B`` rows per key.
        labels: per label name, ``(B,)`` floats (empty for scoring data).
    """

    dense: torch.Tensor
    sparse: KeyedJaggedTensor
    labels: dict[str, torch.Tensor]

    def pin_memory(self) -> Batch:
        """The batch in page-locked host memory, so that its copy to a GPU need not block (CUDA only)."""
        return Batch(
            dense=self.dense.pin_memory(),
            sparse=self.sparse.pin_memory(),
            labels={k: v.pin_memory() for k, v in self.labels.items()},
        )

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """The batch on ``device``."""
        return Batch(
            dense=self.dense.to(device, non_blocking=non_blocking),
            sparse=self.sparse.to(torch.device(device), non_blocking=non_blocking),
            labels={k: v.to(device, non_blocking=non_blocking) for k, v in self.labels.items()},
        )


def _chunks(column: pa.Array | pa.ChunkedArray) -> list[pa.Array]:
    return list(column.chunks) if isinstance(column, pa.ChunkedArray) else [column]


def _ids(name: str, column: pa.Array | pa.ChunkedArray) -> tuple[list[np.ndarray], np.ndarray]:
    """The ids of one column as numpy views (one per chunk) and the per-row lengths."""
    values: list[np.ndarray] = []
    lengths: list[np.ndarray] = []
    for chunk in _chunks(column):
        if pa.types.is_list(chunk.type) or pa.types.is_large_list(chunk.type):
            offsets = np.asarray(chunk.offsets)  # (n + 1,), already shifted by a slice's offset
            lens = np.diff(offsets)
            if chunk.null_count:
                # A null list may still span child values; flatten() skips them, and its length is 0.
                lens = np.where(np.asarray(chunk.is_null()), 0, lens)
                child = chunk.flatten()
            else:
                child = chunk.values.slice(int(offsets[0]), int(offsets[-1] - offsets[0]))
            if not pa.types.is_integer(child.type) or child.null_count:
                raise ValueError(f"batch.{name}: expected a list of non-null integer ids, got {chunk.type}")
            values.append(np.asarray(child))
            lengths.append(lens)
        elif pa.types.is_integer(chunk.type):
            if chunk.null_count:
                raise ValueError(f"batch.{name}: expected non-null ids, got {chunk.null_count} null(s)")
            values.append(np.asarray(chunk))
            lengths.append(np.ones(len(chunk), dtype=np.int64))
        else:
            raise ValueError(f"batch.{name}: expected an integer or list-of-integer column, got {chunk.type}")
    return values, np.concatenate(lengths) if lengths else np.zeros(0, np.int64)


def _floats(name: str, column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    chunks = _chunks(column)
    if not all(pa.types.is_floating(c.type) or pa.types.is_integer(c.type) for c in chunks):
        raise ValueError(f"batch.{name}: expected a numeric column, got {column.type}")
    # to_numpy is zero-copy for null-free float chunks; nulls become NaN.
    parts = [c.to_numpy(zero_copy_only=False) for c in chunks]
    return np.concatenate(parts) if len(parts) != 1 else parts[0]


def batch_from_arrow(data: pa.Table | pa.RecordBatch, layout: FeatureLayout, labels: bool = True) -> Batch:
    """Builds a model batch from model-ready Arrow rows, without a Python loop over rows.

    Args:
        data: model-ready rows: Int64 id columns, List(Int64) bag columns, Float32 dense and label columns
            (other columns, such as keys, are ignored).
        layout: the feature layout the model was built with.
        labels: read the label columns (False for scoring data, which has none).

    Returns:
        The batch: ``dense`` ``(B, n_dense)`` float32, ``sparse`` a ``KeyedJaggedTensor`` with keys in
        layout order (int64 values and lengths), ``labels`` ``(B,)`` float32 per label.

    Raises:
        ValueError: a column is missing, has the wrong type, or holds an id outside ``[0, num_embeddings)``.
    """
    names = set(data.schema.names)
    wanted = layout.keys + list(layout.dense) + (list(layout.labels) if labels else [])
    missing = [n for n in wanted if n not in names]
    if missing:
        raise ValueError(f"batch: missing column(s) {missing}; the data has {data.schema.names}")
    rows = data.num_rows

    per_key_values: list[np.ndarray] = []
    per_key_lengths: list[np.ndarray] = []
    for f in layout.sparse:
        values, lengths = _ids(f.name, data.column(f.name))
        for v in values:
            if v.size and (v.min() < 0 or v.max() >= f.num_embeddings):
                raise ValueError(
                    f"batch.{f.name}: ids must lie in [0, {f.num_embeddings}), got "
                    f"[{v.min()}, {v.max()}]; was the data written with another spec?"
                )
        per_key_values.extend(values)
        per_key_lengths.append(lengths)
    # The single copy: all keys' ids, key-major, into the one values tensor of the KJT.
    all_values = np.concatenate(per_key_values).astype(np.int64, copy=False) if per_key_values else None
    all_lengths = np.concatenate(per_key_lengths).astype(np.int64, copy=False) if per_key_lengths else None
    sparse = KeyedJaggedTensor(
        keys=layout.keys,
        values=torch.from_numpy(all_values) if all_values is not None else torch.zeros(0, dtype=torch.int64),
        lengths=torch.from_numpy(all_lengths)
        if all_lengths is not None
        else torch.zeros(0, dtype=torch.int64),
    )

    dense = np.empty((rows, len(layout.dense)), dtype=np.float32)  # (B, n_dense), row-major for the GEMMs
    for j, name in enumerate(layout.dense):
        dense[:, j] = _floats(name, data.column(name))
    label_tensors = {}
    if labels:
        for name in layout.labels:
            label_tensors[name] = torch.from_numpy(
                _floats(name, data.column(name)).astype(np.float32, copy=True)
            )
    return Batch(dense=torch.from_numpy(dense), sparse=sparse, labels=label_tensors)
