"""What the driver records of a training run: every MLflow call of training, in the driver process.

Workers only compute and report (:mod:`recsys.train.reports`). Ray Train v2 hands every report to its user
callbacks in the *controller*, an actor of its own (``TrainController``), not in the process that called
``fit``. So the callback here, :class:`ReportForwarder`, does no recording: it puts rank 0's report and its
checkpoint on a Ray queue, which a thread of the driver (:class:`RecorderChannel`) drains into the
:class:`RunRecorder`. The recorder therefore lives where ``run_training`` does: it probes the store before
anything starts (failing fast when tracking is required but unreachable), its block (``with recorder:``)
holds the MLflow run and ends it ``FAILED`` (``KILLED`` on Ctrl-C) when anything in it fails, and its
summary is plain data that ``run_training`` returns, with no file read back. A restarted worker only
reports again; it never opens a run. A recorder that fails stops the training (see
:class:`RecorderChannel`).

The recorder logs the config, the feature spec and the sharding plan (at the workers' first start), train
loss and throughput every N steps, the validation metrics and a calibration plot every epoch, and at the
end the test metrics (after the package's calibration, and before it as ``..._raw``) and plots (the
calibration plot before and after), the test predictions, and the model package: logged as an MLflow model and
registered (``champion`` if it beats the current champion on the main validation metric, else
``challenger``). ``tracking.json`` in the run's folder keeps the MLflow run's id, so that ``--resume``
reopens the same run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ray.train import UserCallback

from features.console import story
from features.files import atomic_write, staged_dir, staged_file
from recsys.train.config import TrainConfig
from recsys.train.reports import (
    PACKAGE_DIR,
    RECORD,
    TEST_PREDICTIONS,
    VALID_PREDICTIONS,
    DivergedReport,
    EpochReport,
    FinalReport,
    NonFiniteLossError,
    Report,
    StartReport,
    TrainWindow,
    public_metrics,
    read_report,
    records_folder,
)
from recsys.train.summary import TrainingSummary

log = logging.getLogger(__name__)

TRACKING_FILE = "tracking.json"  # in the run's folder: {"run_id": ...}
SUMMARY_METRICS = (
    "/auc",
    "/gauc",
    "/log_loss",
    "/ne",
    "/calibration",
    "/oracle_auc",
    "/auc_gap",
    "/log_loss_raw",
    "/calibration_raw",
    "/mse",
)


class RunRecorder:
    """The driver's record of one training run, through :mod:`recsys.tracking`.

    Args:
        config: the run's config.
        run_dir: the run's folder (Ray Train's checkpoints, ``tracking.json``, the package).
        tracking_uri: the MLflow store.
        require: fail if the store is unreachable (else go on without tracking, said once).
        register: log and register the model at the end; then the store is required, and a model that
            could not be logged or registered is an error (:class:`~recsys.tracking.RegistrationError`).
    """

    def __init__(
        self, config: TrainConfig, run_dir: Path, tracking_uri: str, require: bool, register: bool = False
    ) -> None:
        from features.spec import FeatureSpec
        from recsys.tracking import Tracker, TrackingError

        self.config, self.run_dir, self.register = config, run_dir, register
        self.spec = FeatureSpec.load(Path(config.features) / "spec.json")
        # Probes the store and opens no run: an unreachable store that is required fails here, in seconds.
        # Registering needs the store at the start too; later failures only lose what they would log,
        # until the model is logged and registered at the end, which must succeed.
        self.tracker = Tracker(tracking_uri, config.run.experiment, require=require)
        if register and not self.tracker.enabled:
            raise TrackingError(
                f"{self.tracker.last_error}; the model could not be registered (--no-register: train without)"
            )
        self.run_id: str | None = None
        self.workers: int | None = None  # of the last (re)start
        self.plan_logged = True
        self.steps: list[int] = []
        self.losses: dict[str, list[float]] = {}
        self.summary: TrainingSummary | None = None

    def __enter__(self) -> RunRecorder:
        """Opens the MLflow run: a new one, or the one ``tracking.json`` names (``--resume``)."""
        try:
            self._open()
        except BaseException as error:
            self.close(_end_status(type(error)))
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: Any) -> None:
        """Ends the run ``FAILED`` on an error, ``KILLED`` on Ctrl-C (a recorded run is ended already)."""
        if kind is not None:
            self.close(_end_status(kind))

    def _open(self) -> None:
        state_file = self.run_dir / TRACKING_FILE
        previous = json.loads(state_file.read_text()).get("run_id") if state_file.exists() else None
        config = self.config
        tags = {"ray_run": self.run_dir.name, "spec_hash": self.spec.content_hash, **dict(config.run.tags)}
        if config.run.parent_run_id:
            tags["mlflow.parentRunId"] = config.run.parent_run_id
        self.run_id = self.tracker.start_run(run_name=self.run_dir.name, run_id=previous, tags=tags)
        new_run = self.run_id is not None and self.run_id != previous
        self.plan_logged = not new_run  # a reopened run has its plan already
        if new_run:
            atomic_write(state_file, json.dumps({"run_id": self.run_id}))
            self.tracker.log_params(config.to_dict())
            self.tracker.log_dict(config.to_dict(), "config/train_config.json")
            self.tracker.log_text(self.spec.to_json(), "config/feature_spec.json")

    def record(self, report: Report, checkpoint: Any | None) -> None:
        """Logs one report of rank 0 (the files are in the records folder named after its checkpoint)."""
        if self.summary is not None:
            return  # the run is recorded; a worker restarted after its final report reports it again
        for window in getattr(report, "windows", ()):
            self._train_window(window)
        if isinstance(report, StartReport):
            self._start(report)
        elif isinstance(report, EpochReport):
            with self._records(checkpoint) as folder:
                self._epoch(report, folder)
        elif isinstance(report, FinalReport):
            with self._records(checkpoint) as folder:
                self.summary = self._finish(report, folder)
        elif isinstance(report, DivergedReport):
            raise NonFiniteLossError(report)

    @contextlib.contextmanager
    def _records(self, checkpoint: Any) -> Iterator[Path]:
        """The report's records folder (:func:`~recsys.train.reports.records_folder`), removed once logged.

        Read there, not from the checkpoint: Ray Train may have pruned the checkpoint by now.
        """
        folder = records_folder(self.run_dir, Path(checkpoint.path).name)
        yield folder
        shutil.rmtree(folder, ignore_errors=True)
        with contextlib.suppress(OSError):
            folder.parent.rmdir()  # when it was the last

    def close(self, status: str) -> None:
        """Ends the MLflow run of a run that failed (``FAILED``) or was interrupted (``KILLED``).

        Tried even when tracking went off during the run: a store that failed may be back.
        """
        if self.summary is None:
            try:
                self.tracker.end_run(status, even_if_off=True)
            except Exception as error:  # a required store that failed: the run's own error is the one raised
                log.warning("MLflow run %s could not be ended %s: %s", self.run_id, status, error)

    def _start(self, report: StartReport) -> None:
        # Restarted workers (``max_failures``) train again from their checkpoint's step: the windows after it
        # are replayed, and replace the first attempt's in the loss plot.
        kept = sum(step <= report.step for step in self.steps)
        del self.steps[kept:]
        for losses in self.losses.values():
            del losses[kept:]
        if not self.plan_logged:
            self.plan_logged = True
            self.tracker.log_text(report.plan, "config/sharding_plan.txt")
            self.tracker.log_params(
                {"world_size": report.world_size, "sharding_plan_ranks": report.plan_ranks}
            )
        # The worker count over time: one point per start and restart (it changes when a run resumes on
        # another number of workers).
        self.tracker.log_metrics({"workers": float(report.world_size)}, step=report.step)
        story(_start_line(self.workers, report))
        self.workers = report.world_size
        if report.resumed_from is not None:
            self.tracker.log_metrics({"restarts/from_epoch": float(report.resumed_from)}, step=report.step)

    def _train_window(self, window: TrainWindow) -> None:
        self.steps.append(window.step)
        for name, value in window.losses.items():
            self.losses.setdefault(name, []).append(value)
        metrics = {f"train/{k}": v for k, v in {**window.losses, **window.gate_stats}.items()}
        self.tracker.log_metrics({**metrics, "train/examples_per_s": window.examples_per_s}, step=window.step)

    def _epoch(self, report: EpochReport, records: Path) -> None:
        from recsys.report import calibration_figure
        from recsys.train.evaluation import finite_metrics

        _check_main_metric(report, f"valid/{self.config.training.main_metric}")
        self.tracker.log_metrics(
            {**finite_metrics(report.metrics), "epoch": float(report.epoch)}, report.step
        )
        labels, probs, _ = _predictions(records / VALID_PREDICTIONS, self.config)
        if labels:  # binary tasks only: a regression-only model has no calibration to draw
            figure = calibration_figure(labels, probs, f"validation, epoch {report.epoch}")
            self.tracker.log_figure(figure, f"report/calibration_valid_epoch{report.epoch:03d}.png")

    def _finish(self, report: FinalReport, directory: Path) -> TrainingSummary:
        """Test metrics, the report's plots, the predictions and the package; registers the model."""
        from recsys.train.evaluation import finite_metrics

        self.tracker.log_metrics(finite_metrics(report.metrics), step=report.state.step)
        self._report_plots(report, directory / TEST_PREDICTIONS)
        self._test_predictions(directory / TEST_PREDICTIONS)
        package = self.run_dir / PACKAGE_DIR
        _replace_folder(directory / PACKAGE_DIR, package)  # a resumed run replaces its first part's package
        summary = _summary(report, self.config, self.run_id, package)
        summary = dataclasses.replace(summary, **self._register(package, summary.final_valid_main_metric))
        self.tracker.end_run("FINISHED")
        return summary

    def _report_plots(self, report: FinalReport, test_predictions: Path) -> None:
        from recsys.report import calibration_figure, expert_load_figure, loss_figure
        from recsys.train.evaluation import finite_metrics

        history = list(report.state.history)
        labels, probs, raw = _predictions(test_predictions, self.config)
        if labels:
            self.tracker.log_figure(
                calibration_figure(labels, probs, "test split", raw=raw), "report/calibration_test.png"
            )
        load = expert_load_figure(history, "expert load per gate (validation)")
        self.tracker.log_figure(load, "report/expert_load.png")
        if self.steps:
            self.tracker.log_figure(loss_figure(self.steps, self.losses, "training loss"), "report/loss.png")
        metrics = {"history": history, "test": finite_metrics(report.metrics)}
        self.tracker.log_dict(metrics, "report/metrics.json")

    def _test_predictions(self, source: Path) -> None:
        """The sharded model's test predictions (keys and ``p_{task}``), for audits, beside the package."""
        import pyarrow.parquet as pq

        from recsys.train.evaluation import LABEL_PREFIX

        table = pq.read_table(source)
        table = table.select([c for c in table.column_names if not c.startswith(LABEL_PREFIX)])
        target = self.run_dir / TEST_PREDICTIONS
        with staged_file(target) as tmp:
            pq.write_table(table, tmp)
        self.tracker.log_artifact(target, "report")

    def _register(self, package: Path, final_metric: float) -> dict[str, Any]:
        """Logs the package as an MLflow model and registers it; the summary's registry fields.

        Raises:
            RegistrationError: the model could not be logged or registered (with ``register``).
        """
        from recsys.tracking import RegistrationError, log_model, register_model

        if not self.register:
            return {}
        model_name = self.config.run.model_name
        uri = log_model(self.tracker, package)
        version = None
        if uri is not None:
            key = f"valid/{self.config.training.main_metric}"
            version = register_model(self.tracker, uri, model_name, key, float(final_metric))
        if version is None:
            why = self.tracker.last_error or "tracking is off"
            raise RegistrationError(
                f"model not registered: {model_name} was not {'registered' if uri else 'logged'} ({why}); "
                f"the trained package is in {package}"
            )
        return {
            "model_uri": uri,
            "registered_model": model_name,
            "version": version.version,
            "alias": version.alias,
        }


