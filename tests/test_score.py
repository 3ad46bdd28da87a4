"""Batch scoring: partition planning, ranking, contract checks, and end-to-end runs on real Ray and MLflow."""

from __future__ import annotations

import json
from dataclasses import replace

import mlflow
import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
from mlflow import MlflowClient
from mlflow.entities import ViewType
from polars.testing import assert_frame_equal

from features.config import FeatureConfig, builtin_config
from features.contract import LABELS, ContractError
from features.pipeline import build, load_tables
from recsys.config import TaskConfig
from recsys.package import predict_frame, save_package
from recsys.scoring import ScoreConfig, ScoreFormula, ScoreSettings, run_scoring
from recsys.scoring.manifest import (
    MANIFEST,
    Manifest,
    ModelRecord,
    MovedRequests,
    PartitionRecord,
    load_manifest,
    open_output,
)
from recsys.scoring.partitions import plan_partitions, read_partition
from recsys.scoring.ranking import expected_rows_out, rank_requests
from recsys.tracking import CHAMPION, register_model
from synth.candidates import generate_candidates
from tests.scoring_world import MODEL, config_for, read_output, running_ray
from tests.test_package import TINY_MODEL, in_memory_package, joined

TASKS = (TaskConfig("click"), TaskConfig("purchase", given="click"))  # the tiny model's tasks


def write_parts(frame: pl.DataFrame, path, row_group_size: int) -> None:
    frame.write_parquet(path, row_group_size=row_group_size)


# ---------------------------------------------------------------------------------------- planning


def test_partitions_hold_whole_requests_and_every_row_once(tmp_path):
    # File a: requests 1..6 contiguous, then request 1 again (non-contiguous); file b: request 6 again.
    a = pl.DataFrame({"request_id": [1, 1, 1, 2, 2, 3, 3, 3, 4, 5, 5, 6, 1], "impression_id": range(13)})
    b = pl.DataFrame({"request_id": [6, 7, 7, 8], "impression_id": range(13, 17)})
    full = []
    for name, frame in (("a", a), ("b", b)):
        frame = frame.with_columns(
            pl.col("impression_id").cast(pl.Int64),
            pl.lit(0, pl.Datetime("us")).alias("ts"),
            pl.lit(1, pl.Int64).alias("user_id"),
            pl.lit(1, pl.Int64).alias("item_id"),
            pl.lit(1, pl.Int16).alias("position"),
            pl.lit("app").alias("device"),
            pl.lit("home").alias("page"),
        )
        frame.write_parquet(tmp_path / f"{name}.parquet", row_group_size=4)
        full.append(frame)
    files = [tmp_path / "a.parquet", tmp_path / "b.parquet"]
    parts = plan_partitions(files, rows_per_partition=4)
    assert [p.index for p in parts] == list(range(len(parts)))
    assert sum(p.rows_in for p in parts) == 17
    seen = pl.concat([read_partition(p).with_columns(pl.lit(p.index).alias("part")) for p in parts])
    assert sorted(seen["impression_id"].to_list()) == list(range(17))  # every row exactly once
    # Every request in exactly one partition, the non-contiguous ones included.
    per_request = seen.group_by("request_id").agg(pl.col("part").n_unique())
    assert per_request["part"].max() == 1
    assert [len(read_partition(p)) for p in parts] == [p.rows_in for p in parts]
    owner = seen.filter(pl.col("request_id") == 1)["part"].unique().to_list()
    assert owner == [parts[0].index]  # the first partition that holds a request scores all of it
    six = seen.filter(pl.col("request_id") == 6)["part"].unique().to_list()
    assert len(six) == 1 and parts[six[0]].file.endswith("a.parquet")  # the first file's partition


