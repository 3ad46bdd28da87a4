"""Batch scoring: a registered model over candidate Parquet, ranked per request, lossless and resumable.

:func:`run_scoring` is the whole job; ``python -m pipelines.score`` is its command line. In order:

1. **Validate** the output folder and every input table before any work: the output is neither an input
   nor around or inside one, and is new, empty or a scoring output of ours (:mod:`.manifest`); every
   table meets the data contract and reads as Parquet (:mod:`.inputs`).
2. **Resolve the model once**: ``models:/NAME@champion`` becomes ``models:/NAME/3`` at the start, and
   version 3 is what every partition uses, what the manifest, the ``model_version`` column and the MLflow
   run record, even if the alias moves during the run. The score formula is checked against the model's
   own tasks (:mod:`.ranking`).
3. **Plan partitions** of whole requests (:mod:`.partitions`), and open the output: a rerun skips the
   partitions its manifest lists as done, and refuses another run's output unless ``overwrite``
   (:mod:`.manifest`).
4. **Score with Ray Data** (:mod:`.stage`), then **rank and write, on the driver only** (:mod:`.writer`):
   each part file is renamed into place when complete, then the manifest is rewritten atomically.
5. **Check**: every partition's rows in, rows scored, rows expected out and rows in its file must agree,
   and the partitions' rows in must sum to the input's rows; :attr:`ScoreResult.ok` is False (and the
   command exits non-zero) otherwise.
6. **Log** into the MLflow experiment the config names, by default ``<model name>-scoring``: model
   version, input fingerprint, row counts, duration, rows/s and the score distribution. An unreachable
   tracking store is reported once and the scoring goes on. One tracker does it all: it resolves the model
   on no experiment, so reading the registry creates nothing.

Example:
    >>> config = ScoreConfig(model="models:/ecommerce-ranker@champion", input="cands/impressions.parquet",
    ...                      output="out/scores", history="raw/impressions.parquet")  # doctest: +SKIP
    >>> result = run_scoring(config)  # doctest: +SKIP
    >>> result.rows_in == result.rows_out, result.model_version  # doctest: +SKIP
    (True, '3')
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from features import console
from recsys.package import LoadedPackage, load_package, output_column
from recsys.precision import resolve_precision
from recsys.rows import history_needs
from recsys.scoring.config import ScoreConfig, ScoreResult
from recsys.scoring.inputs import (
    Inputs,
    has_contract_tables,
    read_inputs,
    refuse_output_among_inputs,
    with_history,
)
from recsys.scoring.manifest import MANIFEST, Manifest, ModelRecord, check_output, open_output
from recsys.scoring.partitions import Partition, plan_partitions
from recsys.scoring.ranking import ScoreFormula, score_summary
from recsys.scoring.stage import key_columns, package_files, plan_resources, ray_for, scored_frames
from recsys.scoring.writer import PartitionWriter
from recsys.tracking import Tracker, download_package, resolve_model


@dataclass(frozen=True)
class ScoringModel:
    """The model of a run, resolved once.

    Attributes:
        record: what the manifest and the MLflow run record.
        package: the loaded package (its tasks and spec).
        files: the package folder as bytes, for the actors (:func:`recsys.scoring.stage.package_files`).
    """

    record: ModelRecord
    package: LoadedPackage
    files: dict[str, bytes]

    @property
    def outputs(self) -> tuple[str, ...]:
        """The model's output columns, one per task."""
        return tuple(output_column(t) for t in self.package.model_config.tasks)


@dataclass(frozen=True)
class ScoringPhase:
    """What the scoring phase of this invocation did: partitions scored and skipped, seconds, rows scored."""

    scored: int
    skipped: int
    seconds: float
    rows_scored: int


