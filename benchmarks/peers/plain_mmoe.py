"""The MMoE in plain PyTorch: one nn.EmbeddingBag per table, the bag pooled through offsets, batches sliced
from tensors (no DataLoader), Adam. The floor the two libraries are measured against.

Example:
    benchmarks/peers/.venv/bin/python benchmarks/peers/plain_mmoe.py --train train.parquet \
        --test test.parquet --batch-size 2048 --epochs 1 --threads 2 --lr 1e-3 --seed 0 --out plain.json
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from peer_common import (
    BAG_TABLE,
    DENSE,
    EMBEDDING_DIM,
    EXPERT_DIMS,
    N_EXPERTS,
    PAD,
    SPARSE,
    TASKS,
    TOWER_DIMS,
    Encoded,
    Encoder,
    RunConfig,
    parse_args,
    run_peer,
)
from torch import nn


def _mlp(dims: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for d_in, d_out in zip(dims[:-1], dims[1:], strict=True):
        layers += [nn.Linear(d_in, d_out), nn.ReLU()]
    return nn.Sequential(*layers)


class MMoE(nn.Module):
    """Embeddings -> experts mixed by one softmax gate per task -> towers; returns (B, T) logits.

    Args:
        table_sizes: rows per sparse column; ``BAG_TABLE``'s table also pools the bag.
        n_dense: number of dense inputs.
    """

    def __init__(self, table_sizes: dict[str, int], n_dense: int) -> None:
        super().__init__()
        sizes = table_sizes.items()
        # mode="mean" pools the bag and is the identity for the single-id columns (one id per bag); PAD
        # (padding and unseen ids) is left out of the mean, as the peers' masks do.
        self.tables = nn.ModuleDict(
            {c: nn.EmbeddingBag(n, EMBEDDING_DIM, mode="mean", padding_idx=PAD) for c, n in sizes}
        )
        for table in self.tables.values():
            bound = table.num_embeddings**-0.5  # torchrec's default init: uniform(+-sqrt(1/rows))
            nn.init.uniform_(table.weight, -bound, bound)
            nn.init.zeros_(table.weight[PAD])
        d_in = (len(table_sizes) + 1) * EMBEDDING_DIM + n_dense
        self.experts = nn.ModuleList(_mlp([d_in, *EXPERT_DIMS]) for _ in range(N_EXPERTS))
        self.gates = nn.ModuleList(nn.Linear(d_in, N_EXPERTS) for _ in TASKS)
        self.towers = nn.ModuleList(
            nn.Sequential(_mlp([EXPERT_DIMS[-1], *TOWER_DIMS]), nn.Linear(TOWER_DIMS[-1], 1)) for _ in TASKS
        )

    def forward(self, ids: torch.Tensor, bag: torch.Tensor, bag_offsets: torch.Tensor, dense: torch.Tensor):
        """ids (B, S) int64, bag (M,) int64 with bag_offsets (B,) starts, dense (B, D) -> logits (B, T)."""
        batch = ids.shape[0]
        single = torch.arange(batch)
        pooled = [table(ids[:, i], single) for i, table in enumerate(self.tables.values())]
        pooled.append(self.tables[BAG_TABLE](bag, bag_offsets))
        x = torch.cat([*pooled, dense], dim=1)  # (B, d_in)
        experts = torch.stack([expert(x) for expert in self.experts], dim=1)  # (B, E, H)
        logits = []
        for gate, tower in zip(self.gates, self.towers, strict=True):
            weights = torch.softmax(gate(x), dim=1).unsqueeze(1)  # (B, 1, E)
            logits.append(tower((weights @ experts).squeeze(1)))  # (B, 1)
        return torch.cat(logits, dim=1)


@dataclass
class Tensors:
    """An :class:`Encoded` frame as torch tensors, sliced into batches by row indices."""

    ids: torch.Tensor  # (N, S)
    bag: torch.Tensor  # (M,)
    starts: torch.Tensor  # (N,)
    lengths: torch.Tensor  # (N,)
    dense: torch.Tensor  # (N, D)
    labels: torch.Tensor | None  # (N, T)

    @classmethod
    def of(cls, encoded: Encoded) -> Tensors:
        """Convert without copying where numpy allows."""
        offsets = torch.from_numpy(encoded.bag_offsets)
        labels = None if encoded.labels is None else torch.from_numpy(encoded.labels)
        ids = np.stack([encoded.sparse[c] for c in SPARSE], axis=1)
        return cls(
            torch.from_numpy(ids), torch.from_numpy(encoded.bag), offsets[:-1], offsets.diff(),
            torch.from_numpy(encoded.dense), labels,
        )  # fmt: skip

    def batch(self, rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(ids, bag, bag_offsets, dense) for ``rows``; the bag is gathered without a Python loop."""
        lengths = self.lengths[rows]
        offsets = torch.cumsum(lengths, 0) - lengths  # (B,) starts inside the batch's bag
        shift = torch.repeat_interleave(self.starts[rows] - offsets, lengths)
        positions = torch.arange(int(lengths.sum())) + shift
        return self.ids[rows], self.bag[positions], offsets, self.dense[rows]


def train(frame: pd.DataFrame, config: RunConfig) -> tuple[Encoder, MMoE]:
    """Fit the encoding, then train with Adam on the summed per-task binary cross-entropy."""
    encoder = Encoder.fit(frame)
    data = Tensors.of(encoder.transform(frame))
    model = MMoE({c: v.size for c, v in encoder.vocabs.items()}, len(DENSE))
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    loss_fn = nn.BCEWithLogitsLoss()
    model.train()
    for _ in range(config.epochs):
        for rows in torch.randperm(len(data.ids)).split(config.batch_size):
            logits = model(*data.batch(rows))
            labels = data.labels[rows]
            loss = sum(loss_fn(logits[:, t], labels[:, t]) for t in range(len(TASKS)))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return encoder, model


@torch.no_grad()
def predict(fitted: tuple[Encoder, MMoE], frame: pd.DataFrame, config: RunConfig) -> np.ndarray:
    """(N, T) click and purchase probabilities for the frame's rows, in order."""
    encoder, model = fitted
    data = Tensors.of(encoder.transform(frame))
    model.eval()
    rows = torch.arange(len(data.ids))
    out = [torch.sigmoid(model(*data.batch(r))) for r in rows.split(config.batch_size)]
    return torch.cat(out).numpy()


def main(argv: list[str] | None = None) -> None:
    """Command line: see the module docstring."""
    config = parse_args("MMoE in plain PyTorch, timed end to end.", argv)
    run_peer("plain-pytorch", train, predict, config)


if __name__ == "__main__":
    main()
