"""What the three peer scripts share: the command line, the data's columns, the fitted id/dense encoding,
the timing and the result file. Runs in the peers' venv (numpy, pandas, scikit-learn, torch), never in ours.

Each script passes two functions to :func:`run_peer`: ``train(frame, config) -> fitted`` and
``predict(fitted, frame, config) -> (N, T) probabilities``. The driver times them end to end, from the
Parquet read to the trained model and from the Parquet read to the numpy predictions, then scores AUC per task
and writes a :class:`PeerResult` as JSON.

The scripts run as files with the peers' python (their folder on sys.path is how they find this module),
not with ``-m`` and never with the project's python.

Example:
    benchmarks/peers/.venv/bin/python benchmarks/peers/plain_mmoe.py --train t.parquet --test s.parquet \
        --out plain.json
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import os
import resource
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import LabelEncoder

# The flat Parquet layout written by the benchmark's data script.
SPARSE = tuple(f"c{i}" for i in range(16))
BAG = "bag"
BAG_TABLE = "c15"  # the bag's ids come from c15's id space and share its embedding table
DENSE = tuple(f"x{i}" for i in range(8))
TASKS = ("click", "purchase")
EMBEDDING_DIM = 16
N_EXPERTS = 8
EXPERT_DIMS = (256, 128)
TOWER_DIMS = (64,)
PAD = 0  # id 0 is padding and unseen ids alike; known ids are 1..n


@dataclass(frozen=True)
class RunConfig:
    """One run's settings, shared by all three scripts."""

    train: Path
    test: Path
    out: Path
    batch_size: int = 2048
    epochs: int = 1
    threads: int = 2
    lr: float = 1e-3
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("batch_size", "epochs", "threads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}")


def parse_args(description: str, argv: list[str] | None = None) -> RunConfig:
    """The command line every peer script takes, as a :class:`RunConfig`."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--train", type=Path, required=True, help="train Parquet file")
    parser.add_argument("--test", type=Path, required=True, help="test Parquet file")
    parser.add_argument("--out", type=Path, required=True, help="result JSON file")
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    return RunConfig(**vars(parser.parse_args(argv)))


def read_frame(path: Path) -> pd.DataFrame:
    """The Parquet file as pandas, the way both peers' examples start (from a DataFrame)."""
    return pd.read_parquet(path)


class IdVocab:
    """A LabelEncoder fitted on the train ids, shifted by one so that 0 is padding and unseen ids.

    sklearn's ``transform`` raises on unseen ids; test rows map them to ``PAD`` instead.

    Example:
        >>> vocab = IdVocab(np.array([7, 3, 7]))
        >>> vocab.size, vocab.encode(np.array([3, 7, 5])).tolist()
        (3, [1, 2, 0])
    """

    def __init__(self, train_ids: np.ndarray) -> None:
        self.encoder = LabelEncoder().fit(train_ids)
        self.size = len(self.encoder.classes_) + 1  # + the padding / unseen row

    def encode(self, ids: np.ndarray) -> np.ndarray:
        """(N,) raw ids -> (N,) int64 codes in [0, size)."""
        known = np.isin(ids, self.encoder.classes_)
        codes = np.full(len(ids), PAD, dtype=np.int64)
        codes[known] = self.encoder.transform(ids[known]) + 1
        return codes