def run_scoring(config: ScoreConfig) -> ScoreResult:
    """Scores candidate rows with a model and writes ranked Parquet (see the module docstring).

    Returns:
        What was done; :attr:`ScoreResult.ok` is False when a count differs or partitions are left.

    Raises:
        ContractError: an input table breaks the contract or is not readable Parquet (nothing is written).
        FileNotFoundError: an input is missing.
        FileExistsError: the output folder holds files and is not a scoring output of ours.
        ValueError: a bad model URI, a score formula that does not fit the model's tasks, an output folder
            that is an input or overlaps one, or one of another run or with an unreadable manifest
            (without ``overwrite``).
        NonFiniteScoreError: the model returned NaN or an infinite score (that partition is not written).
        TrackingError: the model cannot be resolved (its store is unreachable).
        OSError: a write failed (a full disk); the output is left resumable.
    """
    started = time.perf_counter()
    out = check_paths(config)
    # The contract's tables are checked before the store is read; a flat table needs the model's spec.
    inputs = read_inputs(config) if has_contract_tables(config) else None
    tracker = _tracker(config)
    with tempfile.TemporaryDirectory(prefix="recsys-score-") as workdir:
        model = _resolve(config, tracker, Path(workdir))
    if inputs is None:
        inputs = read_inputs(config, model.package.spec)
    history_columns, needs = history_needs(model.package.spec)
    inputs = with_history(config, inputs, history_columns, needs.every_impression)
    formula = ScoreFormula.for_tasks(config.score_formula, config.alpha, model.package.model_config.tasks)
    partitions = plan_partitions(inputs.files, config.rows_per_partition)
    manifest = open_output(out, _fresh_manifest(config, model, inputs), config.overwrite)
    console.story(
        f"scoring {inputs.rows:,} rows in {len(partitions)} partitions ({len(manifest.partitions)} done "
        f"already); history features from {inputs.history_source}"
    )
    run_id = _start_run(tracker, config, model.record)
    try:
        phase = _score(config, model, formula, inputs, partitions, manifest, out)
        result = _result(model, inputs, partitions, manifest, out, phase, started)
        result.run_id = run_id
        if run_id is not None:
            _log_run(tracker, config, result, manifest, phase)
    except BaseException:
        _end_run(tracker, run_id, "FAILED")
        raise
    _end_run(tracker, run_id, "FINISHED" if result.ok else "FAILED")
    left = "" if result.complete else f"; {result.partitions - len(manifest.partitions)} partitions left"
    console.story(f"wrote {result.rows_out:,} rows ({result.expected_out:,} expected) into {out}{left}")
    return result


def check_paths(config: ScoreConfig) -> Path:
    """The output folder, resolved, checked before any work: not among the inputs, and new or ours.

    Raises:
        ValueError: the output folder is an input, lies inside one, or contains one.
        FileExistsError: it holds files and is not a scoring output of ours.
        FileNotFoundError: no candidate file at ``config.input``.
    """
    out = Path(config.output).resolve()
    refuse_output_among_inputs(config, out)
    check_output(out)
    return out


def _tracker(config: ScoreConfig) -> Tracker:
    """The run's one tracker: it reads the registry, then logs into the run's experiment (:func:`_start_run`).

    It starts on no experiment, so that resolving the model creates none.
    """
    return Tracker(config.tracking_uri, None)


def _resolve(config: ScoreConfig, tracker: Tracker, workdir: Path) -> ScoringModel:
    """Pins the model: the registry is read here, once, so a later alias move does not change this run."""
    if Path(config.model).is_dir():
        model = _local_model(config)
    else:
        model = _registered_model(config, tracker, workdir)
    console.story(f"model: {model.record.pinned_uri} (from {model.record.uri})")
    _, why = resolve_precision(config.compute_dtype, torch.device("cuda" if config.use_gpu else "cpu"))
    console.story(
        f"precision: {model.package.precision_line()}"
        + ("" if config.compute_dtype == "fp32" else f" ({why})")
    )
    return model


