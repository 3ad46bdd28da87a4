r"""Train a multi-task ranking model with Ray Train over TorchRec-sharded embeddings, tracked in MLflow.

Examples::

    # embedded local Ray, local MLflow store (./mlflow.db):
    python -m pipelines.train --config recsys/configs/train_demo.yaml
    # against `mlflow server --host 127.0.0.1 --port 5000`, 2 workers, continuing the last run:
    python -m pipelines.train --config train.yaml --tracking-uri http://127.0.0.1:5000 \
        --num-workers 2 --resume
    # a new run from a checkpoint of an earlier one (e.g. taken within an epoch, checkpoint_every_steps):
    python -m pipelines.train --config train.yaml \
        --from-checkpoint artifacts/ray/<run>/checkpoint_step00000400
    # the same command as a job on a cluster started with `ray start --head` (see README):
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python -m pipelines.train --config recsys/configs/train_demo.yaml

The config is YAML (recsys/train/config.py) or a shipped name (train_demo, train_census). Library output
goes to a log file beside the run's checkpoints (``--verbose``: on screen too).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

from features import console
from features.checks import config_path
from pipelines.cli import add_console_flags, fail, quiet_console
from recsys.train.config import CONFIG_DIR, TrainConfig


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parses the command line."""
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, help="train config: a YAML path or a shipped name")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///./mlflow.db)")
    parser.add_argument(
        "--num-workers",
        type=_worker_count,
        metavar="N|MIN-MAX",
        help="Ray Train workers (overrides run.num_workers); MIN-MAX trains elastically: on as many as fit, "
        "going on with fewer when workers or nodes are lost",
    )
    parser.add_argument("--use-gpu", action="store_true", help="one GPU per worker, NCCL")
    parser.add_argument("--resume", action="store_true", help="continue the latest run from its checkpoint")
    parser.add_argument(
        "--from-checkpoint",
        metavar="DIR",
        help="start a new run from a checkpoint folder of an earlier run (its weights, optimizer state and "
        "place in the data), on any number of workers and sharding plan",
    )
    parser.add_argument(
        "--require-tracking",
        action="store_true",
        help="fail if MLflow is unreachable (default: train on and say so once)",
    )
    parser.add_argument(
        "--no-register",
        action="store_true",
        help="train without logging and registering the model (by default MLflow must be reachable from "
        "the start, and a model that could not be registered fails the run)",
    )
    parser.add_argument("--epochs", type=int, help="override training.epochs")
    parser.add_argument("--features", help="override the features folder")
    add_console_flags(parser, "<run.storage_path>/train-<time>.log")
    return parser.parse_args(argv)


def _worker_count(text: str) -> int | list[int]:
    """``2`` or ``1-2`` (checked by the config)."""
    try:
        parts = [int(p) for p in text.split("-")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or MIN-MAX, got {text!r}") from None
    if len(parts) > 2:
        raise argparse.ArgumentTypeError(f"expected N or MIN-MAX, got {text!r}")
    return parts[0] if len(parts) == 1 else parts


def load_config(args: argparse.Namespace) -> TrainConfig:
    """The config file with the command line's overrides."""
    config = TrainConfig.from_yaml(config_path(args.config, CONFIG_DIR, "train config"))
    run, training, top = {}, {}, {}
    if args.num_workers is not None:
        run["num_workers"] = args.num_workers
    if args.use_gpu:
        run["use_gpu"] = True
    if args.epochs is not None:
        training["epochs"] = args.epochs
    if args.features:
        top["features"] = args.features
    return config.replace(run=run, training=training, **top) if run or training or top else config


def main(argv: list[str] | None = None) -> int:
    """Trains; bad input exits with status 2, a failed run with 1, each with a one-line reason."""
    args = parse_args(argv)
    try:
        config = load_config(args)
    except (ValueError, FileNotFoundError) as exc:
        return fail(exc)
    log = Path(config.run.storage_path) / f"train-{dt.datetime.now():%Y%m%d-%H%M%S}.log"
    with quiet_console(args, log):
        from recsys.tracking import TrackingError
        from recsys.train.driver import run_training
        from recsys.train.reports import NonFiniteLossError

        try:
            result = run_training(
                config,
                tracking_uri=args.tracking_uri,
                require_tracking=args.require_tracking,
                resume=args.resume,
                start_from=args.from_checkpoint,
                register=not args.no_register,
            )
        except (ValueError, FileNotFoundError) as exc:
            return fail(exc)
        except (TrackingError, NonFiniteLossError) as exc:
            return fail(exc, status=1)
        console.story(f"run: {result.run_name} (checkpoints in {result.storage})")
        console.story(json.dumps(result.summary.to_dict(), indent=1, sort_keys=True, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
