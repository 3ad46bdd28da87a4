r"""Write a copy of a model package whose embedding tables are row-wise quantized (fp16, int8 or int4).

Examples::

    # the champion's tables in int8, into a package folder that pipelines.score takes as --model:
    python -m pipelines.quantize --model models:/ecommerce-ranker@champion --embedding-dtype int8 \
        --out data/demo/model-int8 --tracking-uri sqlite:///data/demo/mlflow.db
    python -m pipelines.score --model data/demo/model-int8 --compute-dtype auto --input ... --output ...

``pipelines.score --embedding-dtype int8`` quantizes as the model loads and needs no copy; the copy is what
to ship where size counts (an int8 row of dimension 16 takes 24 bytes instead of 64). It scores in its own
precision only. Prints the sizes of both packages. Exit status: 0 done, 2 on bad input (nothing written).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from features import console
from pipelines.cli import add_console_flags, fail, quiet_console
from recsys.precision import EMBEDDING_DTYPES


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.quantize",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model",
        required=True,
        help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/PATH or a package folder",
    )
    parser.add_argument(
        "--embedding-dtype",
        required=True,
        choices=[d for d in EMBEDDING_DTYPES if d != "fp32"],
        help="the tables' precision in the copy",
    )
    parser.add_argument("--out", required=True, help="the new package folder")
    parser.add_argument("--overwrite", action="store_true", help="replace the package folder --out")
    parser.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI or ./mlflow.db)")
    add_console_flags(parser, "OUT.log, beside the package folder")
    return parser.parse_args(argv)


def _source(args: argparse.Namespace, workdir: Path) -> Path:
    """The fp32 package folder: --model itself, or the registered model downloaded into ``workdir``."""
    if Path(args.model).is_dir():
        return Path(args.model)
    from recsys.tracking import Tracker, download_package, resolve_model

    tracker = Tracker(args.tracking_uri, None)  # resolve_model names an unreachable store
    return download_package(tracker, resolve_model(tracker, args.model), workdir / "model")


def main(argv: list[str] | None = None) -> int:
    """Quantizes; exits 2 on bad input."""
    args = parse_args(argv)
    from recsys.package import package_bytes, quantize_package
    from recsys.tracking import TrackingError

    out = Path(args.out)
    with quiet_console(args, out.parent / f"{out.name}.log"):
        try:
            with tempfile.TemporaryDirectory(prefix="recsys-quantize-") as workdir:
                source = _source(args, Path(workdir))
                quantize_package(source, out, args.embedding_dtype, overwrite=args.overwrite)
                before, after = package_bytes(source), package_bytes(out)
        except (ValueError, FileNotFoundError, FileExistsError, TrackingError) as exc:
            return fail(exc)
        console.story(
            f"wrote {out}: {args.embedding_dtype} tables, {after / 2**20:.2f} MiB "
            f"({before / 2**20:.2f} MiB in fp32, {before / after:.2f}x smaller)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