def _load(config: ScoreConfig, path: Path) -> LoadedPackage:
    """The package at ``path`` in the run's precision, loaded here to fail early (each actor loads it too)."""
    return load_package(path, embedding_dtype=config.embedding_dtype, compute_dtype=config.compute_dtype)


def _local_model(config: ScoreConfig) -> ScoringModel:
    """A package folder (:func:`recsys.package.save_package`), outside the registry."""
    folder = config.model
    path = Path(folder).resolve()
    package = _load(config, path)  # fails early and clearly for a folder that is not a package
    name = str(package.metadata.get("extra", {}).get("registered_model") or "package")
    record = ModelRecord(folder, f"file:{path}", name, None, None, package.spec.content_hash)
    return ScoringModel(record, package, package_files(path))


def _registered_model(config: ScoreConfig, tracker: Tracker, workdir: Path) -> ScoringModel:
    """A model URI of the tracker's store, resolved to one version and downloaded into ``workdir``."""
    uri = config.model
    resolved = resolve_model(tracker, uri)
    package_dir = download_package(tracker, resolved, workdir / "model")
    package = _load(config, package_dir)
    name = resolved.name or resolved.pinned_uri.split("/")[1]
    record = ModelRecord(
        uri, resolved.pinned_uri, name, resolved.version, resolved.run_id, package.spec.content_hash
    )
    return ScoringModel(record, package, package_files(package_dir))


def _fresh_manifest(config: ScoreConfig, model: ScoringModel, inputs: Inputs) -> Manifest:
    """The manifest of this run before any partition is written."""
    return Manifest(
        model=model.record,
        model_version=model.record.column_value,
        input_fingerprint=inputs.fingerprint,
        inputs={k: [str(f) for f in v] for k, v in inputs.groups.items()},
        history_source=inputs.history_source,
        settings=replace(config.settings(), embedding_dtype=model.package.embedding_dtype),
        rows_in=inputs.rows,
    )


def _score(
    config: ScoreConfig,
    model: ScoringModel,
    formula: ScoreFormula,
    inputs: Inputs,
    partitions: list[Partition],
    manifest: Manifest,
    out: Path,
) -> ScoringPhase:
    """Scores the partitions not done yet (at most ``max_partitions``), writing each once it is scored."""
    started = time.perf_counter()
    todo = [p for p in partitions if p.index not in manifest.partitions]
    limit = config.max_partitions if config.max_partitions is not None else len(todo)
    skipped = len(partitions) - len(todo)
    bar = console.progress(
        total=len(partitions),
        initial=skipped,
        unit="part",
        desc="score",
        disable=None if config.progress else True,
    )
    outputs = model.outputs
    todo_by_index = {p.index: p for p in todo}
    keys = key_columns(model.package.spec)
    writer = PartitionWriter(formula, config.top_k, outputs, manifest, out, todo_by_index, bar, keys)
    empty = [p for p in todo if p.rows_in == 0]  # nothing reaches the driver for these
    work = [p for p in todo if p.rows_in > 0] if len(empty) < limit else []
    with ray_for(config) if work else contextlib.nullcontext():
        # The actors are planned before any partition is written: use_gpu without a GPU fails here.
        resources = plan_resources(config) if work else None
        for part in empty[:limit]:
            writer.write(part)
        if resources is not None:
            # Closed on every path, before Ray shuts down: the dataset's executor stops its actors then.
            # Left to the garbage collector after ray.shutdown(), its ray.kill() started a new local Ray
            # while the process exited, and the process never ended (after a failed write, say).
            with _closed(scored_frames(config, resources, model.files, inputs, work)) as frames:
                for frame in frames:
                    writer.add(frame)
                    if writer.written >= limit:
                        break  # an interrupted run (max_partitions): the rest stays to do
                else:
                    writer.flush()
    bar.close()
    return ScoringPhase(writer.written, skipped, time.perf_counter() - started, writer.rows_scored)


