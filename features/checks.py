"""The configuration vocabulary shared by every config of the project (features, model, training, scoring).

One home for how a bad value is reported and how a config is found, so that every error reads alike:
``section.field: expected ..., got value``.

Example:
    >>> check_int("training", "epochs", 0, minimum=1)
    Traceback (most recent call last):
    ...
    ValueError: training.epochs: expected an integer >= 1, got 0
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any


def invalid(where: str, field_name: str, value: Any, expected: str) -> ValueError:
    """The ValueError for a bad config value: ``where.field: expected ..., got value``."""
    return ValueError(f"{where}.{field_name}: {expected}, got {value!r}")


def from_mapping(cls: type, data: Any, where: str) -> Any:
    """Builds dataclass ``cls`` from ``data``, rejecting unknown keys by name."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {data!r}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; known fields are {sorted(known)}")
    return cls(**data)


def is_int(value: Any) -> bool:
    """True for an ``int`` that is not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """True for a finite ``int`` or ``float`` that is not a ``bool``."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def check_int(where: str, name: str, value: Any, minimum: int = 1) -> None:
    """Raises unless ``value`` is an integer >= ``minimum``."""
    if not is_int(value) or value < minimum:
        raise invalid(where, name, value, f"expected an integer >= {minimum}")


def check_number(
    where: str, name: str, value: Any, *, low: float = 0.0, low_open: bool = True, high: float | None = None
) -> None:
    """Raises unless ``value`` is a finite number > ``low`` (>= if not ``low_open``) and <= ``high``."""
    above = is_number(value) and (value > low if low_open else value >= low)
    if not above or (high is not None and value > high):
        bound = f"{'>' if low_open else '>='} {low:g}" + ("" if high is None else f" and <= {high:g}")
        raise invalid(where, name, value, f"expected a number {bound}")


def as_tuple(where: str, name: str, value: Any) -> tuple[Any, ...]:
    """``value`` (a list) as a tuple; raises for a scalar, such as ``windows_days: 7`` in YAML.

    A string is refused too: ``tuple("log1p")`` would silently be its letters.
    """
    if not isinstance(value, list | tuple):
        raise invalid(where, name, value, "expected a list")
    return tuple(value)


def non_finite(data: Any, where: str = "") -> tuple[str, float] | None:
    """The first infinite or NaN float in nested dicts and lists, with its path (``steps[1].mean``).

    Example:
        >>> non_finite({"steps": [{"op": "log1p"}, {"mean": float("inf")}]})
        ('steps[1].mean', inf)
    """
    if isinstance(data, float):
        return None if math.isfinite(data) else (where, data)
    if isinstance(data, dict):
        items = [(f"{where}.{k}" if where else str(k), v) for k, v in data.items()]
    elif isinstance(data, list | tuple):
        items = [(f"{where}[{i}]", v) for i, v in enumerate(data)]
    else:
        return None
    for path, value in items:
        found = non_finite(value, path)
        if found is not None:
            return found
    return None


def read_json_object(path: str | Path, what: str) -> dict[str, Any]:
    """The JSON object in file ``path``; a ValueError naming the file when it is not one.

    ``NaN`` and ``Infinity`` (not JSON, though Python's ``json`` writes and reads them) are refused.
    """
    path = Path(path)

    def refuse(constant: str) -> None:
        raise ValueError(f"{path}: {constant} is not a JSON number; a {what} holds finite numbers only")

    try:
        body = json.loads(path.read_text(), parse_constant=refuse)
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"{path}: not a {what} JSON file: {exc.msg} at line {exc.lineno}, column {exc.colno}"
        ) from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a {what} JSON file: not UTF-8 text") from None
    except IsADirectoryError:
        raise ValueError(f"{path}: is a folder; give the {what} JSON file") from None
    if not isinstance(body, dict):
        raise ValueError(f"{path}: not a {what} JSON file: expected an object, got {type(body).__name__}")
    return body


def check_choice(where: str, name: str, value: Any, choices: Sequence[Any]) -> None:
    """Raises unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise invalid(where, name, value, f"expected one of {list(choices)}")


def shipped_config(directory: Path, name: str, what: str = "config") -> Path:
    """Path of the YAML config ``name`` shipped in ``directory``; the error lists the shipped names."""
    path = directory / f"{name}.yaml"
    if not path.exists():
        shipped = sorted(p.stem for p in directory.glob("*.yaml"))
        raise ValueError(f"{what}: no shipped config {name!r}; shipped configs are {shipped}")
    return path


def config_path(name_or_path: str | Path, directory: Path, what: str = "config") -> Path:
    """A YAML path as given (``*.yaml``, ``*.yml``), or the path of a config shipped in ``directory``.

    Example:
        >>> config_path("my/run.yaml", Path("configs")).as_posix()
        'my/run.yaml'
    """
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        return path
    return shipped_config(directory, str(name_or_path), what)
