"""The data contract: the three Parquet tables every pipeline takes, and the check that runs first.

Recommendation engineers bring three tables:

* ``impressions``: one row per (request, item) shown, with the ``click`` and ``purchase`` labels; scoring
  inputs have the same columns without the labels.
* ``users``: one row per user.
* ``items``: one row per item.

Timestamps are timezone-naive microseconds (``timestamp[us]``), read as UTC. Extra columns are allowed and
passed through untouched. :func:`validate` checks a table against the contract and raises
:class:`ContractError` naming the table, the column and an example offending value, before any work is done.

Example:
    >>> import polars as pl
    >>> validate(pl.scan_parquet("users.parquet"), "users")  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

LABELS = ("click", "purchase")


@dataclass(frozen=True)
class Column:
    """One column of a contract table."""

    name: str
    dtype: pl.DataType
    nullable: bool = False
    doc: str = ""


@dataclass(frozen=True)
class TableContract:
    """The columns of one table and its unique key."""

    name: str
    columns: tuple[Column, ...]
    key: str

    def column(self, name: str) -> Column:
        """Returns the column called ``name``."""
        return next(c for c in self.columns if c.name == name)

    def without_labels(self) -> TableContract:
        """The same table as a scoring input: no label columns."""
        cols = tuple(c for c in self.columns if c.name not in LABELS)
        return TableContract(self.name, cols, self.key)


TIMESTAMP = pl.Datetime("us")

IMPRESSIONS = TableContract(
    "impressions",
    (
        Column("impression_id", pl.Int64(), doc="unique id of the impression"),
        Column("request_id", pl.Int64(), doc="one page view that showed several items"),
        Column("ts", TIMESTAMP, doc="when the page was shown (UTC)"),
        Column("user_id", pl.Int64()),
        Column("item_id", pl.Int64()),
        Column("position", pl.Int16(), doc="1-based slot on the page"),
        Column("device", pl.String()),
        Column("page", pl.String()),
        Column("click", pl.Int8(), doc="0/1"),
        Column("purchase", pl.Int8(), doc="0/1; purchase=1 implies click=1"),
    ),
    key="impression_id",
)

USERS = TableContract(
    "users",
    (
        Column("user_id", pl.Int64()),
        Column("age_bucket", pl.String()),
        Column("gender", pl.String()),
        Column("city", pl.String()),
        Column("member_level", pl.Int8()),
        Column("signup_ts", TIMESTAMP),
    ),
    key="user_id",
)

ITEMS = TableContract(
    "items",
    (
        Column("item_id", pl.Int64()),
        Column("category_id", pl.Int64(), doc="leaf category"),
        Column("top_category", pl.String()),
        Column("brand_id", pl.Int64()),
        Column("shop_id", pl.Int64()),
        Column("price", pl.Float64(), doc=">= 0"),
        Column("rating", pl.Float32(), nullable=True, doc="null when the item has no reviews"),
        Column("listing_ts", TIMESTAMP),
    ),
    key="item_id",
)

CONTRACTS = {c.name: c for c in (IMPRESSIONS, USERS, ITEMS)}


class ContractError(ValueError):
    """A table breaks the data contract; the message names table, column and an offending value."""


def _example(lf: pl.LazyFrame, predicate: pl.Expr, column: str) -> object:
    """First value of ``column`` among the rows matching ``predicate`` (for error messages)."""
    rows = lf.filter(predicate).select(column).head(1).collect()
    return rows.item() if rows.height else None


def validate(
    data: pl.LazyFrame | pl.DataFrame,
    table: str,
    *,
    labels: bool = True,
) -> pl.LazyFrame:
    """Checks ``data`` against the contract of ``table`` and returns it as a LazyFrame.

    Checks, in this order: every contract column is present; each has the contract's type; no nulls in
    non-nullable columns; the key is unique; and the table's value rules (labels are 0/1, purchase implies
    click, position >= 1, price >= 0). All problems found are reported together.

    Args:
        data: the table, lazy or in memory. Extra columns are allowed.
        table: ``"impressions"``, ``"users"`` or ``"items"``.
        labels: for impressions, whether ``click`` and ``purchase`` are required (False for scoring input).

    Returns:
        ``data`` as a LazyFrame, unchanged.

    Raises:
        ContractError: with one line per problem, each naming table, column and an example value.
        ValueError: if ``table`` is not a contract table.
    """
    if table not in CONTRACTS:
        raise ValueError(f"table: unknown contract table {table!r}; expected one of {sorted(CONTRACTS)}")
    contract = CONTRACTS[table] if labels else CONTRACTS[table].without_labels()
    lf = data.lazy()
    schema = lf.collect_schema()

    missing = [c.name for c in contract.columns if c.name not in schema]
    if missing:
        raise ContractError(
            f"{table}: missing column(s) {missing}; the table has columns {list(schema.names())}"
        )

    errors: list[str] = []
    for col in contract.columns:
        got = schema[col.name]
        if got != col.dtype:
            errors.append(
                f"{table}.{col.name}: expected type {col.dtype}, got {got} "
                f"(example value: {_example(lf, pl.lit(True), col.name)!r})"
            )
    if errors:
        raise ContractError("\n".join(errors))

    # One pass over the data computes every rule; example values are fetched only for the rules that fail.
    rules: dict[str, tuple[str, pl.Expr, str]] = {}
    for col in contract.columns:
        if not col.nullable:
            rules[f"null_{col.name}"] = (
                col.name,
                pl.col(col.name).is_null(),
                "null in a non-nullable column",
            )
    if table == "impressions":
        rules["position"] = ("position", pl.col("position") < 1, "position must be >= 1")
        if labels:
            for name in LABELS:
                rules[f"label_{name}"] = (name, ~pl.col(name).is_in([0, 1]), "label must be 0 or 1")
            rules["purchase_click"] = (
                "purchase",
                (pl.col("purchase") == 1) & (pl.col("click") != 1),
                "purchase=1 without click=1",
            )
    if table == "items":
        # is_finite is False for NaN and for +-inf: an infinite price made every row's price features
        # non-finite downstream (issue 20), so it is refused here like NaN.
        price = pl.col("price")
        rules["price"] = ("price", (price < 0) | ~price.is_finite(), "price must be finite and >= 0")
        rules["rating"] = (
            "rating",
            ~pl.col("rating").is_finite(),
            "rating is NaN or infinite (use null for no rating)",
        )

    counts = lf.select(
        pl.len().alias("__rows"),
        pl.col(contract.key).n_unique().alias("__unique"),
        *[expr.fill_null(False).sum().alias(rule) for rule, (_, expr, _) in rules.items()],
    ).collect()
    stats = counts.row(0, named=True)

    for rule, (column, expr, what) in rules.items():
        n_bad = stats[rule]
        if n_bad:
            example = _example(lf, expr.fill_null(False), contract.key)
            value = _example(lf, expr.fill_null(False), column)
            errors.append(
                f"{table}.{column}: {what}: {n_bad} row(s), e.g. {column}={value!r} "
                f"at {contract.key}={example!r}"
            )
    if stats["__unique"] != stats["__rows"]:
        dup = lf.group_by(contract.key).len().filter(pl.col("len") > 1).head(1).collect()
        errors.append(
            f"{table}.{contract.key}: key is not unique: {stats['__rows'] - stats['__unique']} duplicate "
            f"row(s), e.g. {contract.key}={dup[contract.key].item()!r} appears {dup['len'].item()} times"
        )
    if errors:
        raise ContractError("\n".join(errors))
    return lf
