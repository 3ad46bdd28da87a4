"""How close to the oracle AUC can any model learned from the data get? A well-specified ceiling.

The oracle AUC of a generated data set scores the test rows with the true probabilities, which use latent
traits the data only hints at: each user's propensity, top-category preferences and price sensitivity, and
each item's quality. A model learned from labels can at best estimate those traits from the user's and
item's training rows. This script measures that limit: it fits, by penalized maximum likelihood, a model of
the generators' functional form (see :mod:`synth.generate`, "The truth", and :mod:`synth.worlds`), with
the exact components computed from the raw tables and only the latent traits and the weights left to
learn. The form is the union of every world's terms, so that it is well specified for each world (a world
leaves the weights of the terms it does not use at zero):

* click: ``logit = b + a[user] + q[item] + A[user, top category] + s[user] * price deviation
  + history + price deviation + rating + novelty + device + page + hour + member level
  + (top category x hour) + (top category x weekend) + position`` (one learned weight or effect each);
* purchase given click: the same form without position, fitted on clicked rows;
* ``p_purchase = p_click * p_purchase_given_click``, as in the truth.

No learned ranker can expect to beat this on the same rows: it is told the true form and the true
components and only has to estimate the latents. The time split is that of the ``ecommerce`` feature
config (the last 3 calendar days test, the 3 before validation); each task keeps the epoch with the best
validation AUC.

    python -m benchmarks.oracle_ceiling --raw data/demo/raw [--epochs 6] [--l2 1e-4]

Any world's raw folder works (``python -m pipelines.generate --world interest``).

It prints, per task, the validation and test AUC of the ceiling model and of the oracle, and the gap.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch
from torch import nn

from recsys.metrics import auc

N_TOP = 20


def load(raw: Path, test_days: int = 3, valid_days: int = 3) -> pl.DataFrame:
    """Impressions with the truth, the exact truth components and the split (0 train, 1 valid, 2 test)."""
    items = pl.read_parquet(raw / "items.parquet")
    tops = items["top_category"].unique().sort()
    items = items.with_columns(
        top=pl.col("top_category").replace_strict(tops, list(range(len(tops))), return_dtype=pl.Int64),
        log_price=pl.col("price").log(),
    ).with_columns(price_dev=pl.col("log_price") - pl.col("log_price").median().over("category_id"))
    df = (
        pl.read_parquet(raw / "impressions.parquet")
        .join(items.select("item_id", "top", "price_dev", "rating", "listing_ts"), on="item_id")
        .join(pl.read_parquet(raw / "truth.parquet"), on="impression_id")
        .join(pl.read_parquet(raw / "users.parquet").select("user_id", "member_level"), on="user_id")
        .sort("ts")
        .with_columns(day=pl.col("ts").dt.truncate("1d"))
    )
    # History: the top category of the user's last click on an earlier (UTC) day.
    clicks = (
        df.filter(pl.col("click") == 1).select("user_id", click_ts="ts", click_top="top").sort("click_ts")
    )
    df = df.join_asof(
        clicks,
        left_on="day",
        right_on="click_ts",
        by="user_id",
        strategy="backward",
        allow_exact_matches=False,
    )
    days = df["day"].unique().sort()
    test, valid = days[-test_days:], days[-(test_days + valid_days) : -test_days]
    return df.with_columns(
        history=(pl.col("click_top") == pl.col("top")).fill_null(False).cast(pl.Float32),
        novelty=(-(pl.col("ts") - pl.col("listing_ts")).dt.total_seconds() / (86_400 * 14)).exp(),
        rating_c=(pl.col("rating") - 4).fill_null(0),
        log_position=pl.col("position").cast(pl.Float32).log(),
        device_code=pl.col("device").rank("dense") - 1,
        page_code=pl.col("page").rank("dense") - 1,
        hour=pl.col("ts").dt.hour(),
        member=pl.col("member_level").cast(pl.Int64).rank("dense") - 1,
        top_hour=pl.col("top") * 24 + pl.col("ts").dt.hour(),
        top_weekend=pl.col("top") * 2 + (pl.col("ts").dt.weekday() >= 6).cast(pl.Int64),
        split=pl.when(pl.col("day").is_in(test.implode()))
        .then(2)
        .when(pl.col("day").is_in(valid.implode()))
        .then(1)
        .otherwise(0),
    )


class TruthForm(nn.Module):
    """The truth's logit with its latent traits and weights learned (zero-initialized).

    Args:
        num_users: user ids are ``0 .. num_users - 1``.
        num_items: item ids are ``0 .. num_items - 1``.
        num_numeric: numeric components with one learned weight each.
        num_members: member levels are ``0 .. num_members - 1``.
    """

    def __init__(self, num_users: int, num_items: int, num_numeric: int, num_members: int = 8) -> None:
        super().__init__()
        self.propensity = nn.Embedding(num_users, 1)
        self.quality = nn.Embedding(num_items, 1)
        self.affinity = nn.Embedding(num_users, N_TOP)
        self.price_sensitivity = nn.Embedding(num_users, 1)
        self.top = nn.Embedding(N_TOP, 1)
        self.device = nn.Embedding(3, 1)
        self.page = nn.Embedding(5, 1)
        self.hour = nn.Embedding(24, 1)
        self.member = nn.Embedding(num_members, 1)
        self.top_hour = nn.Embedding(N_TOP * 24, 1)
        self.top_weekend = nn.Embedding(N_TOP * 2, 1)
        self.linear = nn.Linear(num_numeric, 1)
        for module in self.modules():
            if isinstance(module, nn.Embedding):
                nn.init.zeros_(module.weight)
        self.latents = (self.propensity, self.quality, self.affinity, self.price_sensitivity)

    def forward(self, cols: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B,)`` logits and the ``(B,)`` squared norm of the latents the rows read (for the L2 penalty)."""
        user, item = cols["user"], cols["item"]
        latent = [
            self.propensity(user),
            self.quality(item),
            self.affinity(user),
            self.price_sensitivity(user),
        ]
        z = (
            self.linear(cols["numeric"]).squeeze(1)
            + latent[0].squeeze(1)
            + latent[1].squeeze(1)
            + latent[2].gather(1, cols["top"][:, None]).squeeze(1)
            + latent[3].squeeze(1) * cols["price_dev"]
            + self.top(cols["top"]).squeeze(1)
            + self.device(cols["device"]).squeeze(1)
            + self.page(cols["page"]).squeeze(1)
            + self.hour(cols["hour"]).squeeze(1)
            + self.member(cols["member"]).squeeze(1)
            + self.top_hour(cols["top_hour"]).squeeze(1)
            + self.top_weekend(cols["top_weekend"]).squeeze(1)
        )
        return z, sum(t.pow(2).sum(1) for t in latent)