def test_rank_is_a_permutation_per_request_with_deterministic_ties():
    scored = pl.DataFrame(
        {
            "impression_id": [5, 3, 4, 1, 2, 9],
            "request_id": [1, 1, 1, 2, 2, 3],
            "p_click": [0.2, 0.5, 0.5, 0.1, float("nan"), 0.3],
            "p_purchase": [0.1, 0.1, 0.1, 0.05, 0.05, 0.2],
        }
    )
    product = ScoreFormula.for_tasks("product", 1.0, TASKS)
    ranked = rank_requests(scored, product, None)
    assert ranked.select("request_id", "impression_id", "rank").rows() == [
        (1, 3, 1),  # tie with 4 at 0.05: the smaller impression_id first
        (1, 4, 2),
        (1, 5, 3),
        (2, 1, 1),
        (2, 2, 2),  # a NaN score ranks last, and still gets a rank
        (3, 9, 1),
    ]
    np.testing.assert_allclose(ranked["score"][:3].to_numpy(), [0.05, 0.05, 0.02])
    by_click = rank_requests(scored, ScoreFormula.for_tasks("click", 1.0, TASKS), 1)
    assert by_click.select("request_id", "impression_id").rows() == [(1, 3), (2, 1), (3, 9)]
    assert (
        expected_rows_out(scored["request_id"], 2) == 5 and expected_rows_out(scored["request_id"], None) == 6
    )
    alpha0 = rank_requests(scored, ScoreFormula.for_tasks("product", 0.0, TASKS), None)
    np.testing.assert_allclose(alpha0["score"].drop_nulls().to_numpy(), [0.5, 0.5, 0.2, 0.1, 0.3])


def test_score_config_rejects_bad_values():
    with pytest.raises(ValueError, match="top_k: expected an integer >= 1, got 0"):
        ScoreConfig(model="m", input="i", output="o", top_k=0)
    with pytest.raises(ValueError, match="alpha: expected a finite number, got nan"):
        ScoreConfig(model="m", input="i", output="o", alpha=float("nan"))
    with pytest.raises(ValueError, match="score.score_formula: expected a non-empty string, got ''"):
        ScoreConfig(model="m", input="i", output="o", score_formula="")
    with pytest.raises(ValueError, match="score.batch_size: expected an integer >= 1, got -1"):
        ScoreConfig(model="m", input="i", output="o", batch_size=-1)


def test_score_formula_fits_the_models_own_tasks():
    # A formula is checked against the tasks the model declares, once the model is resolved.
    with pytest.raises(ValueError, match=r"score_formula: expected one of .*, got 'sum'"):
        ScoreFormula.for_tasks("sum", 1.0, TASKS)
    with pytest.raises(ValueError, match=r"\['product', 'click', 'purchase'\].*got 'sum'"):
        ScoreFormula.for_tasks("sum", 1.0, TASKS)
    watch = (TaskConfig("click"), TaskConfig("watch_time", kind="regression"))
    with pytest.raises(
        ValueError, match=r"'product' .* \['click', 'watch_time'\] include \['watch_time \(regression\)'\]"
    ):
        ScoreFormula.for_tasks("product", 1.0, watch)
    by_watch = ScoreFormula.for_tasks("watch_time", 1.0, watch)
    assert by_watch.columns == ("pred_watch_time",)
    # Other task names work the same: the first task times the product of the later ones ** alpha.
    three = (TaskConfig("view"), TaskConfig("like"), TaskConfig("share"))
    formula = ScoreFormula.for_tasks("product", 0.5, three)
    assert formula.columns == ("p_view", "p_like", "p_share")
    scored = pl.DataFrame(
        {
            "impression_id": [1, 2],
            "request_id": [1, 1],
            "p_view": [0.5, 0.9],
            "p_like": [0.4, 0.1],
            "p_share": [0.25, 0.1],
        }
    )
    ranked = rank_requests(scored, formula, None)
    np.testing.assert_allclose(ranked["score"].to_numpy(), [0.5 * 0.1**0.5, 0.9 * 0.01**0.5])
    assert ranked["impression_id"].to_list() == [1, 2]


def test_manifest_reads_back_and_refuses_another_run(tmp_path):
    record = ModelRecord("models:/m@champion", "models:/m/1", "m", "1", "r1", "abc")
    fresh = Manifest(
        record, "1", "fp", {"input": ["a.parquet"]}, "none", ScoreSettings("product", 1.0, None, 10), 5
    )
    out = open_output(tmp_path / "out", fresh, overwrite=False)
    entry = PartitionRecord(
        "part-00000.parquet", "a.parquet", 0, 5, 5, 5, 5, 5, MovedRequests(0, 0), "1", "done", 0.1
    )
    out.record(0, entry, tmp_path / "out" / MANIFEST)
    back = load_manifest(tmp_path / "out" / MANIFEST)
    assert (
        back == out
        and json.loads((tmp_path / "out" / MANIFEST).read_text())["partitions"]["0"]["rows_out"] == 5
    )
    # Its file is missing: not finished, so a rerun scores it again.
    assert back.finished(tmp_path / "out") == set()
    moved = Manifest(
        ModelRecord("models:/m@champion", "models:/m/2", "m", "2", "r2", "abc"),
        "2",
        "fp",
        {},
        "none",
        ScoreSettings("product", 0.5, None, 10),
        5,
    )
    with pytest.raises(
        ValueError, match=r"scored with 'models:/m/1'.*to 'models:/m/2'.*settings: .*--overwrite"
    ):
        open_output(tmp_path / "out", moved, overwrite=False)
    (tmp_path / "out" / MANIFEST).write_text(json.dumps({"format": 0}))
    with pytest.raises(ValueError, match=r"format: 0, expected 1"):
        open_output(tmp_path / "out", fresh, overwrite=False)