def bag_ids(frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """The bag column as flat ids (M,) and offsets (N + 1,), int64: row i is ids[offsets[i]:offsets[i+1]]."""
    lists = frame[BAG].to_numpy()
    lengths = np.fromiter((len(row) for row in lists), dtype=np.int64, count=len(lists))
    offsets = np.zeros(len(lists) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.concatenate(lists).astype(np.int64) if len(lists) else np.zeros(0, np.int64)
    return flat, offsets


@dataclass
class Encoded:
    """One frame encoded: ids (N,) int64 per sparse column, the bag as flat ids + offsets, dense (N, 8)."""

    sparse: dict[str, np.ndarray]
    bag: np.ndarray
    bag_offsets: np.ndarray
    dense: np.ndarray
    labels: np.ndarray | None  # (N, T) float32, None when the frame has no labels

    def bag_rows(self) -> list[np.ndarray]:
        """The bag as one array per row, the input both peers' pad_sequences take."""
        return np.split(self.bag, self.bag_offsets[1:-1])


@dataclass
class Encoder:
    """The preprocessing fitted on the train frame and applied unchanged to the test frame.

    Sparse ids get an :class:`IdVocab` each; c15's is fitted on c15 and the bag together, since they share
    a table. Dense columns are standardized with the train mean and std.
    """

    vocabs: dict[str, IdVocab]
    mean: np.ndarray
    std: np.ndarray
    max_bag_len: int

    @classmethod
    def fit(cls, frame: pd.DataFrame) -> Encoder:
        """Fit on the train frame."""
        bag, offsets = bag_ids(frame)
        vocabs = {c: IdVocab(frame[c].to_numpy()) for c in SPARSE if c != BAG_TABLE}
        vocabs[BAG_TABLE] = IdVocab(np.concatenate([frame[BAG_TABLE].to_numpy(), bag]))
        dense = frame[list(DENSE)].to_numpy(np.float64)
        std = dense.std(axis=0)
        max_len = int(np.diff(offsets).max(initial=1))
        return cls(vocabs, dense.mean(axis=0), np.where(std > 0, std, 1.0), max_len)

    def transform(self, frame: pd.DataFrame) -> Encoded:
        """Encode a frame (train or test) with the fitted vocabularies and moments."""
        bag, offsets = bag_ids(frame)
        dense = (frame[list(DENSE)].to_numpy(np.float64) - self.mean) / self.std
        has_labels = all(t in frame.columns for t in TASKS)
        labels = frame[list(TASKS)].to_numpy(np.float32, copy=True) if has_labels else None
        return Encoded(
            sparse={c: self.vocabs[c].encode(frame[c].to_numpy()) for c in SPARSE},
            bag=self.vocabs[BAG_TABLE].encode(bag),
            bag_offsets=offsets,
            dense=dense.astype(np.float32),
            labels=labels,
        )


@dataclass(frozen=True)
class PeerResult:
    """What one script measured; written as JSON to ``--out``."""

    peer: str
    train_seconds: float
    train_rows: int
    train_examples_per_s: float
    predict_seconds: float
    test_rows: int
    predict_rows_per_s: float
    auc: dict[str, float]
    peak_rss_mib: float
    versions: dict[str, str]
    config: dict[str, Any] = field(default_factory=dict)

    def write(self, path: Path) -> None:
        """Write atomically: a temporary name, then a rename."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")
        os.replace(tmp, path)


def versions(*distributions: str) -> dict[str, str]:
    """Installed versions of torch and the named distributions, e.g. ``{"torch": "2.13.0+cpu", ...}``."""
    return {name: metadata.version(name) for name in ("torch", *distributions)}


def peak_rss_mib() -> float:
    """The process's peak resident set so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def auc_per_task(labels: np.ndarray, probabilities: np.ndarray) -> dict[str, float]:
    """ROC AUC per task; labels and probabilities are (N, T) in ``TASKS`` order."""
    return {t: float(roc_auc_score(labels[:, i], probabilities[:, i])) for i, t in enumerate(TASKS)}


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Send the peers' prints to stderr, so that stdout carries only the script's final line."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


def warm_up() -> None:
    """Pay the one-off lazy imports before the clock starts: they cost seconds whatever the data's size.

    The first optimizer imports torch._dynamo, the first LabelEncoder fit and AUC load sklearn's validation
    modules, the first Parquet read loads pyarrow.parquet.
    """
    importlib.import_module("pyarrow.parquet")
    torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))])
    IdVocab(np.arange(3)).encode(np.arange(4))
    roc_auc_score([0, 1], [0.2, 0.8])


def run_peer(
    peer: str,
    train: Callable[[pd.DataFrame, RunConfig], Any],
    predict: Callable[[Any, pd.DataFrame, RunConfig], np.ndarray],
    config: RunConfig,
    distributions: tuple[str, ...] = (),
) -> PeerResult:
    """Time ``train`` and ``predict`` end to end, score AUC on the test rows and write ``config.out``.

    Args:
        peer: the name recorded in the result, e.g. ``"torch-rechub"``.
        train: ``(train frame, config) -> fitted``; all preprocessing happens inside it.
        predict: ``(fitted, test frame, config) -> (N, T)`` probabilities in ``TASKS`` order.
        config: the run's settings.
        distributions: the peer library's distribution names, for ``versions``.
    """
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    warm_up()
    start = time.perf_counter()
    train_frame = read_frame(config.train)
    fitted = train(train_frame, config)
    train_seconds = time.perf_counter() - start
    train_rows = len(train_frame)
    del train_frame
    start = time.perf_counter()
    test_frame = read_frame(config.test)
    probabilities = np.asarray(predict(fitted, test_frame, config), dtype=np.float64)
    predict_seconds = time.perf_counter() - start
    result = PeerResult(
        peer=peer,
        train_seconds=train_seconds,
        train_rows=train_rows,
        train_examples_per_s=train_rows * config.epochs / train_seconds,
        predict_seconds=predict_seconds,
        test_rows=len(test_frame),
        predict_rows_per_s=len(test_frame) / predict_seconds,
        auc=auc_per_task(test_frame[list(TASKS)].to_numpy(), probabilities),
        peak_rss_mib=peak_rss_mib(),
        versions=versions(*distributions),
        config={k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(config).items()},
    )
    result.write(config.out)
    print(json.dumps(dataclasses.asdict(result), separators=(",", ":")))
    return result