def tensors(df: pl.DataFrame, numeric: list[str]) -> dict[str, torch.Tensor]:
    """The model's inputs as tensors, one entry per row of ``df``."""

    def col(name: str, dtype: torch.dtype = torch.long) -> torch.Tensor:
        return torch.tensor(df[name].to_numpy(), dtype=dtype)

    return {
        "user": col("user_id"),
        "item": col("item_id"),
        "top": col("top"),
        "device": col("device_code"),
        "page": col("page_code"),
        "hour": col("hour"),
        "member": col("member"),
        "top_hour": col("top_hour"),
        "top_weekend": col("top_weekend"),
        "price_dev": col("price_dev", torch.float32),
        "numeric": torch.tensor(df.select(numeric).to_numpy(), dtype=torch.float32),
    }


def fit(
    df: pl.DataFrame, label: str, rows: np.ndarray, numeric: list[str], epochs: int, l2: float, seed: int
) -> list[torch.Tensor]:
    """Fits :class:`TruthForm` on ``rows`` of ``df``; returns the logits of every row of ``df`` per epoch."""
    torch.manual_seed(seed)
    cols = tensors(df, numeric)
    y = torch.tensor(df[label].to_numpy(), dtype=torch.float32)
    model = TruthForm(
        int(df["user_id"].max()) + 1, int(df["item_id"].max()) + 1, len(numeric), int(df["member"].max()) + 1
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    train = torch.as_tensor(rows)
    per_epoch = []
    for _ in range(epochs):
        for batch in train[torch.randperm(len(train))].split(8192):
            z, norm = model({k: v[batch] for k, v in cols.items()})
            loss = nn.functional.binary_cross_entropy_with_logits(z, y[batch]) + l2 * norm.mean() * 1000
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            per_epoch.append(model(cols)[0])
    return per_epoch


def main(argv: list[str] | None = None) -> int:
    """Fits the ceiling models and prints their AUCs next to the oracle's."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--raw", type=Path, required=True, help="a folder written by pipelines.generate")
    parser.add_argument("--epochs", type=int, default=6, help="passes over the training rows")
    parser.add_argument(
        "--l2", type=float, default=1e-4, help="L2 penalty on the per-user and per-item latents"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    df = load(args.raw)
    split = df["split"].to_numpy()
    train, valid, test = (np.flatnonzero(split == k) for k in range(3))
    print(f"{df.height:,} impressions: train {len(train):,}, valid {len(valid):,}, test {len(test):,}")

    click_numeric = ["history", "price_dev", "rating_c", "novelty", "log_position"]
    click_logits = fit(df, "click", train, click_numeric, args.epochs, args.l2, args.seed)
    clicked = train[df["click"].to_numpy()[train] == 1]
    pgc_logits = fit(df, "purchase", clicked, click_numeric[:-1], args.epochs, args.l2, args.seed)

    labels = {t: df[t].to_numpy() for t in ("click", "purchase")}
    oracle = {"click": df["p_click"].to_numpy(), "purchase": df["p_purchase"].to_numpy()}

    def best(scores: list[np.ndarray], task: str) -> tuple[int, np.ndarray]:
        aucs = [auc(labels[task][valid], s[valid]) for s in scores]
        epoch = int(np.argmax(aucs))
        return epoch, scores[epoch]

    click_probs = [torch.sigmoid(z).numpy().astype(np.float64) for z in click_logits]
    c_epoch, p_click = best(click_probs, "click")
    purchase_probs = [p_click * torch.sigmoid(z).numpy().astype(np.float64) for z in pgc_logits]
    p_epoch, p_purchase = best(purchase_probs, "purchase")
    print(
        f"fitted in {time.perf_counter() - start:.0f} s (l2 {args.l2}, best epochs: click {c_epoch}, "
        f"purchase given click {p_epoch})"
    )
    print(f"{'task':10s} {'split':6s} {'ceiling':>8s} {'oracle':>8s} {'gap':>8s}")
    for task, scores in (("click", p_click), ("purchase", p_purchase)):
        for name, rows in (("valid", valid), ("test", test)):
            ours, truth = auc(labels[task][rows], scores[rows]), auc(labels[task][rows], oracle[task][rows])
            print(f"{task:10s} {name:6s} {ours:8.4f} {truth:8.4f} {truth - ours:8.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