@contextlib.contextmanager
def _closed(frames: Iterator[Any]) -> Iterator[Iterator[Any]]:
    """Closes ``frames`` on every path; a failure to close never hides the error that ended the loop.

    On a full disk, closing Ray Data's iterator fails too (its log file cannot be flushed): the write
    error is what the user must see, so the second error goes to the log.
    """
    try:
        yield frames
    except BaseException:
        try:
            frames.close()
        except Exception as e:
            logging.getLogger(__name__).warning("closing the dataset after an error failed too: %r", e)
        raise
    frames.close()


def _result(
    model: ScoringModel,
    inputs: Inputs,
    partitions: list[Partition],
    manifest: Manifest,
    out: Path,
    phase: ScoringPhase,
    started: float,
) -> ScoreResult:
    """Checks every count against the files on disk, marks the manifest complete if all agree."""
    manifest.finish(partitions, out)
    manifest.write(out / MANIFEST)
    every = all(p.index in manifest.partitions for p in partitions)
    columns = [*model.outputs, "score"]
    return ScoreResult(
        output=out,
        manifest=out / MANIFEST,
        model_uri=model.record.uri,
        pinned_uri=model.record.pinned_uri,
        model_version=model.record.column_value,
        input_fingerprint=inputs.fingerprint,
        partitions=len(partitions),
        partitions_scored=phase.scored,
        partitions_skipped=phase.skipped,
        rows_in=inputs.rows,
        rows_out=manifest.rows_out,
        expected_out=manifest.expected_out,
        seconds=time.perf_counter() - started,
        rows_per_s=phase.rows_scored / phase.seconds if phase.seconds > 0 else 0.0,
        complete=every,
        problems=list(manifest.problems),
        # Read once every part is in place and intact (manifest.finish read each in full).
        summary=score_summary(manifest.part_files(out), columns) if manifest.complete else {},
    )


def _start_run(tracker: Tracker, config: ScoreConfig, model: ModelRecord) -> str | None:
    """Opens the scoring run in the config's experiment, by default ``<model name>-scoring``.

    Returns the run's id, or None with tracking off.
    """
    tracker.set_experiment(config.experiment or f"{model.name}-scoring")
    if not tracker.enabled:  # an unreachable store was reported once: the scoring goes on untracked
        return None
    return tracker.start_run(
        run_name=f"score-{model.name}-{model.column_value}",
        tags={"model_uri": model.uri, "pinned_uri": model.pinned_uri, "model_version": model.column_value},
    )


def _end_run(tracker: Tracker, run_id: str | None, status: str) -> None:
    if run_id is not None:
        tracker.end_run(status)


def _log_run(
    tracker: Tracker, config: ScoreConfig, result: ScoreResult, manifest: Manifest, phase: ScoringPhase
) -> None:
    """Logs the run to MLflow from the driver (the one place that talks to MLflow here)."""
    tracker.log_params(
        {
            "model": asdict(manifest.model),
            "model_version": result.model_version,
            "input": config.input,
            "output": str(result.output),
            "input_fingerprint": result.input_fingerprint,
            "history": manifest.history_source,
            "settings": asdict(config.settings()),
            "batch_size": config.batch_size,
            "concurrency": config.concurrency,
            "use_gpu": config.use_gpu,
        }
    )
    metrics = {
        "rows_in": result.rows_in,
        "rows_out": result.rows_out,
        "expected_out": result.expected_out,
        "rows_scored_this_run": phase.rows_scored,
        "partitions": result.partitions,
        "partitions_scored": result.partitions_scored,
        "partitions_skipped": result.partitions_skipped,
        "duration_s": result.seconds,
        "scoring_s": phase.seconds,
        "rows_per_s": result.rows_per_s,
        "complete": float(result.complete),
        "problems": len(result.problems),
    }
    tracker.log_metrics(metrics | {f"score/{k}": v for k, v in result.summary.items()})
    tracker.log_dict(manifest.to_dict(), "scoring/manifest.json")
