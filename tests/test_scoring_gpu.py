"""Scoring on GPUs, as far as a machine without one can check it: the config, the actors' share of the GPUs
and the refusal of a cluster without a GPU. No Ray is started here (the run itself: tests/test_score.py)."""

from __future__ import annotations

import math

import pytest

from pipelines.score import _config, parse_args
from recsys.scoring import ScoreConfig
from recsys.scoring.stage import RESOURCE_STEP, ActorResources, actor_resources


def config(**kwargs) -> ScoreConfig:
    return ScoreConfig(model="m", input="i", output="o", **kwargs)


@pytest.mark.parametrize("value", ["yes", 1, 0, None, "true"])
def test_use_gpu_must_be_true_or_false(value):
    with pytest.raises(ValueError, match=rf"score\.use_gpu: expected true or false, got {value!r}"):
        config(use_gpu=value)
    assert config().use_gpu is False and config(use_gpu=True).use_gpu is True


def test_without_gpu_the_actors_are_those_of_the_cpus():
    assert actor_resources(config(), cpus=16, gpus=1) == ActorResources(actors=16, cpus=1, gpus=0.0)
    assert actor_resources(config(threads_per_actor=2), cpus=16, gpus=0) == ActorResources(8, 2, 0.0)
    assert actor_resources(config(threads_per_actor=4), cpus=2, gpus=0) == ActorResources(1, 4, 0.0)
    assert actor_resources(config(concurrency=3), cpus=16, gpus=8).actors == 3
    assert actor_resources(config(), cpus=16, gpus=1).device == "cpu"


def test_the_actors_share_one_gpu():
    resources = actor_resources(config(use_gpu=True), cpus=16, gpus=1)
    assert resources == ActorResources(actors=16, cpus=1, gpus=0.0625)
    assert resources.device == "cuda"
    # 15 actors: 1/15 rounded down to Ray's step, so that the 15 shares fit on the one GPU.
    fifteen = actor_resources(config(use_gpu=True, concurrency=15), cpus=16, gpus=1)
    assert fifteen.gpus == 0.0666 and 15 * fifteen.gpus <= 1
    assert actor_resources(config(use_gpu=True, threads_per_actor=4), cpus=16, gpus=1) == ActorResources(
        4, 4, 0.25
    )


@pytest.mark.parametrize("gpus", [1, 2, 3, 8])
@pytest.mark.parametrize("actors", [1, 2, 3, 5, 7, 16, 33, 100])
def test_every_actor_fits_on_some_gpu(actors, gpus):
    """Shares of one GPU cannot span two: each GPU must hold its ``ceil(actors / gpus)`` actors whole."""
    share = actor_resources(config(use_gpu=True, concurrency=actors), cpus=1, gpus=gpus).gpus
    assert 0 < share <= 1
    assert share * RESOURCE_STEP == int(share * RESOURCE_STEP)  # a step Ray can count exactly
    per_gpu = math.floor(1 / share + 1e-9)  # actors one GPU holds
    assert per_gpu * gpus >= actors
    assert actors * share <= gpus


def test_an_actor_never_takes_more_than_one_gpu():
    # 3 actors on 2 GPUs: a share of 2/3 would leave the third actor waiting forever (1/3 left on each).
    assert actor_resources(config(use_gpu=True, concurrency=3), cpus=16, gpus=2).gpus == 0.5
    assert actor_resources(config(use_gpu=True, concurrency=2), cpus=16, gpus=8).gpus == 1.0


@pytest.mark.parametrize("gpus", [0, 0.0, 0.5])
def test_use_gpu_on_a_cluster_without_a_gpu_is_refused(gpus):
    with pytest.raises(ValueError, match=r"score\.use_gpu: .*the Ray cluster has no GPU"):
        actor_resources(config(use_gpu=True), cpus=16, gpus=gpus)


def test_more_actors_than_ray_can_share_a_gpu_among_is_refused():
    with pytest.raises(ValueError, match=r"score\.concurrency: expected at most 10000 actors per GPU"):
        actor_resources(config(use_gpu=True, concurrency=RESOURCE_STEP + 1), cpus=1, gpus=1)


def test_the_command_line_flag():
    required = ["--model", "m", "--input", "i", "--output", "o"]
    assert _config(parse_args(required)).use_gpu is False
    on_gpu = _config(parse_args([*required, "--use-gpu", "--batch-size", "65536"]))
    assert on_gpu.use_gpu is True and on_gpu.batch_size == 65536