def _summary(report: FinalReport, config: TrainConfig, run_id: str | None, package: Path) -> TrainingSummary:
    """What ``run_training`` returns: test metrics, the kept epoch and its validation metric, routing."""
    from recsys.metric_names import expert_loads
    from recsys.train.evaluation import finite_metrics

    state = report.state
    test = finite_metrics(report.metrics)
    main = f"valid/{config.training.main_metric}"
    return TrainingSummary(
        mlflow_run_id=run_id,
        model_package=str(package),
        best_valid_main_metric=state.best,
        # The registry compares the validation metric of the epoch whose weights the package holds.
        final_valid_main_metric=state.final_metric(f"valid/{config.training.main_metric}"),
        final_epoch=state.final_epoch,
        steps=state.step,
        test={k: v for k, v in test.items() if k.endswith(SUMMARY_METRICS)},
        expert_load=expert_loads(test, "test/"),  # per gate, for experiments that compare routing
        valid_curve=[h[main] for h in state.history if main in h],
    )


def _start_line(previous: int | None, report: StartReport) -> str:
    """``training on 2 workers``, or ``restarted on 1 worker (was 2), from epoch 2, step 60``."""
    n = report.world_size
    line = f"{'training' if previous is None else 'restarted'} on {n} worker{'s' if n > 1 else ''}"
    if previous is not None and previous != n:
        line += f" (was {previous})"
    if report.resumed_from is not None:
        line += f", from epoch {report.resumed_from + 1}, step {report.step}"
    return line


