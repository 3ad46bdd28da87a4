"""The MMoE in DeepCTR-Torch, the way its docs' examples run it (run_multitask_learning.py,
run_multivalue_movielens.py): ``SparseFeat`` / ``VarLenSparseFeat`` / ``DenseFeat`` columns, a dict of numpy
arrays as model input, ``model.compile`` / ``model.fit(..., verbose=0)`` / ``model.predict``.

Preprocessing follows the docs: LabelEncoder ids, the multi-value column encoded from 1 (0 is padding, which
its mean pooling masks) and post-padded to the longest train bag. The docs import ``pad_sequences`` from
tensorflow; tensorflow is not installed, so :func:`pad_post` does the same padding with numpy. The bag shares
c15's table through ``embedding_name="c15"``.

Settings against its defaults: l2_reg_linear / l2_reg_embedding / l2_reg_dnn 0 (defaults 1e-5, 1e-5, 0),
dnn_dropout 0, no BatchNorm, gate_dnn_hidden_units () so each gate is one softmax layer over the input (its
default is a (64,) DNN first). Its other defaults stay: weights start at N(0, 1e-4) (init_std), and its loss
is the sum over the batch of each task's BCE, summed over tasks. Adam gets ``--lr`` as an optimizer instance,
which ``compile`` takes in place of the string "adam" (whose lr is fixed at 1e-3).

Example:
    benchmarks/peers/.venv/bin/python benchmarks/peers/deepctr_mmoe.py --train train.parquet \
        --test test.parquet --batch-size 2048 --epochs 1 --threads 2 --lr 1e-3 --seed 0 --out deepctr.json
"""

from __future__ import annotations

import importlib
import sys
import types

import numpy as np
import pandas as pd
import torch
from peer_common import (
    BAG,
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
    stdout_to_stderr,
)


def _offline_requests() -> types.ModuleType:
    """A stand-in for ``requests`` whose ``get`` answers "not OK" at once, without a network call."""
    stub = types.ModuleType("requests")
    stub.codes = types.SimpleNamespace(ok=200)
    stub.get = lambda *args, **kwargs: types.SimpleNamespace(status_code=503, text="")
    return stub


def import_deepctr() -> types.ModuleType:
    """Import ``deepctr_torch`` without its import-time version check going online.

    ``deepctr_torch/__init__.py`` starts a (non-daemon) thread that asks PyPI for a newer release through
    ``requests``; on a machine without network that thread would hold the process open. ``requests`` is
    swapped for :func:`_offline_requests` while the package loads, then put back.
    """
    saved = sys.modules.get("requests")
    sys.modules["requests"] = _offline_requests()
    try:
        return importlib.import_module("deepctr_torch")
    finally:
        if saved is None:
            del sys.modules["requests"]
        else:
            sys.modules["requests"] = saved


deepctr = import_deepctr()


def pad_post(rows: list[np.ndarray], max_len: int) -> np.ndarray:
    """Keras' ``pad_sequences(rows, maxlen=max_len, padding="post")``: (N, max_len) int64, PAD after the ids,
    longer rows truncated at the front (keras' default ``truncating="pre"``)."""
    out = np.full((len(rows), max_len), PAD, dtype=np.int64)
    for i, row in enumerate(rows):
        kept = row[-max_len:]
        out[i, : len(kept)] = kept
    return out


def model_inputs(encoded: Encoded, max_len: int) -> dict[str, np.ndarray]:
    """The ``{feature name: array}`` dict DeepCTR's fit and predict take."""
    x = dict(encoded.sparse)
    x[BAG] = pad_post(encoded.bag_rows(), max_len)
    x.update({name: encoded.dense[:, i] for i, name in enumerate(DENSE)})
    return x


def feature_columns(encoder: Encoder) -> list:
    """Sparse ids, the bag pooled over c15's table, and the dense columns."""
    inputs = deepctr.inputs
    sparse = [inputs.SparseFeat(c, encoder.vocabs[c].size, embedding_dim=EMBEDDING_DIM) for c in SPARSE]
    bag_ids = inputs.SparseFeat(
        BAG, encoder.vocabs[BAG_TABLE].size, embedding_dim=EMBEDDING_DIM, embedding_name=BAG_TABLE
    )
    bag = inputs.VarLenSparseFeat(bag_ids, maxlen=encoder.max_bag_len, combiner="mean")
    return [*sparse, bag, *(inputs.DenseFeat(name, 1) for name in DENSE)]


def train(frame: pd.DataFrame, config: RunConfig) -> tuple[Encoder, torch.nn.Module]:
    """Fit the encoding, build DeepCTR's MMOE, compile and fit."""
    encoder = Encoder.fit(frame)
    encoded = encoder.transform(frame)
    model = deepctr.models.MMOE(
        feature_columns(encoder),
        num_experts=N_EXPERTS,
        expert_dnn_hidden_units=EXPERT_DIMS,
        gate_dnn_hidden_units=(),
        tower_dnn_hidden_units=TOWER_DIMS,
        l2_reg_linear=0.0,
        l2_reg_embedding=0.0,
        l2_reg_dnn=0.0,
        dnn_dropout=0.0,
        dnn_use_bn=False,
        task_types=("binary",) * len(TASKS),
        task_names=TASKS,
        device="cpu",
        seed=config.seed,
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    model.compile(optimizer, loss=["binary_crossentropy"] * len(TASKS))
    x = model_inputs(encoded, encoder.max_bag_len)
    with stdout_to_stderr():  # fit prints the device and a summary line whatever the verbosity
        model.fit(x, encoded.labels, batch_size=config.batch_size, epochs=config.epochs, verbose=0)
    return encoder, model


def predict(fitted: tuple[Encoder, torch.nn.Module], frame: pd.DataFrame, config: RunConfig) -> np.ndarray:
    """(N, T) probabilities from ``model.predict``, rows in order."""
    encoder, model = fitted
    x = model_inputs(encoder.transform(frame), encoder.max_bag_len)
    return model.predict(x, batch_size=config.batch_size)


def main(argv: list[str] | None = None) -> None:
    """Command line: see the module docstring."""
    config = parse_args("MMoE in DeepCTR-Torch (compile / fit / predict), timed end to end.", argv)
    run_peer("deepctr-torch", train, predict, config, distributions=("deepctr-torch",))


if __name__ == "__main__":
    main()