def test_candidates_are_the_generated_impressions_without_labels(tmp_path):
    cands = generate_candidates(tmp_path / "cands", 500, seed=4, progress=False, chunk_rows=100)
    impressions = pl.read_parquet(cands.impressions)
    history = pl.read_parquet(cands.history)
    assert cands.rows == impressions.height == history.height == 500
    assert not set(LABELS) & set(impressions.columns) and set(LABELS) <= set(history.columns)
    assert_frame_equal(impressions, history.drop(*LABELS))
    assert (
        pq.ParquetFile(cands.impressions).num_row_groups == pq.ParquetFile(cands.history).num_row_groups > 1
    )
    assert cands.users.exists() and cands.items.exists() and not (tmp_path / "cands" / ".world").exists()


# ------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def raw_world(scoring_raw):
    """Generated contract tables (3,000 impressions over 30 days), shared with the other scoring tests."""
    return scoring_raw


@pytest.fixture(scope="module")
def world(scoring_models):
    """A tiny model registered as v1 (champion) in a SQLite store, candidate files (tests/scoring_world.py),
    and a running local Ray for this module."""
    with running_ray():
        yield scoring_models


@pytest.fixture(scope="module")
def full_run(world):
    result = run_scoring(config_for(world, "full"))  # logged into the default experiment, <model>-scoring
    return result, read_output(result.output)


