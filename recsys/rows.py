"""Raw contract rows as the feature code takes them: one joined frame split into its tables, types cast.

:func:`recsys.package.predict_frame` scores one flat frame of impressions joined with users and items (the
pyfunc model's input); :func:`ecommerce_tables` splits it into the contract's tables, casting each column
to its contract type and naming the column that cannot take it. :func:`history_needs` says which history
columns a spec's features read.
"""

from __future__ import annotations

from typing import Any

import polars as pl

from features.affinity import AFFINITY, HistoryNeeds
from features.affinity import history_needs as affinity_needs
from features.contract import IMPRESSIONS, ITEMS, LABELS, USERS, TableContract, validate
from features.pipeline import Tables
from features.spec import FeatureSpec

# Columns the click history reads from a history frame (see features.derive.click_history).
ROW = "__input_row"  # the input's row number, carried through the feature code to restore the row order
HISTORY_COLUMNS = ("impression_id", "ts", "user_id", "item_id", "click")


def history_needs(spec: FeatureSpec) -> tuple[tuple[str, ...], HistoryNeeds]:
    """The history columns a spec's features read, and what else its affinity features need of the log.

    Without affinity features: :data:`HISTORY_COLUMNS` of the click events. Affinity features may also
    need ``purchase``, the non-click impressions and the other users' events
    (:func:`features.affinity.history_needs`).
    """
    needs = affinity_needs([f for f in spec.feature_config.features if f.kind == AFFINITY])
    return HISTORY_COLUMNS + (("purchase",) if needs.purchases else ()), needs


def to_polars(frame: Any, name: str) -> pl.DataFrame:
    """A polars DataFrame from a polars (lazy) or pandas frame."""
    if isinstance(frame, pl.LazyFrame):
        return frame.collect()
    if isinstance(frame, pl.DataFrame):
        return frame
    if type(frame).__module__.split(".")[0] == "pandas":
        # NaN becomes null, as the features expect; the pandas index is not data and is dropped.
        return pl.from_pandas(frame, nan_to_null=True)
    raise TypeError(f"{name}: expected a polars or pandas DataFrame, got {type(frame).__name__}")


def _require(data: pl.DataFrame, columns: list[str], name: str, what: str) -> None:
    missing = [c for c in columns if c not in data.columns]
    if missing:
        raise ValueError(
            f"{name}: missing column(s) {missing} (e.g. {missing[0]!r}, {what}); "
            f"the frame has columns {data.columns}"
        )


def _to_contract_type(column: str, source: pl.DataType, target: pl.DataType) -> pl.Expr:
    """The expression converting ``column`` from its type to the contract type ``target``."""
    expr = pl.col(column)
    if isinstance(target, pl.Datetime):
        if source == pl.String:
            # JSON inputs (e.g. MLflow serving) carry timestamps as ISO strings.
            expr = expr.str.to_datetime(time_unit="us", strict=True)
            source = pl.Datetime("us")
        if isinstance(source, pl.Datetime) and source.time_zone is not None:
            # The contract's timestamps are naive UTC.
            expr = expr.dt.convert_time_zone("UTC").dt.replace_time_zone(None)
    return expr.cast(target, strict=True)


def _cast_contract(data: pl.DataFrame, contracts: tuple[TableContract, ...], name: str) -> pl.DataFrame:
    """Casts the contract columns present in ``data`` to their contract types.

    Pandas input arrives with its own types (int64 positions, nanosecond timestamps, float64 ints where a
    left join left nulls), JSON input with timestamps as strings; the feature code joins on and compares
    these columns, so they must match.

    Raises:
        ValueError: a column cannot be converted; the message names it.
    """
    casts = []
    for contract in contracts:
        for col in contract.columns:
            if col.name not in data.columns or data.schema[col.name] == col.dtype:
                continue
            expr = _to_contract_type(col.name, data.schema[col.name], col.dtype)
            try:
                data.select(expr)  # each column alone, so that the error can name it
            except pl.exceptions.PolarsError as e:
                raise ValueError(
                    f"{name}.{col.name}: cannot convert {data.schema[col.name]} to the contract type "
                    f"{col.dtype} ({type(e).__name__}: {' '.join(str(e).split())[:200]})"
                ) from None
            casts.append(expr)
    return data.with_columns(casts) if casts else data


def empty_history(columns: tuple[str, ...] = HISTORY_COLUMNS) -> pl.DataFrame:
    """A history of no events, with ``columns`` in their contract types."""
    schema = {c.name: c.dtype for c in IMPRESSIONS.columns if c.name in columns}
    return pl.DataFrame(schema=schema)


def _entities(data: pl.DataFrame, contract: TableContract) -> pl.DataFrame:
    """One row per key of a users or items table, from the joined rows that repeat it.

    Rows whose attributes are all null (an unknown user or item, left-joined) are dropped: an absent key
    joins to the same nulls, and another row may know the attributes. Of the rest, the first row wins.
    """
    attributes = [c.name for c in contract.columns if c.name != contract.key]
    return (
        data.select(c.name for c in contract.columns)
        .filter(~pl.all_horizontal(pl.col(attributes).is_null()))
        .unique(contract.key, keep="first", maintain_order=True)
    )


def ecommerce_tables(
    data: pl.DataFrame, history: Any, name: str, columns: tuple[str, ...] = HISTORY_COLUMNS
) -> Tables:
    """Splits joined rows back into the contract tables, as the training pipeline reads them.

    ``columns``: what the spec's history features read of a history frame (:func:`history_needs`).
    """
    without_labels = [c.name for c in IMPRESSIONS.without_labels().columns]
    _require(data, without_labels, name, "an impressions column")
    _require(data, [c.name for c in USERS.columns], name, "a users column")
    _require(data, [c.name for c in ITEMS.columns], name, "an items column")
    data = _cast_contract(data, (IMPRESSIONS, USERS, ITEMS), name)
    # Labels stay when present: they are the click history for later rows (see predict_frame).
    impressions = data.select(*without_labels, *[c for c in LABELS if c in data.columns], ROW)
    validate(impressions.drop(ROW), "impressions", labels=False)
    users = _entities(data, USERS)
    item_rows = [data.select(c.name for c in ITEMS.columns)]
    if history is None:
        labelled = all(c in data.columns for c in columns if c in LABELS)
        if "click" in data.columns and not labelled:
            _require(data, list(columns), name, "read by the affinity features of the labelled rows' history")
        events = None if labelled else empty_history(columns)
    else:
        hist = to_polars(history, "history")
        _require(hist, list(columns), "history", "read by the history features")
        hist = _cast_contract(hist, (IMPRESSIONS, ITEMS), "history")
        events = hist.select(columns)
        if all(c.name in hist.columns for c in ITEMS.columns):
            # A joined history frame also tells the categories of clicked items the rows do not show.
            item_rows.append(hist.select(c.name for c in ITEMS.columns))
    items = _entities(pl.concat(item_rows), ITEMS)
    return Tables(
        impressions.lazy(),
        users.lazy(),
        items.lazy(),
        None if events is None else events.lazy(),
    )
