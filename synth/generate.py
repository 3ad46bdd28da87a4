"""Synthetic e-commerce impressions with click and purchase labels whose true probabilities are known.

:func:`generate` writes four Parquet files into a folder: ``impressions``, ``users`` and ``items`` (the data
contract of :mod:`features.contract`) and ``truth`` (``impression_id``, ``p_click``,
``p_purchase_given_click``, ``p_purchase``), so a model's predictions can be scored against the exact
probabilities the labels were drawn from, not only against the noisy labels.

The truth model is chosen by name, ``world`` (:data:`WORLDS`): today's world, described in :mod:`synth.world`,
is ``default``; the others are described in :mod:`synth.worlds`. The code is split by what it makes:
:mod:`synth.tables` (the catalogue, the users, the Parquet rows), :mod:`synth.traffic` (sessions, page views,
the items shown) and :mod:`synth.truth` (the probabilities and the labels).

Determinism: every random draw comes from a ``numpy.random.Generator`` seeded from
``SeedSequence(seed)`` (one child per table, one for the pilot, one per chunk), timestamps start at the fixed
``START`` (2026-01-01 00:00, read as UTC), so one seed gives byte-identical files.

Example:
    >>> result = generate("data/demo", n_impressions=100_000, seed=7)  # doctest: +SKIP
    >>> result.click_rate  # doctest: +SKIP
    0.05...
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from features.checks import check_int
from features.console import progress as progress_bar
from features.files import atomic_write, staged_file
from synth.tables import (
    ChunkWriter,
    Items,
    Users,
    impressions_table,
    make_items,
    make_users,
    parquet_bytes,
    truth_table,
)
from synth.traffic import Chunk, plan_chunks, simulate_requests
from synth.truth import Rows, calibrate, components, draw_labels, remember_clicks
from synth.world import COMPONENTS, N_TOP, POSITION_BIAS, START, W_CLICK, TruthModel, purchase_weights
from synth.worlds import WORLDS, World, get_world

__all__ = [
    "COMPONENTS",
    "DEFAULT_CHUNK_ROWS",
    "POSITION_BIAS",
    "START",
    "W_CLICK",
    "GenerateResult",
    "WORLDS",
    "TruthModel",
    "generate",
    "purchase_weights",
]

DEFAULT_CHUNK_ROWS = 1_000_000


@dataclass(frozen=True)
class GenerateResult:
    """What :func:`generate` wrote and the label rates it drew.

    Attributes:
        impressions_path: ``impressions.parquet``, the contract's impressions with labels.
        users_path: ``users.parquet``.
        items_path: ``items.parquet``.
        truth_path: ``truth.parquet``: impression_id, p_click, p_purchase_given_click, p_purchase.
        n_impressions: rows of impressions (and of truth).
        n_requests: page views.
        n_users: rows of users.
        n_items: rows of items.
        n_chunks: chunks generated, one or more row groups each.
        click_rate: mean of ``click``.
        purchase_rate: mean of ``purchase``.
        purchase_given_click_rate: purchases per click (NaN without clicks).
        mean_p_click: mean of ``p_click``.
        mean_p_purchase: mean of ``p_purchase``.
        model: the truth model.
        world: the world's name (a key of ``WORLDS``).
    """

    impressions_path: Path
    users_path: Path
    items_path: Path
    truth_path: Path
    n_impressions: int
    n_requests: int
    n_users: int
    n_items: int
    n_chunks: int
    click_rate: float
    purchase_rate: float
    purchase_given_click_rate: float
    mean_p_click: float
    mean_p_purchase: float
    model: TruthModel
    world: str = "default"


@contextmanager
def _staged(paths: list[Path]) -> Iterator[list[Path]]:
    """Yields temporary paths beside ``paths`` and renames them onto ``paths`` only if the block succeeds."""
    with ExitStack() as stack:
        yield [stack.enter_context(staged_file(p)) for p in paths]


def _check_arguments(
    n_impressions: int, seed: int, n_users: int | None, n_items: int | None, days: int, chunk_rows: int
) -> None:
    """Raises ValueError naming the first bad argument (``None`` sizes take their defaults later)."""
    for name, value, low in (
        ("n_impressions", n_impressions, 1),
        ("seed", seed, 0),
        ("n_users", n_users, 1),
        ("n_items", n_items, N_TOP),
        ("days", days, 1),
        ("chunk_rows", chunk_rows, 1),
    ):
        if value is None and name in ("n_users", "n_items"):
            continue
        check_int("generate", name, int(value) if isinstance(value, np.integer) else value, minimum=low)


@dataclass
class _Totals:
    """What the impressions stream drew: requests, label counts and sums of the probabilities."""

    n_requests: int = 0
    clicks: int = 0
    purchases: int = 0
    sum_p_click: float = 0.0
    sum_p_purchase: float = 0.0


def generate(
    out_dir: str | Path,
    n_impressions: int,
    seed: int,
    task_correlation: float = 0.5,
    n_users: int | None = None,
    n_items: int | None = None,
    days: int = 30,
    *,
    world: str = "default",
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    progress: bool = True,
) -> GenerateResult:
    """Writes a synthetic world and its labelled impressions into ``out_dir`` (see the module docstring).

    Impressions are generated in time order, one chunk per day (split further so no chunk exceeds
    ``chunk_rows`` rows), and streamed to Parquet one row group per chunk, so memory stays bounded by the
    chunk size, not by ``n_impressions``. The streamed files are written under temporary names and renamed
    at the end; ``users`` and ``items`` are written whole, atomically, once the stream has succeeded.

    Args:
        out_dir: folder for ``impressions.parquet``, ``users.parquet``, ``items.parquet``,
            ``truth.parquet``; created if missing, files in it replaced.
        n_impressions: rows of ``impressions`` (>= 1).
        seed: non-negative seed; the same seed gives byte-identical files.
        task_correlation: ``rho`` in [-1, 1], the cosine between the click and purchase weight vectors.
        n_users: users (default: the world's, ``max(100, n_impressions // 100)`` in ``default``).
        n_items: items, >= 20 (default: the world's, ``max(200, n_impressions // 50)`` in ``default``).
        days: length of the window in days, starting at ``START``.
        world: the truth model, a key of ``WORLDS`` (see :mod:`synth.worlds`).
        chunk_rows: most rows generated and written at once.
        progress: show a progress bar over chunks (on the screen's standard error).

    Returns:
        The paths written, the row counts, the label rates and the truth model.

    Raises:
        ValueError: naming the argument, if one is out of range.
    """
    _check_arguments(n_impressions, seed, n_users, n_items, days, chunk_rows)
    spec = get_world(world)
    w_click = np.array([t.w_click for t in spec.terms])
    w_purchase = purchase_weights(task_correlation, w_click, np.array([t.purchase for t in spec.terms]))
    n_users = spec.default_users(n_impressions) if n_users is None else int(n_users)
    n_items = spec.default_items(n_impressions) if n_items is None else int(n_items)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    impressions_path, users_path, items_path, truth_path = (
        out / f"{name}.parquet" for name in ("impressions", "users", "items", "truth")
    )
    items_seq, users_seq, pilot_seq, chunks_seq = np.random.SeedSequence(seed).spawn(4)
    items, items_table = make_items(np.random.default_rng(items_seq), n_items, days)
    users, users_table = make_users(np.random.default_rng(users_seq), n_users, spec.pref_concentration)
    pilot_rng = np.random.default_rng(pilot_seq)
    b_click, b_purchase = calibrate(pilot_rng, spec, users, items, days, w_click, w_purchase)
    model = TruthModel(
        task_correlation=float(task_correlation),
        bias_click=b_click,
        bias_purchase=b_purchase,
        w_click=tuple(float(w) for w in w_click),
        w_purchase=tuple(float(w) for w in w_purchase),
        components=spec.components,
    )
    chunks = plan_chunks(n_impressions, days, chunk_rows)

    with _staged([impressions_path, truth_path]) as (impressions_tmp, truth_tmp):
        with ChunkWriter(impressions_tmp, truth_tmp, _truth_metadata(model, spec)) as writer:
            bar = progress_bar(chunks, desc="generate", unit="chunk", disable=None if progress else True)
            totals = _stream_impressions(writer, bar, chunks_seq, spec, users, items, model)
        atomic_write(users_path, parquet_bytes(users_table))
        atomic_write(items_path, parquet_bytes(items_table))

    return GenerateResult(
        impressions_path=impressions_path,
        users_path=users_path,
        items_path=items_path,
        truth_path=truth_path,
        n_impressions=n_impressions,
        n_requests=totals.n_requests,
        n_users=n_users,
        n_items=n_items,
        n_chunks=len(chunks),
        click_rate=totals.clicks / n_impressions,
        purchase_rate=totals.purchases / n_impressions,
        purchase_given_click_rate=totals.purchases / totals.clicks if totals.clicks else math.nan,
        mean_p_click=totals.sum_p_click / n_impressions,
        mean_p_purchase=totals.sum_p_purchase / n_impressions,
        model=model,
        world=spec.name,
    )


def _truth_metadata(model: TruthModel, world: World) -> dict[str, str]:
    """Schema metadata of ``truth.parquet``: the model and, outside ``default``, the world's parameters.

    Files written before worlds existed carry no ``world`` key and are all of the default world, so the
    default world writes none either: its files stay byte-identical to theirs.
    """
    metadata = {"truth_model": model.to_json()}
    if world.name != "default":
        metadata["world"] = world.to_json()
    return metadata


def _stream_impressions(
    writer: ChunkWriter,
    chunks: Sequence[Chunk],
    chunks_seq: np.random.SeedSequence,
    world: World,
    users: Users,
    items: Items,
    model: TruthModel,
) -> _Totals:
    """Draws the impressions and their labels chunk by chunk, in time order, and queues them to ``writer``."""
    last_click_top = np.full(len(users.propensity), -1, dtype=np.int64)  # top category of each latest click
    todays_clicks: list[tuple[np.ndarray, np.ndarray]] = []  # (user, top category), applied at midnight
    today = 0
    totals = _Totals()
    next_impression = 1
    for chunk, chunk_seq in zip(chunks, chunks_seq.spawn(len(chunks)), strict=True):
        if chunk.day != today:
            # The history effect counts clicks of earlier days only, however a day is chunked.
            remember_clicks(last_click_top, todays_clicks)
            todays_clicks, today = [], chunk.day
        rng = np.random.default_rng(chunk_seq)
        imps = simulate_requests(rng, users, items, chunk)
        z = components(world, Rows(imps, users, items, last_click_top))
        p_click, p_given, click, purchase = draw_labels(rng, z, imps.position, model)
        p_purchase = p_click * p_given
        todays_clicks.append((imps.user[click], items.top[imps.item[click]]))

        impression_id = np.arange(next_impression, next_impression + chunk.n_rows, dtype=np.int64)
        writer.write(
            impressions_table(imps, impression_id, totals.n_requests + 1, click, purchase),
            truth_table(impression_id, p_click, p_given, p_purchase),
        )
        next_impression += chunk.n_rows
        totals.n_requests += imps.n_requests
        totals.clicks += int(click.sum())
        totals.purchases += int(purchase.sum())
        totals.sum_p_click += float(p_click.sum())
        totals.sum_p_purchase += float(p_purchase.sum())
    return totals
