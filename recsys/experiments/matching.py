"""Parameter matching: train configs merged from overrides, variants sized to a reference's parameters.

Sizing every variant to the same dense parameter count keeps a comparison of architectures from being a
comparison of sizes.

Example:
    >>> deep_merge({"model": {"arch": {"type": "mmoe"}}}, {"model": {"arch": {"num_experts": 4}}})
    {'model': {'arch': {'type': 'mmoe', 'num_experts': 4}}}
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


def deep_merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` merged in: mappings recursively, anything else (lists too) replaced.

    Example:
        >>> deep_merge({"a": {"b": 1, "c": [1]}}, {"a": {"c": [2]}})
        {'a': {'b': 1, 'c': [2]}}
    """
    out = copy.deepcopy(dict(base))
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


@dataclass(frozen=True)
class ParameterCount:
    """Parameters of a built model.

    Attributes:
        dense: everything but the embedding tables (experts, gates, towers, interaction).
        embedding: the embedding tables (the same for every variant of a data set).
    """

    dense: int
    embedding: int


def count_parameters(model_config: Any, spec: Any) -> ParameterCount:
    """Counts the parameters of the model a config builds for a feature spec (tables on ``meta``).

    Args:
        model_config: a :class:`~recsys.config.ModelConfig`.
        spec: the data set's :class:`~features.spec.FeatureSpec`.
    """
    from recsys.data.batch import FeatureLayout
    from recsys.model import build_model

    layout = FeatureLayout.from_spec(spec, model_config.embedding)
    model = build_model(model_config, layout, embedding_device="meta")
    embedding = sum(p.numel() for p in model.embedding_parameters())
    return ParameterCount(sum(p.numel() for p in model.parameters()) - embedding, embedding)


def match_parameters(model_config: Any, spec: Any, target: int, max_width: int = 8192) -> Any:
    """Resizes ``arch.expert_hidden`` so that the dense parameter count is the closest to ``target``.

    The layers keep their ratios to the first layer, whose width is searched by bisection (the count grows
    with it). For MMoE and PLE the experts are resized, for shared-bottom and single-task the bottom MLP.

    Returns:
        The model config with the new ``expert_hidden``.
    """
    hidden = model_config.arch.expert_hidden

    def sized(width: int) -> Any:
        layers = tuple(max(1, round(h * width / hidden[0])) for h in hidden)
        arch = dataclasses.replace(model_config.arch, expert_hidden=layers)
        return dataclasses.replace(model_config, arch=arch)

    low, high = 1, max_width
    while low < high:  # the smallest width whose count reaches the target
        mid = (low + high) // 2
        if count_parameters(sized(mid), spec).dense < target:
            low = mid + 1
        else:
            high = mid
    candidates = [w for w in (low - 1, low) if w >= 1]
    best = min(candidates, key=lambda w: abs(count_parameters(sized(w), spec).dense - target))
    return sized(best)
