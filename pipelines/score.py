r"""Score candidate impressions with a registered model and rank them per request, resumably.

Examples::

    # the champion over a candidate set (users.parquet and items.parquet beside it), clicks as history:
    python -m pipelines.score --model models:/ecommerce-ranker@champion \
        --input data/cands/impressions.parquet --history data/demo/raw/impressions.parquet \
        --output data/scores --tracking-uri sqlite:///data/demo/mlflow.db
    # a pinned version, the best 10 per request, ranked by p_click * p_purchase^0.5, logged to MLflow:
    python -m pipelines.score --model models:/ecommerce-ranker/3 --input 'cands/*.parquet' \
        --output out --top-k 10 --alpha 0.5 --experiment ecommerce-ranker-scoring
    # on the machine's GPU(s), shared by the actors, with large model batches:
    python -m pipelines.score --model models:/ecommerce-ranker@champion --input 'cands/*.parquet' \
        --output out --use-gpu --batch-size 65536
    # the same command as a job on a Ray cluster (input and output on a shared filesystem):
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python -m pipelines.score ...

Rerunning the same command after a crash skips the finished partitions (OUT/manifest.json) and scores
the rest; an output folder of another model version, input or settings is refused unless --overwrite.
OUT is marked as a scoring output when first opened: a folder that holds other files is never written
into nor cleared (--overwrite included), and OUT may not be an input, lie inside one, or contain one.
Output: OUT/part-XXXXX.parquet with impression_id, request_id, user_id, item_id, one p_<task> per task of
the model (p_click, p_purchase for the demo model), score, rank (1 = best within request_id) and
model_version. The run is logged to MLflow, in the experiment <model name>-scoring unless --experiment
names another. Library output goes to OUT.log (beside the output folder; --verbose: on screen too).
Exit status: 0 when every count agrees; 1 when a count differs, partitions are left or a write failed (a
full disk: rerun the same command to finish); 2 on bad input, a refused output folder, or a model that
returns NaN or infinite scores (nothing, or no more partitions, written).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from features import console
from pipelines.cli import add_console_flags, fail, quiet_console
from recsys.precision import EMBEDDING_DTYPES, PRECISIONS
from recsys.scoring import PRODUCT, ScoreConfig, ScoreResult


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parses the command line."""
    defaults = ScoreConfig(model="-", input="-", output="-")
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.score",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model",
        required=True,
        help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/PATH, or a local package folder; "
        "an alias is resolved once, at the start, and the version recorded",
    )
    parser.add_argument(
        "--input",
        required=True,
        help="candidate impressions: a Parquet file, folder or glob (labels optional)",
    )
    parser.add_argument("--output", required=True, help="output folder (resumed if it holds this run)")
    parser.add_argument("--users", help="users table (default: users.parquet beside the input)")
    parser.add_argument("--items", help="items table (default: items.parquet beside the input)")
    parser.add_argument(
        "--history",
        help="impressions with clicks for the history features (default: the input's own labels if it "
        "has them, else none: empty history)",
    )
    parser.add_argument("--top-k", type=int, help="keep the best K rows of each request (default: all)")
    parser.add_argument(
        "--score-formula",
        default=defaults.score_formula,
        help=f"{PRODUCT} (default): the first task's probability times the others' to the power alpha "
        "(p_click * p_purchase^alpha for the demo model); or a task's name (click, purchase, ...): that "
        "task's output alone",
    )
    parser.add_argument(
        "--alpha",
        type=float,
        default=defaults.alpha,
        help="exponent of the later tasks in product, p_purchase for the demo model (default 1)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=defaults.batch_size,
        help=f"rows per model call ({defaults.batch_size})",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=defaults.concurrency,
        help="scoring actors, each reading, building features and scoring whole partitions "
        "(default: one per CPU)",
    )
    parser.add_argument(
        "--threads-per-actor",
        type=int,
        default=defaults.threads_per_actor,
        help=f"torch and polars threads per actor ({defaults.threads_per_actor})",
    )
    parser.add_argument(
        "--use-gpu",
        action="store_true",
        help="actors share the cluster's GPUs; the model runs there (the features stay on the CPU); use a "
        "large --batch-size, e.g. 65536",
    )
    parser.add_argument(
        "--rows-per-partition",
        type=int,
        default=defaults.rows_per_partition,
        help=f"most rows per partition and output file ({defaults.rows_per_partition:,})",
    )
    parser.add_argument(
        "--embedding-dtype",
        choices=EMBEDDING_DTYPES,
        help="the tables' precision: fp32 tables are row-wise quantized as the model loads (fp16, int8, "
        "int4; CPU only); default: the package's own (a quantized package scores in its precision only)",
    )
    parser.add_argument(
        "--compute-dtype",
        choices=PRECISIONS,
        default=defaults.compute_dtype,
        help="the dense layers' precision: fp32 (default), bf16 (autocast), or auto (bf16 where the CPU or "
        "GPU has bf16 units, else fp32)",
    )
    parser.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI or ./mlflow.db)")
    parser.add_argument(
        "--experiment", help="MLflow experiment to log the scoring run in (default: <model name>-scoring)"
    )
    parser.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    parser.add_argument(
        "--overwrite", action="store_true", help="rescore everything, replacing another run's output"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_console_flags(parser, "OUT.log, beside the output folder")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Scores; exits 2 on bad input, 1 if a count differs or a write failed, 0 otherwise."""
    args = parse_args(argv)
    from features.contract import ContractError
    from recsys.scoring import check_paths, run_scoring
    from recsys.tracking import TrackingError

    try:
        config = _config(args)
        check_paths(config)  # first: a refused output folder gets nothing, not even OUT.log beside it
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        return fail(exc)
    output = Path(args.output)
    with quiet_console(args, output.parent / f"{output.name}.log"):
        try:
            result = run_scoring(config)
        except (ContractError, ValueError, FileNotFoundError, FileExistsError, TrackingError) as exc:
            return fail(exc)
        except OSError as exc:  # a write failed
            console.error(f"error: {exc}; rerun the same command to finish")
            return 1
        _print_result(result)
    return 0 if result.ok else 1


def _config(args: argparse.Namespace) -> ScoreConfig:
    return ScoreConfig(
        model=args.model,
        input=args.input,
        output=args.output,
        users=args.users,
        items=args.items,
        history=args.history,
        top_k=args.top_k,
        score_formula=args.score_formula,
        alpha=args.alpha,
        batch_size=args.batch_size,
        concurrency=args.concurrency,
        threads_per_actor=args.threads_per_actor,
        use_gpu=args.use_gpu,
        rows_per_partition=args.rows_per_partition,
        tracking_uri=args.tracking_uri,
        experiment=args.experiment,
        address=args.address,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        embedding_dtype=args.embedding_dtype,
        compute_dtype=args.compute_dtype,
    )


def _print_result(result: ScoreResult) -> None:
    from recsys.scoring import top_of_request

    say = console.story
    say(
        f"\nscored with {result.pinned_uri} (from {result.model_uri}): {result.rows_in:,} rows in, "
        f"{result.rows_out:,} rows out ({result.expected_out:,} expected), {result.partitions} partitions "
        f"({result.partitions_skipped} skipped as done), {result.seconds:.1f} s, "
        f"{result.rows_per_s:,.0f} rows/s"
    )
    say(f"output: {result.output} (manifest {result.manifest})")
    if result.run_id:
        say(f"mlflow run: {result.run_id}")
    if result.problems:
        console.error("count problems:\n  " + "\n  ".join(result.problems))
    if not result.complete:
        console.error("incomplete: rerun the same command to finish")
    if result.ok:
        say(json.dumps({k: round(v, 5) for k, v in result.summary.items()}, sort_keys=True))
        say(str(top_of_request(result.output)))


if __name__ == "__main__":
    # A Ray call after the run's Ray is shut down (an object collected late) then fails at once, rather
    # than start a new local Ray while the process exits. Read when ray is first imported, which is later.
    os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")
    sys.exit(main())
