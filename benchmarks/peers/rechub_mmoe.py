"""The MMoE in torch-rechub, the way its multi-task examples run it (examples/ranking/run_census.py):
``SparseFeature`` / ``SequenceFeature`` / ``DenseFeature`` columns, ``DataGenerator`` loaders over a dict of
numpy arrays, ``MMOE`` trained by ``MTLTrainer.fit`` and scored by ``MTLTrainer.predict``.

Preprocessing follows its examples too: LabelEncoder ids shifted by one so that 0 pads the sequence
(``generate_seq_feature``), the bag padded with torch-rechub's own ``pad_sequences`` and pooled by mean over
c15's table (``shared_with="c15"``, ``padding_idx=0`` so that the mask leaves padding out).

Where the model differs from the others, because torch-rechub offers no switch: its MLP puts a BatchNorm1d
after every Linear (experts, towers and the softmax gates), and its loss is the mean of the tasks' BCE.
``MTLTrainer.fit`` needs a validation loader; it gets the first ``batch_size`` train rows, and it also
checkpoints the model (to a temporary folder) as part of fit: both count in ``train_seconds``.

Example:
    benchmarks/peers/.venv/bin/python benchmarks/peers/rechub_mmoe.py --train train.parquet \
        --test test.parquet --batch-size 2048 --epochs 1 --threads 2 --lr 1e-3 --seed 0 --out rechub.json
"""

from __future__ import annotations

import tempfile
from functools import partialmethod

import numpy as np
import pandas as pd
import tqdm
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
from torch.utils.data import DataLoader
from torch_rechub.basic.features import DenseFeature, SequenceFeature, SparseFeature
from torch_rechub.models.multi_task import MMOE
from torch_rechub.trainers import MTLTrainer
from torch_rechub.utils.data import DataGenerator, PredictDataset, pad_sequences

TASK_TYPES = ["classification"] * len(TASKS)


def silence_progress_bars() -> None:
    """Turn off the tqdm bars MTLTrainer always draws.

    tqdm reads ``TQDM_DISABLE`` only when it is first imported, and importing torch already imports it, so
    the switch is flipped on the class instead.
    """
    tqdm.tqdm.__init__ = partialmethod(tqdm.tqdm.__init__, disable=True)


def model_inputs(encoded: Encoded, max_len: int) -> dict[str, np.ndarray]:
    """The dict of numpy arrays torch-rechub's datasets index: ids (N,), bag (N, max_len), dense (N,) each."""
    x = dict(encoded.sparse)
    x[BAG] = pad_sequences(encoded.bag_rows(), maxlen=max_len, dtype="int64", padding="post", value=PAD)
    x.update({name: encoded.dense[:, i] for i, name in enumerate(DENSE)})
    return x


def features(encoder: Encoder) -> list:
    """The feature columns, in the order the model concatenates them."""
    sparse = [SparseFeature(c, encoder.vocabs[c].size, embed_dim=EMBEDDING_DIM) for c in SPARSE]
    bag = SequenceFeature(
        BAG,
        encoder.vocabs[BAG_TABLE].size,
        embed_dim=EMBEDDING_DIM,
        pooling="mean",
        shared_with=BAG_TABLE,
        padding_idx=PAD,
    )
    return [*sparse, bag, *(DenseFeature(name) for name in DENSE)]


def train(frame: pd.DataFrame, config: RunConfig) -> tuple[Encoder, MTLTrainer]:
    """Fit the encoding, build the loaders with DataGenerator and train with MTLTrainer.fit."""
    encoder = Encoder.fit(frame)
    encoded = encoder.transform(frame)
    x, y = model_inputs(encoded, encoder.max_bag_len), encoded.labels
    head = slice(0, config.batch_size)  # fit() insists on a validation set; this one only costs a batch
    x_val, y_val = {k: v[head] for k, v in x.items()}, y[head]
    train_loader, val_loader, _ = DataGenerator(x, y).generate_dataloader(
        x_val=x_val, y_val=y_val, x_test=x_val, y_test=y_val, batch_size=config.batch_size
    )
    model = MMOE(
        features(encoder),
        TASK_TYPES,
        n_expert=N_EXPERTS,
        expert_params={"dims": list(EXPERT_DIMS), "dropout": 0.0},
        tower_params_list=[{"dims": list(TOWER_DIMS), "dropout": 0.0} for _ in TASKS],
    )
    with tempfile.TemporaryDirectory() as checkpoints, stdout_to_stderr():
        trainer = MTLTrainer(
            model,
            task_types=TASK_TYPES,
            optimizer_params={"lr": config.lr, "weight_decay": 0.0},  # its default weight_decay is 1e-5
            n_epoch=config.epochs,
            device="cpu",
            model_path=checkpoints,
        )
        trainer.fit(train_loader, val_loader, seed=config.seed)
    return encoder, trainer


def predict(fitted: tuple[Encoder, MTLTrainer], frame: pd.DataFrame, config: RunConfig) -> np.ndarray:
    """(N, T) probabilities through MTLTrainer.predict over a PredictDataset loader, rows in order."""
    encoder, trainer = fitted
    x = model_inputs(encoder.transform(frame), encoder.max_bag_len)
    loader = DataLoader(PredictDataset(x), batch_size=config.batch_size, shuffle=False)
    with stdout_to_stderr():
        return np.asarray(trainer.predict(trainer.model, loader))


def main(argv: list[str] | None = None) -> None:
    """Command line: see the module docstring."""
    config = parse_args("MMoE in torch-rechub (its loaders and MTLTrainer), timed end to end.", argv)
    silence_progress_bars()
    run_peer("torch-rechub", train, predict, config, distributions=("torch-rechub",))


if __name__ == "__main__":
    main()