@pytest.mark.slow
def test_scores_equal_the_registered_models_predictions(world, full_run, monkeypatch):
    result, out = full_run
    assert result.ok, result.problems
    assert result.rows_in == result.rows_out == result.expected_out == world["cands"].height == out.height
    assert result.partitions > 4 and result.partitions_scored == result.partitions
    assert out.columns == [
        "impression_id",
        "request_id",
        "user_id",
        "item_id",
        "p_click",
        "p_purchase",
        "score",
        "rank",
        "model_version",
    ]
    assert out["impression_id"].to_list() == sorted(world["cands"]["impression_id"].to_list())
    assert out["model_version"].unique().to_list() == ["1"]
    # The registered model itself, through MLflow, on the same joined rows (their labels are the history).
    monkeypatch.setenv("MLFLOW_TRACKING_URI", world["store"])
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}/1")
    rows = joined(world["cands"], world["users"], world["items"])
    # The null user id (scored here) is not a valid row for the model's own contract check: leave it out.
    expected = pl.from_pandas(model.predict(rows.filter(pl.col("user_id").is_not_null()).to_pandas()))
    expected = expected.sort("impression_id")
    null_user = out.filter(pl.col("user_id").is_null())
    assert null_user.height == 1 and 0 < null_user["p_click"].item() < 1
    known = out.filter(pl.col("user_id").is_not_null())
    np.testing.assert_allclose(known["p_click"].to_numpy(), expected["p_click"].to_numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(
        known["p_purchase"].to_numpy(), expected["p_purchase"].to_numpy(), rtol=0, atol=1e-5
    )
    # Unseen user and item: scored (out-of-vocabulary), not dropped.
    assert (
        out.filter(pl.col("user_id") == 10**9).height == 1
        and out.filter(pl.col("item_id") == 10**9).height == 1
    )
    np.testing.assert_allclose(out["score"].to_numpy(), (out["p_click"] * out["p_purchase"]).to_numpy())
    # Ranks: a permutation of 1..n within each request, best score first.
    ranks = out.group_by("request_id").agg(pl.col("rank").sort(), pl.len())
    for rank_list, n in ranks.select("rank", "len").iter_rows():
        assert rank_list == list(range(1, n + 1))
    ordered = out.sort("request_id", "rank")
    assert (
        ordered.with_columns(pl.col("score").diff().over("request_id").alias("d"))["d"].drop_nulls() <= 0
    ).all()
    # The manifest and the MLflow run record the version the alias resolved to.
    manifest = json.loads(result.manifest.read_text())
    assert manifest["complete"] and manifest["model"]["pinned_uri"] == f"models:/{MODEL}/1"
    assert manifest["model"]["uri"] == f"models:/{MODEL}@{CHAMPION}"
    client = MlflowClient(world["store"])
    run = client.get_run(result.run_id)
    assert client.get_experiment(run.info.experiment_id).name == f"{MODEL}-scoring"
    assert (
        run.data.params["model_version"] == "1"
        and run.data.params["input_fingerprint"] == result.input_fingerprint
    )
    assert run.data.metrics["rows_in"] == run.data.metrics["rows_out"] == world["cands"].height
    assert run.data.metrics["rows_per_s"] > 0 and 0 < run.data.metrics["score/p_click/p50"] < 1


@pytest.mark.slow
def test_a_run_creates_no_experiment_but_its_own_and_tells_its_story(world, capsys):
    client = MlflowClient(world["store"])
    before = {e.name for e in client.search_experiments(view_type=ViewType.ALL)}
    result = run_scoring(
        config_for(world, "quiet", max_partitions=1, progress=True, experiment="quiet-scoring")
    )
    assert result.run_id is not None and result.partitions_scored == 1
    after = {e.name for e in client.search_experiments(view_type=ViewType.ALL)}
    assert after - before == {"quiet-scoring"}  # one tracker: reading the registry created nothing
    assert "scoring" not in after  # the experiment scoring used to create just to read the registry
    run = client.get_run(result.run_id)
    assert client.get_experiment(run.info.experiment_id).name == "quiet-scoring"
    story = capsys.readouterr()
    assert f"model: models:/{MODEL}/1 (from models:/{MODEL}@{CHAMPION})" in story.out
    assert f"scoring {world['cands'].height:,} rows in {result.partitions} partitions" in story.out
    assert f"into {result.output}; {result.partitions - 1} partitions left" in story.out
    assert "score:" not in story.err  # the bar over partitions is drawn on a terminal only (see test_console)


@pytest.mark.slow
def test_an_interrupted_run_resumes_to_the_same_output(world, full_run):
    first = run_scoring(config_for(world, "resumed", max_partitions=2))
    assert not first.complete and not first.ok and first.partitions_scored == 2
    assert len(list(first.output.glob("part-*.parquet"))) == 2
    # A crash between a file's rename and the manifest update: a part file the manifest does not list.
    manifest = json.loads(first.manifest.read_text())
    dropped = sorted(manifest["partitions"], key=int)[-1]
    del manifest["partitions"][dropped]
    first.manifest.write_text(json.dumps(manifest))
    (first.output / ".part-00099.parquet.k3x_9a2q.tmp").write_bytes(b"half written")  # atomic_write's name
    second = run_scoring(config_for(world, "resumed"))
    assert second.ok, second.problems
    assert second.partitions_skipped == 1 and second.partitions_scored == second.partitions - 1
    assert not list(second.output.glob(".*.tmp"))
    assert_frame_equal(read_output(second.output), full_run[1])
    # Once complete, a rerun does nothing and is still ok.
    third = run_scoring(config_for(world, "resumed"))
    assert third.ok and third.partitions_scored == 0 and third.partitions_skipped == third.partitions


@pytest.mark.slow
def test_use_gpu_on_a_cluster_without_a_gpu_fails_before_any_partition_is_written(world):
    import ray

    if ray.cluster_resources().get("GPU", 0) > 0:
        pytest.skip("this Ray has a GPU")
    config = config_for(world, "on-gpu", use_gpu=True)
    with pytest.raises(ValueError, match=r"score\.use_gpu: true, but the Ray cluster has no GPU"):
        run_scoring(config)
    out = world["root"] / "on-gpu"
    assert not list(out.glob("part-*")) and load_manifest(out / MANIFEST).partitions == {}


@pytest.mark.slow
def test_alias_is_resolved_once_and_a_moved_alias_refuses_to_mix_versions(world):
    first = run_scoring(config_for(world, "alias", max_partitions=1))
    assert first.pinned_uri == f"models:/{MODEL}/1" and first.model_version == "1"
    # The champion moves to a better version 2 while the output is half done.
    moved = register_model(world["tracker"], world["uris"][1], MODEL, "val/auc", 0.9)
    assert (moved.version, moved.alias) == ("2", CHAMPION)
    try:
        with pytest.raises(ValueError, match=f"scored with 'models:/{MODEL}/1'.*to 'models:/{MODEL}/2'"):
            run_scoring(config_for(world, "alias"))
        # The recorded version finishes the run; --overwrite rescores everything with the new champion.
        pinned = run_scoring(config_for(world, "alias", model=f"models:/{MODEL}/1"))
        assert pinned.ok and pinned.partitions_skipped == 1
        again = run_scoring(config_for(world, "alias", overwrite=True, top_k=2))
    finally:
        client = MlflowClient(world["store"])
        client.set_registered_model_alias(MODEL, CHAMPION, "1")
    assert again.ok and again.model_version == "2" and again.partitions_skipped == 0
    out = read_output(again.output)
    assert out["model_version"].unique().to_list() == ["2"]
    # Top-k: the best 2 of each request; rows out < rows in, by design, and the check accounts for it.
    sizes = world["cands"].group_by("request_id").len()
    assert again.rows_in == world["cands"].height
    assert again.rows_out == again.expected_out == int(sizes["len"].clip(upper_bound=2).sum()) == out.height
    assert out["rank"].max() == 2 and out.group_by("request_id").len()["len"].max() == 2


def test_bad_input_fails_before_anything_is_written(tmp_path, raw_world):
    good = pl.read_parquet(raw_world / "impressions.parquet").drop("click", "purchase")
    cases = {
        "missing": (good.drop("device"), r"missing column\(s\) \['device'\]"),
        "type": (
            good.with_columns(pl.col("position").cast(pl.Float64)),
            r"impressions\.position: expected type Int16",
        ),
        "null": (
            good.with_columns(
                pl.when(pl.col("impression_id") == good["impression_id"][3])
                .then(None)
                .otherwise(pl.col("ts"))
                .alias("ts")
            ),
            r"impressions\.ts: null in a non-nullable column",
        ),
    }
    for name, (frame, message) in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        frame.write_parquet(folder / "c.parquet")
        for table in ("users", "items"):
            pl.read_parquet(raw_world / f"{table}.parquet").write_parquet(folder / f"{table}.parquet")
        out = tmp_path / f"out-{name}"
        store = f"sqlite:///{tmp_path / 'none.db'}"  # never reached: the input is checked first
        config = ScoreConfig(
            model=f"models:/{MODEL}@{CHAMPION}", input=str(folder), output=str(out), tracking_uri=store
        )
        with pytest.raises(ContractError, match=message):
            run_scoring(config)
        assert not out.exists() and not (tmp_path / "none.db").exists(), name


@pytest.mark.slow
def test_an_affinity_model_scores_as_its_package_does_on_the_same_rows(world, raw_world, tmp_path):
    """Batch scoring of a model with affinity features: everybody's events reach every partition."""
    from recsys.package import load_package, predict_frame

    config = FeatureConfig.from_yaml(builtin_config("ecommerce_affinity"))
    spec, _ = build(config, load_tables(raw_world), tmp_path / "features", progress=False)
    pkg = in_memory_package(spec, TINY_MODEL, seed=2)
    path = save_package(tmp_path / "package", pkg.model, pkg.model_config, spec)
    known = world["cands"].filter(pl.col("user_id").is_not_null())
    result = run_scoring(config_for(world, tmp_path / "affinity", model=str(path)))
    assert result.ok and result.rows_out == world["cands"].height
    out = read_output(result.output).filter(pl.col("user_id").is_not_null())
    # The package on all the joined rows at once, their labels being the history, as the batch run reads it.
    expected = predict_frame(load_package(path), joined(known, world["users"], world["items"]))
    expected = expected.sort("impression_id")
    assert out["impression_id"].to_list() == expected["impression_id"].to_list()
    np.testing.assert_allclose(out["p_click"].to_numpy(), expected["p_click"].to_numpy(), rtol=0, atol=1e-5)
    unlabelled = joined(known, world["users"], world["items"]).drop(LABELS)
    with pytest.raises(ValueError, match=r"history: missing column\(s\) \['purchase'\]"):
        predict_frame(load_package(path), unlabelled, history=known.drop("purchase"))


@pytest.mark.slow
def test_int8_tables_and_bf16_dense_layers_score_every_row_close_to_fp32(world, full_run, monkeypatch):
    from pipelines import quantize

    fp32 = full_run[1]
    result = run_scoring(config_for(world, "int8", embedding_dtype="int8", compute_dtype="bf16"))
    out = read_output(result.output)
    assert result.ok and out["impression_id"].to_list() == fp32["impression_id"].to_list()
    error = np.abs(out["p_click"].to_numpy() - fp32["p_click"].to_numpy())
    assert 0 < error.max() < 2e-2
    settings = json.loads(result.manifest.read_text())["settings"]
    assert settings["embedding_dtype"] == "int8" and settings["compute_dtype"] == "bf16"
    with pytest.raises(ValueError, match="settings"):  # a rerun in another precision would mix them
        run_scoring(config_for(world, "int8", embedding_dtype="fp16", compute_dtype="bf16"))
    # A quantized copy of the champion scores as quantizing on load does, in its own precision only.
    copy = world["root"] / "package-int8"
    args = ["--model", f"models:/{MODEL}@{CHAMPION}", "--embedding-dtype", "int8", "--out", str(copy)]
    assert quantize.main([*args, "--tracking-uri", world["store"]]) == 0
    from_copy = run_scoring(config_for(world, "int8-copy", model=str(copy), compute_dtype="bf16"))
    assert_frame_equal(read_output(from_copy.output).drop("model_version"), out.drop("model_version"))
    with pytest.raises(ValueError, match="holds int8 tables"):
        run_scoring(config_for(world, "int8-copy-fp32", model=str(copy), embedding_dtype="fp32"))
    # The pyfunc model takes the same options when it loads.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", world["store"])
    options = {"embedding_dtype": "int8", "compute_dtype": "bf16"}
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}/1", model_config=options)
    assert model.unwrap_python_model().package.precision_line() == "int8 tables, bf16 dense layers"
    with pytest.raises(ValueError, match="embedding_dtype: expected one of .* got 'int2'"):
        mlflow.pyfunc.load_model(f"models:/{MODEL}/1", model_config={"embedding_dtype": "int2"})