def _check_main_metric(report: EpochReport, key: str) -> None:
    """Raises a named ValueError when the epoch's main validation metric is missing or not finite."""
    import math

    value = report.metrics.get(key)
    if value is None or not math.isfinite(value):
        raise ValueError(
            f"{key} is {value} at epoch {report.epoch + 1}: the model cannot be compared or selected "
            "(an AUC needs both labels in the validation split); nothing was logged as a model"
        )


def _end_status(kind: type[BaseException]) -> str:
    """The MLflow status of a run left by an exception: ``KILLED`` on Ctrl-C, else ``FAILED``."""
    return "KILLED" if issubclass(kind, KeyboardInterrupt) else "FAILED"


def _predictions(path: Path, config: TrainConfig) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Labels, probabilities and those before calibration (if any) of the binary tasks, from a checkpoint."""
    import pyarrow.parquet as pq

    from recsys.train.evaluation import Predictions

    preds = Predictions.from_arrow(pq.read_table(path))
    labels, probs = preds.binary(config)
    return labels, probs, {task: preds.raw_probs[task] for task in probs if task in preds.raw_probs}


def _replace_folder(source: Path, target: Path) -> None:
    """Copies ``source`` to ``target``: into a temporary folder beside it, then put in place of it."""
    with staged_dir(target) as tmp:
        shutil.copytree(source, tmp, dirs_exist_ok=True)


class ReportForwarder(UserCallback):
    """In Ray Train's controller: rank 0's reports to the driver's recorder, public metrics to the others.

    The run's other user callbacks (Ray Tune's report callback) see what they always saw: the reports of
    step and epoch checkpoints, with their public metrics only (see
    :func:`~recsys.train.reports.public_metrics`).

    Args:
        queue: the :class:`ray.util.queue.Queue` the driver's :class:`RecorderChannel` drains.
        callbacks: the run's other user callbacks.
    """

    def __init__(self, queue: Any, callbacks: list[UserCallback]) -> None:
        self.queue = queue
        self.callbacks = callbacks

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        """Forwards rank 0's record (and the checkpoint); passes public metrics on."""
        if metrics and RECORD in metrics[0]:
            try:
                self.queue.put((metrics[0], checkpoint))
            except Exception as error:  # raised here, it fails the run: Ray Train stops the workers
                raise RuntimeError(
                    "the driver stopped recording this run (run_training raises its error); training stops"
                ) from error
        public = public_metrics(metrics[0]) if metrics else None
        if public is not None:
            for callback in self.callbacks:
                callback.after_report(run_context, [public, *metrics[1:]], checkpoint)

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        """Passes the workers' exceptions on."""
        for callback in self.callbacks:
            callback.after_exception(run_context, worker_exceptions)


