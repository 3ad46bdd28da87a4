r"""Run an experiment: a grid of training runs (data sets x models x settings x seeds) with one command.

Examples::

    # a shipped spec (recsys/experiments/specs/*.yaml), results in artifacts/experiments/gating:
    python -m pipelines.experiment --spec gating
    # a smoke run: tiny data, one seed
    python -m pipelines.experiment --spec task_relatedness --quick --out /tmp/rel
    # against `mlflow server --host 127.0.0.1 --port 5000`:
    python -m pipelines.experiment --spec census --tracking-uri http://127.0.0.1:5000

The grid is one MLflow parent run with a nested child run per training run. The results folder gets
results.md and results.csv (mean ± std over seeds), records.json and PNG plots; they are also the parent
run's artifacts. Finished runs are kept in OUT/runs: running the command again reuses them (--fresh: don't).
Library output goes to OUT/experiment.log (--verbose: on screen too).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from features import console
from pipelines.cli import add_console_flags, fail, quiet_console


def main(argv: list[str] | None = None) -> int:
    """Parses arguments and runs the experiment; bad input exits with status 2 and a one-line reason."""
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.experiment",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--spec", required=True, help="experiment spec: a YAML path or a shipped name")
    parser.add_argument("--out", help="results folder (default: artifacts/experiments/<spec name>[-quick])")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///OUT/mlflow.db)")
    parser.add_argument("--quick", action="store_true", help="tiny data and one seed (a smoke run)")
    parser.add_argument("--num-workers", type=int, help="Ray Train workers per run (default: the spec's)")
    parser.add_argument(
        "--seeds", type=int, nargs="+", help="train these seeds instead of the spec's (e.g. --seeds 0)"
    )
    parser.add_argument("--datasets", nargs="+", help="run these data sets of the spec only (by name)")
    parser.add_argument(
        "--publish",
        help="also copy results.md, results.csv and the plots here (e.g. experiments/results/NAME)",
    )
    parser.add_argument("--fresh", action="store_true", help="train every run again (no reuse from OUT/runs)")
    add_console_flags(parser, "OUT/experiment.log")
    args = parser.parse_args(argv)

    from recsys.experiments.paper import is_paper_spec
    from recsys.experiments.spec import spec_path

    try:
        if is_paper_spec(spec_path(args.spec)):
            return _paper(args, argv)
    except (ValueError, FileNotFoundError) as exc:
        return fail(exc)

    from recsys.experiments.runner import run_experiment
    from recsys.experiments.spec import load_spec

    try:
        spec = load_spec(args.spec)
    except (ValueError, FileNotFoundError) as exc:
        return fail(exc)
    out, command = _out_and_command(args, argv, spec.name)
    with quiet_console(args, out / "experiment.log"):
        try:
            result = run_experiment(
                spec,
                out,
                tracking_uri=args.tracking_uri,
                quick=args.quick,
                num_workers=args.num_workers,
                fresh=args.fresh,
                command=command,
                seeds=args.seeds,
                publish=Path(args.publish) if args.publish else None,
                datasets=args.datasets,
            )
        except (ValueError, FileNotFoundError) as exc:
            return fail(exc)
        console.story("\n" + result.markdown)
        minutes = result.seconds / 60
        console.story(
            f"{len(result.records)} runs in {minutes:.1f} min; MLflow parent run {result.parent_run_id}"
        )
        for name, path in result.files.items():
            console.story(f"  {name:16s} {path}")
    return 0


def _out_and_command(args: argparse.Namespace, argv: list[str] | None, name: str) -> tuple[Path, str]:
    """The results folder (``--out`` or the default for the spec) and the command line, for the report."""
    out = Path(args.out or f"artifacts/experiments/{name}{'-quick' if args.quick else ''}")
    command = "python -m pipelines.experiment " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    return out, command


def _paper(args: argparse.Namespace, argv: list[str] | None) -> int:
    """Runs a ``kind: paper_synthetic`` spec (the MMoE paper's synthetic experiment)."""
    from recsys.experiments.paper import load_paper_spec, run_paper_experiment
    from recsys.experiments.spec import spec_path

    for flag in ("seeds", "datasets", "num_workers"):
        if getattr(args, flag) is not None:
            return fail(ValueError(f"--{flag.replace('_', '-')}: not an option of a paper_synthetic spec"))
    spec = load_paper_spec(spec_path(args.spec))
    out, command = _out_and_command(args, argv, spec.name)
    with quiet_console(args, out / "experiment.log"):
        result = run_paper_experiment(
            spec,
            out,
            tracking_uri=args.tracking_uri,
            quick=args.quick,
            fresh=args.fresh,
            command=command,
            publish=Path(args.publish) if args.publish else None,
        )
        console.story("\n" + result.markdown)
        console.story(
            f"{len(result.cells)} cells in {result.seconds / 60:.1f} min; "
            f"MLflow parent run {result.parent_run_id}"
        )
        for name, path in result.files.items():
            console.story(f"  {name:24s} {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
