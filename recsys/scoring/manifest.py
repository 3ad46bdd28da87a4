"""The manifest of a scoring output (``OUT/manifest.json``): what was scored, with what, and the counts.

The driver is the only writer, and rewrites it atomically after each part file is renamed into place: a
run killed at any moment leaves complete part files and a manifest that lists a subset of them. A rerun
skips the partitions the manifest lists as done whose file holds the recorded rows, and scores the rest (a
part file the manifest does not list is scored again and replaced). A manifest written with another model
version, input fingerprint or scoring settings is refused unless ``overwrite``.

The JSON layout (format 1): the fields of :class:`Manifest`, ``partitions`` keyed by the partition's index
as a string.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from features.files import atomic_write
from recsys.scoring.config import ScoreSettings
from recsys.scoring.partitions import Partition, parquet_rows

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1


@dataclass(frozen=True)
class ModelRecord:
    """The model of a run, pinned.

    Attributes:
        uri: the model URI as given.
        pinned_uri: what it resolved to (``models:/NAME/VERSION``, ``runs:/...`` or ``file:...``).
        name: the registered model's name (``package`` for an unregistered local package).
        version: the registered version (None outside the registry).
        run_id: the run that logged the model, where known.
        spec_hash: the content hash of the model's feature spec.
    """

    uri: str
    pinned_uri: str
    name: str
    version: str | None
    run_id: str | None
    spec_hash: str

    @property
    def column_value(self) -> str:
        """The ``model_version`` column: the registry version, else the pinned URI."""
        return self.version if self.version is not None else self.pinned_uri


@dataclass(frozen=True)
class MovedRequests:
    """Requests a partition left to earlier ones (``dropped``), and took from other ranges (``pulled``)."""

    dropped: int
    pulled: int


@dataclass(frozen=True)
class PartitionRecord:
    """One written partition.

    Attributes:
        file: its part file, in the output folder.
        input_file: the input file of its range.
        start: first row of its range.
        stop: one past the last row of its range.
        rows_in: candidate rows it scores.
        rows_scored: rows that came back from the model.
        rows_out: rows in its file.
        expected_out: rows its file must hold (``rows_in``, or the top K of each request).
        moved_requests: see :class:`MovedRequests`.
        model_version: the ``model_version`` column of its rows.
        status: ``done``.
        write_seconds: time to rank and write it.
    """

    file: str
    input_file: str
    start: int
    stop: int
    rows_in: int
    rows_scored: int
    rows_out: int
    expected_out: int
    moved_requests: MovedRequests
    model_version: str
    status: str
    write_seconds: float

    def problems(self, out: Path) -> list[str]:
        """Its counts that disagree, with each other or with its file in ``out``."""
        problems = []
        if self.rows_scored != self.rows_in:
            problems.append(f"{self.file}: {self.rows_in} rows in, {self.rows_scored} scored")
        if self.rows_out != self.expected_out:
            problems.append(f"{self.file}: {self.rows_out} rows out, {self.expected_out} expected")
        on_disk = parquet_rows(out / self.file)
        if on_disk != self.rows_out:
            problems.append(f"{self.file}: {on_disk} rows on disk, {self.rows_out} in the manifest")
        return problems


@dataclass
class Manifest:
    """The state of a scoring output (see the module docstring).

    Attributes:
        model: the pinned model.
        model_version: the ``model_version`` column of the output.
        input_fingerprint: of the input, users, items and history files.
        inputs: the files of each table.
        history_source: where the history features come from, in words.
        settings: the settings that decide the output.
        rows_in: candidate rows of the input.
        partitions: the written partitions, by index.
        complete: every partition is written and every count agrees.
        rows_out: rows in the part files (set by :meth:`finish`).
        expected_out: rows the part files must hold (set by :meth:`finish`).
        problems: the counts that disagree (set by :meth:`finish`).
        format: the layout's version.
    """

    model: ModelRecord
    model_version: str
    input_fingerprint: str
    inputs: dict[str, list[str]]
    history_source: str
    settings: ScoreSettings
    rows_in: int
    partitions: dict[int, PartitionRecord] = field(default_factory=dict)
    complete: bool = False
    rows_out: int = 0
    expected_out: int = 0
    problems: list[str] = field(default_factory=list)
    format: int = MANIFEST_FORMAT

    def to_dict(self) -> dict[str, Any]:
        """The JSON layout (partition indices as strings)."""
        data = asdict(self)
        data["partitions"] = {str(k): v for k, v in data["partitions"].items()}
        return data

    def write(self, path: Path) -> None:
        """Rewrites the manifest at ``path`` atomically."""
        atomic_write(path, json.dumps(self.to_dict(), indent=1, sort_keys=True))

    def record(self, index: int, entry: PartitionRecord, path: Path) -> None:
        """Records partition ``index`` as written and rewrites the manifest."""
        self.partitions[index] = entry
        self.write(path)

    def part_files(self, out: Path) -> list[Path]:
        """The written part files, in partition order."""
        return [out / self.partitions[k].file for k in sorted(self.partitions)]

    def refuse_other_run(self, fresh: Manifest, path: Path) -> None:
        """Raises ValueError unless this manifest (read back) is of the run ``fresh`` describes."""
        problems = []
        if self.model.pinned_uri != fresh.model.pinned_uri:
            problems.append(
                f"model: the output was scored with {self.model.pinned_uri!r}, "
                f"this run resolves {fresh.model.uri!r} to {fresh.model.pinned_uri!r}"
            )
        if self.input_fingerprint != fresh.input_fingerprint:
            problems.append(
                f"input fingerprint: {self.input_fingerprint!r} in the manifest, "
                f"{fresh.input_fingerprint!r} now (the input, users, items or history changed)"
            )
        if self.settings != fresh.settings:
            problems.append(f"settings: {self.settings} in the manifest, {fresh.settings} now")
        if problems:
            raise _other_run(path, problems)

    def finished(self, out: Path) -> set[int]:
        """Partitions listed as done whose file in ``out`` holds the recorded rows."""
        return {
            index
            for index, entry in self.partitions.items()
            if entry.status == "done" and parquet_rows(out / entry.file) == entry.rows_out
        }

    def finish(self, partitions: list[Partition], out: Path) -> None:
        """Checks every count against the plan and the files in ``out``; sets the totals and ``complete``."""
        problems: list[str] = []
        planned = sum(p.rows_in for p in partitions)
        if planned != self.rows_in:
            problems.append(f"plan: partitions hold {planned} rows, the input {self.rows_in}")
        entries = [self.partitions[k] for k in sorted(self.partitions)]
        for entry in entries:
            problems.extend(entry.problems(out))
        every = all(p.index in self.partitions for p in partitions)
        scored = sum(e.rows_in for e in entries)
        if every and scored != self.rows_in:
            problems.append(f"rows: {scored} scored in all, the input has {self.rows_in}")
        self.rows_out = sum(e.rows_out for e in entries)
        self.expected_out = sum(e.expected_out for e in entries)
        self.problems = problems
        self.complete = every and not problems


def load_manifest(path: Path) -> Manifest:
    """Reads a manifest back.

    Raises:
        ValueError: the file is not a manifest of this format (the message names it, and ``--overwrite``).
    """
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        found = data.get("format") if isinstance(data, dict) else None
        raise _other_run(path, [f"format: {found!r}, expected {MANIFEST_FORMAT}"])
    try:
        return Manifest(
            **{k: v for k, v in data.items() if k not in ("model", "settings", "partitions")},
            model=ModelRecord(**data["model"]),
            settings=ScoreSettings(**data["settings"]),
            partitions={int(k): _partition_record(v) for k, v in data["partitions"].items()},
        )
    except (KeyError, TypeError, ValueError) as e:
        raise _other_run(path, [f"unreadable ({type(e).__name__}: {e})"]) from None


def _partition_record(data: dict[str, Any]) -> PartitionRecord:
    return PartitionRecord(**{**data, "moved_requests": MovedRequests(**data["moved_requests"])})


def _other_run(path: Path, problems: list[str]) -> ValueError:
    return ValueError(
        f"{path}: belongs to another scoring run; "
        + "; ".join(problems)
        + ". Pass --overwrite to rescore everything, or rerun with the recorded model and input."
    )


def clear_output(out: Path) -> None:
    """Removes the part files, temporary files and manifest of ``out``."""
    for path in [*out.glob("part-*.parquet"), out / MANIFEST]:
        path.unlink(missing_ok=True)
    remove_temporary(out)


def remove_temporary(out: Path) -> None:
    """Removes the temporary files a killed run left in ``out``."""
    for path in [*out.glob("*.tmp"), *out.glob(".*.tmp")]:
        path.unlink(missing_ok=True)


def open_output(out: Path, fresh: Manifest, overwrite: bool) -> Manifest:
    """Prepares ``out`` for the run ``fresh`` describes; returns its manifest (written), done partitions kept.

    Raises:
        ValueError: ``out`` holds another run's output (or part files without a manifest), and not
            ``overwrite``.
    """
    out.mkdir(parents=True, exist_ok=True)
    path = out / MANIFEST
    if overwrite:
        clear_output(out)
    elif path.exists():
        previous = load_manifest(path)
        previous.refuse_other_run(fresh, path)
        fresh.partitions = previous.partitions
    elif any(out.glob("part-*.parquet")):
        raise ValueError(
            f"output: {out} holds part files but no {MANIFEST}; pass --overwrite to replace them"
        )
    remove_temporary(out)
    done = fresh.finished(out)
    fresh.partitions = {k: v for k, v in fresh.partitions.items() if k in done}
    fresh.write(path)
    return fresh