class RecorderChannel:
    """Reports from Ray Train's controller to a :class:`RunRecorder` in this process, on a thread.

    Use it around ``fit``, inside the recorder's block: on leaving, the reports still queued are recorded
    (``fit`` returns once the controller has handed every report over) and an error of the recorder is
    raised. When the recorder fails, or the queue does, the thread shuts the queue down: the forwarder's
    next report then fails, and with it the run, so the workers stop early; the recorder's error is the one
    raised (the recorder's block then ends the MLflow run ``FAILED``).

    Example:
        >>> with recorder, RecorderChannel(recorder) as channel:  # doctest: +SKIP
        ...     TorchTrainer(..., run_config=RunConfig(callbacks=channel.callbacks([]))).fit()
    """

    def __init__(self, recorder: RunRecorder) -> None:
        import ray
        from ray.util.queue import Queue
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        self.recorder = recorder
        # On the driver's node (as Ray Train's controller is): a lost worker node must not take it along.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._drain, name="train-recorder", daemon=True)

    def callbacks(self, others: list[Any] | None) -> list[Any]:
        """The run's callbacks: the forwarder, which wraps the other user callbacks, and the rest."""
        others = list(others or [])
        users = [c for c in others if isinstance(c, UserCallback)]
        return [ReportForwarder(self.queue, users), *(c for c in others if not isinstance(c, UserCallback))]

    def __enter__(self) -> RecorderChannel:
        self.thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: Any) -> None:
        self.done.set()
        self.thread.join()
        self.queue.shutdown()
        if self.error is not None and not (kind is not None and issubclass(kind, KeyboardInterrupt)):
            raise self.error from error  # also when it made fit fail: the cause, not Ray Train's wrapper

    def _drain(self) -> None:
        from ray.util.queue import Empty

        while True:
            try:
                metrics, checkpoint = self.queue.get(timeout=0.2)
                self.recorder.record(read_report(metrics), checkpoint)
            except Empty:
                if self.done.is_set():
                    return
            except Exception as error:  # of the recorder, or of the queue (its actor died): raised on exit
                self.error = error
                self.queue.shutdown(force=True)  # the forwarder's next report fails the run
                return
