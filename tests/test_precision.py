"""Training precision: bf16 autocast of the dense layers, fp32 by default, ``auto`` by the hardware."""

from __future__ import annotations

import pytest
import torch

from recsys.precision import autocast, bf16_supported, resolve_precision


def test_precision_settings_resolve_and_say_why(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) == (None, "precision fp32")
    monkeypatch.setattr("recsys.precision.bf16_supported", lambda device: False)
    assert resolve_precision("auto", cpu) == (None, "precision auto: fp32 (this cpu has no bf16 units)")
    dtype, line = resolve_precision("bf16", cpu)
    assert dtype is torch.bfloat16 and "no bf16 units; bf16 is emulated and slow" in line
    monkeypatch.setattr("recsys.precision.bf16_supported", lambda device: True)
    assert resolve_precision("auto", cpu)[0] is torch.bfloat16
    with pytest.raises(ValueError, match=r"training\.precision: expected one of .* got 'fp8'"):
        resolve_precision("fp8", cpu)


def test_bf16_support_is_read_from_the_cpu():
    expected = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert bf16_supported(torch.device("cpu")) == expected


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_sharded_step_runs_the_dense_layers_in_the_precision_and_the_losses_in_fp32(
    tmp_path, world_of_one, precision
):
    from recsys.train.config import TrainConfig
    from recsys.train.sharding import shard_model
    from recsys.train.worker import train_step
    from tests.test_model_model import LAYOUT, tiny_batch

    model = {
        "tasks": [{"name": "click"}, {"name": "purchase", "given": "click"}],
        "embedding": {"dim": 4},
        "arch": {"num_experts": 2, "expert_hidden": [8], "tower_hidden": [4]},
    }
    config = TrainConfig.from_dict(
        {"features": str(tmp_path), "model": model, "training": {"precision": precision}}
    )
    sharded = shard_model(config, LAYOUT, torch.device("cpu"))
    with autocast(sharded.autocast_dtype, sharded.device):
        _, (_, logits, _) = sharded.dmp(tiny_batch())
    want = torch.bfloat16 if precision == "bf16" else torch.float32
    assert logits["click"].dtype == want  # the towers' last matmul ran in the precision
    losses, _ = train_step(sharded, tiny_batch())
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    weights = [p for n, p in sharded.dmp.named_parameters() if "towers" in n]
    assert weights and all(p.dtype == torch.float32 for p in weights)  # fp32 master weights
