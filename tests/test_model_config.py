"""Model config: shipped configs load, bad values name the field and the value."""

from __future__ import annotations

import pytest

from recsys.config import ModelConfig, builtin_config

BASE = {"tasks": [{"name": "click"}, {"name": "purchase"}]}


def config(**sections) -> ModelConfig:
    return ModelConfig.from_dict({**BASE, **sections})


def test_defaults_and_shipped_configs():
    cfg = config()
    assert (cfg.arch.type, cfg.gate.type, cfg.embedding.pooling) == ("mmoe", "softmax", "mean")
    assert [t.label for t in cfg.tasks] == ["click", "purchase"]
    for name in ("ecommerce_mmoe", "ecommerce_ple", "benchmark_mmoe"):
        loaded = ModelConfig.from_yaml(builtin_config(name))
        assert [t.name for t in loaded.tasks] == ["click", "purchase"]
    assert ModelConfig.from_yaml(builtin_config("ecommerce_mmoe")).tasks[1].given == "click"
    with pytest.raises(ValueError, match="no shipped config 'nope'"):
        builtin_config("nope")


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        (
            {"arch": {"type": "moe"}},
            r"model\.arch\.type: expected one of \['mmoe', 'omoe', 'ple', 'shared_bottom', "
            r"'single_task'\], got 'moe'",
        ),
        ({"arch": {"num_experts": 0}}, r"model\.arch\.num_experts: expected an integer >= 1, got 0"),
        (
            {"arch": {"expert_hidden": []}},
            r"model\.arch\.expert_hidden: expected a list of layer sizes \(non-empty\), "
            r"got \[\]",
        ),
        ({"arch": {"tower_hidden": [64, 0]}}, r"model\.arch\.tower_hidden: .* got \[64, 0\]"),
        ({"arch": {"dropout": 1.5}}, r"model\.arch\.dropout: expected a number in \[0, 1\), got 1\.5"),
        (
            {"arch": {"type": "ple", "num_shared_experts": 0, "num_task_experts": 0}},
            r"model\.arch\.num_task_experts: ple needs at least one expert per gate, got 0",
        ),
        ({"arch": {"colour": 1}}, r"model\.arch: unknown field\(s\) \['colour'\]"),
        (
            {"arch": {"type": "ple", "num_task_experts": [1, 2, 3]}},
            r"model\.arch\.num_task_experts: expected one number per task of .*, got \[1, 2, 3\]",
        ),
        (
            {"arch": {"type": "ple", "num_shared_experts": 0, "num_task_experts": [1, 0]}},
            r"model\.arch\.num_task_experts: ple needs at least one expert per gate, got \[1, 0\]",
        ),
        (
            {"arch": {"type": "mmoe", "num_task_experts": [1, -1]}},
            r"model\.arch\.num_task_experts: expected integers >= 0, one per task, got \[1, -1\]",
        ),
        (
            {"arch": {"type": "shared_bottom", "num_task_experts": 2}},
            r"model\.arch\.num_task_experts: task experts need mmoe or ple, not shared_bottom, got 2",
        ),
        (
            {"gate": {"type": "hash"}},
            r"model\.gate\.type: expected one of \['softmax', 'noisy_topk'\], got 'hash'",
        ),
        (
            {"gate": {"type": "noisy_topk", "k": 9}},
            r"model\.gate\.k: expected at most the 8 experts of a gate, got 9",
        ),
        ({"gate": {"type": "noisy_topk", "k": 0}}, r"model\.gate\.k: expected an integer >= 1, got 0"),
        ({"gate": {"temperature": 0}}, r"model\.gate\.temperature: expected a number > 0, got 0"),
        ({"gate": {"dispatch": True}}, r"model\.gate\.dispatch: dispatch needs type 'noisy_topk', got True"),
        (
            {"gate": {"overflow": "spill"}},
            r"model\.gate\.overflow: expected one of \['fallback', 'drop'\], got 'spill'",
        ),
        (
            {"arch": {"interaction": "cross"}},
            r"model\.arch\.interaction: expected one of \['none', 'dot'\], got 'cross'",
        ),
        ({"gate": {"capacity_factor": -1}}, r"model\.gate\.capacity_factor: expected a number > 0, got -1"),
        ({"gate": {"load_balance_weight": "high"}}, r"model\.gate\.load_balance_weight: .* got 'high'"),
        (
            {"embedding": {"pooling": "max"}},
            r"model\.embedding\.pooling: expected one of \['sum', 'mean'\], got 'max'",
        ),
        ({"embedding": {"dim": 0}}, r"model\.embedding\.dim: expected an integer >= 1, got 0"),
        ({"embedding": {"shared_tables": [["a"]]}}, r"model\.embedding\.shared_tables: .* got \[\['a'\]\]"),
        ({"tasks": [{"name": "y", "kind": "ranking"}]}, r"model\.tasks\[y\]\.kind: .* got 'ranking'"),
        (
            {"tasks": [{"name": "y", "weight": -1}]},
            r"model\.tasks\[y\]\.weight: expected a number >= 0, got -1",
        ),
        (
            {"tasks": [{"name": "y"}, {"name": "y"}]},
            r"model\.tasks: task names must be unique, got \['y', 'y'\]",
        ),
        (
            {"tasks": [{"name": "y", "given": "x"}]},
            r"model\.tasks\[y\]\.given: expected one of the tasks \['y'\], "
            r"got 'x'",
        ),
        (
            {"tasks": [{"name": "x", "kind": "regression"}, {"name": "y", "given": "x"}]},
            r"model\.tasks\[y\]\.given: the conditioning task must be binary",
        ),
        (
            {"tasks": [{"name": "y", "kind": "regression", "given": "x"}]},
            r"model\.tasks\[y\]\.given: entire-space conditioning needs kind 'binary', got 'x'",
        ),
        ({"tasks": []}, r"model\.tasks: expected at least one task, got \(\)"),
    ],
)
def test_config_errors_name_the_field_and_value(sections, message):
    with pytest.raises(ValueError, match=message):
        config(**sections)


def test_task_expert_counts_default_per_arch_and_bound_k():
    assert config(arch={"type": "ple"}).arch.task_expert_counts(2) == (2, 2)
    assert config(arch={"type": "mmoe"}).arch.task_expert_counts(2) == (0, 0)
    arch = {"type": "mmoe", "num_experts": 2, "num_task_experts": [3, 1]}
    assert config(arch=arch).arch.experts_per_gate(2) == 3  # purchase's gate: 2 shared + 1 own
    with pytest.raises(ValueError, match=r"model\.gate\.k: expected at most the 3 experts of a gate, got 4"):
        config(arch=arch, gate={"type": "noisy_topk", "k": 4})


def test_ple_k_is_bounded_by_its_smallest_gate():
    ok = {"type": "ple", "num_shared_experts": 1, "num_task_experts": 1}
    assert config(arch=ok, gate={"type": "noisy_topk", "k": 2}).gate.k == 2
    with pytest.raises(ValueError, match=r"model\.gate\.k: expected at most the 2 experts of a gate, got 3"):
        config(arch=ok, gate={"type": "noisy_topk", "k": 3})