@pytest.mark.slow
def test_a_flat_table_model_scores_every_row_of_its_table(world, tmp_path):
    from features.pipeline import Tables, fit_spec
    from tests.test_package import FLAT_FEATURES, flat_frame

    spec = fit_spec(FeatureConfig.from_dict(FLAT_FEATURES), Tables(flat_frame(200, seed=0).lazy()))
    model = {"tasks": [{"name": "rich"}, {"name": "single"}], "arch": {"type": "shared_bottom"}}
    package = in_memory_package(spec, {**model, "embedding": {"dim": 4}})
    path = save_package(tmp_path / "flat-package", package.model, package.model_config, spec)
    rows = flat_frame(700, seed=1).with_columns(
        pl.col("row_id").alias("impression_id"), (pl.col("row_id") // 7).alias("request_id")
    )
    inputs = tmp_path / "flat"
    inputs.mkdir()
    rows.head(400).write_parquet(inputs / "a.parquet")
    rows.slice(400).drop("income").write_parquet(inputs / "b.parquet")  # labels and extra columns optional
    config = ScoreConfig(
        model=str(path),
        input=str(inputs),
        output=str(tmp_path / "out"),
        tracking_uri=world["store"],
        rows_per_partition=250,
        progress=False,
    )
    result = run_scoring(config)
    out = read_output(result.output)
    assert result.ok and result.rows_out == rows.height == out.height
    assert out.columns == [
        "impression_id",
        "request_id",
        "p_rich",
        "p_single",
        "score",
        "rank",
        "model_version",
    ]
    expected = predict_frame(package, rows).sort("row_id")
    np.testing.assert_allclose(out["p_rich"].to_numpy(), expected["p_rich"].to_numpy(), rtol=0, atol=1e-6)
    assert out.group_by("request_id").agg(pl.col("rank").max() == pl.len())["rank"].all()
    rows.drop("request_id").write_parquet(inputs / "b.parquet")
    with pytest.raises(
        ContractError, match="b.parquet: column 'request_id': expected an integer key column, missing"
    ):
        run_scoring(replace(config, output=str(tmp_path / "out2")))
