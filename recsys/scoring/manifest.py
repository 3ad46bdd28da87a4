"""The manifest of a scoring output (``OUT/manifest.json``): what was scored, with what, and the counts.

The driver is the only writer, and rewrites it atomically after each part file is renamed into place: a
run killed at any moment leaves complete part files and a manifest that lists a subset of them. A rerun
skips the partitions the manifest lists as done whose file holds the recorded rows and passes its page
checksums (:func:`recsys.scoring.partitions.check_part`), and scores the rest (a part file the manifest does
not list, or a damaged one, is scored again and replaced). A manifest written with another model version,
input fingerprint or scoring settings, or one that cannot be read, is refused unless ``overwrite``.

The output folder is ours (:func:`features.files.mark_owned`, kind ``scores``) from the moment it is first
opened: an existing folder without that marker is never written into nor cleared, with or without
``overwrite``; and only our own names are ever removed (part files, the manifest, and the temporary names
:func:`features.files.atomic_write` gives them).

The JSON layout (format 1): the fields of :class:`Manifest`, ``partitions`` keyed by the partition's index
as a string.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from features import console
from features.files import OWNER_MARKER, atomic_write, check_replaceable, mark_owned, owned_kind
from recsys.scoring.config import ScoreSettings
from recsys.scoring.partitions import Partition, check_part, parquet_rows

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
OWNER_KIND = "scores"  # the kind of our marker in a scoring output folder
PART_FILE = re.compile(r"part-\d{5,}\.parquet")
# What features.files.atomic_write leaves when killed: ".NAME.<8 random characters>.tmp", NAME one of ours.
OUR_TEMPORARY = re.compile(
    rf"\.(?:{PART_FILE.pattern}|{re.escape(MANIFEST)}|{re.escape(OWNER_MARKER)})\.[a-z0-9_]+\.tmp"
)


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
        """Its counts that disagree, with each other or with its file in ``out`` (read in full)."""
        problems = []
        if self.rows_scored != self.rows_in:
            problems.append(f"{self.file}: {self.rows_in} rows in, {self.rows_scored} scored")
        if self.rows_out != self.expected_out:
            problems.append(f"{self.file}: {self.rows_out} rows out, {self.expected_out} expected")
        damage = check_part(out / self.file, self.rows_out)
        if damage is not None:
            problems.append(damage)
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
        """Partitions listed as done whose file in ``out`` holds the recorded rows, every page intact.

        Each listed file is read in full (:func:`recsys.scoring.partitions.check_part`): a damaged part is
        named on screen and scored again, never taken as done.
        """
        done = set()
        for index, entry in sorted(self.partitions.items()):
            if entry.status != "done" or parquet_rows(out / entry.file) is None:
                continue  # never written, or its rename was lost: scored again, as planned
            damage = check_part(out / entry.file, entry.rows_out)
            if damage is None:
                done.add(index)
            else:
                console.story(f"{damage}: scoring partition {index} again")
        return done

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
        ValueError: the file is not JSON, or not a manifest of this format and shape (the message names
            the file, what is wrong with it, and ``--overwrite``).
    """
    try:
        data = json.loads(path.read_text())
    except ValueError as e:  # JSONDecodeError, and UnicodeDecodeError for bytes that are not text
        raise _unreadable(path, f"not JSON ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise _unreadable(path, f"a JSON {type(data).__name__}, expected an object")
    if data.get("format") != MANIFEST_FORMAT:
        raise _other_run(path, [f"format: {data.get('format')!r}, expected {MANIFEST_FORMAT}"])
    try:
        partitions = {int(k): _partition_record(int(k), v) for k, v in data["partitions"].items()}
        manifest = Manifest(
            **{k: v for k, v in data.items() if k not in ("model", "settings", "partitions")},
            model=_typed(ModelRecord, data["model"]),
            settings=_typed(ScoreSettings, data["settings"]),
            partitions=partitions,
        )
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise _unreadable(path, f"{type(e).__name__}: {e}") from None
    return manifest


_JSON_TYPES = {"str": (str,), "int": (int,), "float": (int, float), "None": (type(None),)}


def _typed(cls: type, data: Any) -> Any:
    """``cls(**data)`` for a dataclass of plain fields, each value of its annotated JSON type.

    Raises:
        TypeError: ``data`` is not an object of ``cls``'s fields, or a field has another type (named).
    """
    if not isinstance(data, dict):
        raise TypeError(f"{cls.__name__}: expected an object, got {data!r}")
    for f in fields(cls):
        allowed = tuple(t for name in str(f.type).split(" | ") for t in _JSON_TYPES.get(name, (object,)))
        value = data.get(f.name)
        if f.name in data and (isinstance(value, bool) or not isinstance(value, allowed)):
            raise TypeError(f"{cls.__name__}.{f.name}: expected {f.type}, got {value!r}")
    return cls(**data)


def _partition_record(index: int, data: Any) -> PartitionRecord:
    if not isinstance(data, dict):
        raise TypeError(f"partition {index}: expected an object, got {data!r}")
    moved = _typed(MovedRequests, data.get("moved_requests"))
    entry = _typed(PartitionRecord, {**data, "moved_requests": moved})
    expected = f"part-{index:05d}.parquet"
    if entry.file != expected:  # a manifest of ours never names another file
        raise ValueError(f"partition {index}: file {entry.file!r}, expected {expected!r}")
    return entry


def _other_run(path: Path, problems: list[str]) -> ValueError:
    return ValueError(
        f"{path}: belongs to another scoring run; "
        + "; ".join(problems)
        + ". Pass --overwrite to rescore everything, or rerun with the recorded model and input."
    )


def _unreadable(path: Path, why: str) -> ValueError:
    return ValueError(
        f"{path}: not a scoring manifest: {why}. Pass --overwrite to rescore everything (the folder is a "
        "scoring output of ours: only its part files and manifest are replaced)."
    )


def clear_output(out: Path) -> None:
    """Removes our part files, temporary files and manifest from ``out`` (a folder of ours)."""
    for path in out.iterdir():
        if PART_FILE.fullmatch(path.name) or path.name == MANIFEST:
            path.unlink(missing_ok=True)
    remove_temporary(out)


def remove_temporary(out: Path) -> None:
    """Removes the temporary files a killed run of ours left in ``out``: our names only, never a user's."""
    for path in out.iterdir():
        if OUR_TEMPORARY.fullmatch(path.name):
            path.unlink(missing_ok=True)


def check_output(out: Path) -> None:
    """Raises unless ``out`` may take this run's files: missing, empty, or a scoring output of ours.

    Checked before any work, and again when the output is opened. The rule is the same with or without
    ``overwrite``: a folder that ``overwrite`` may not clear, a rerun may not write its parts among.

    Raises:
        FileExistsError: ``out`` is a file, or a non-empty folder without our ``scores`` marker.
    """
    check_replaceable(out, OWNER_KIND, overwrite=True)


def open_output(out: Path, fresh: Manifest, overwrite: bool) -> Manifest:
    """Prepares ``out`` for the run ``fresh`` describes; returns its manifest (written), done partitions kept.

    Raises:
        FileExistsError: ``out`` is not ours (:func:`check_output`).
        ValueError: ``out`` holds another run's output, an unreadable manifest, or part files without a
            manifest, and not ``overwrite``.
    """
    check_output(out)
    out.mkdir(parents=True, exist_ok=True)
    if owned_kind(out) != OWNER_KIND:  # new or empty: ours from now on, before any file of ours is in it
        mark_owned(out, OWNER_KIND)
    path = out / MANIFEST
    if overwrite:
        clear_output(out)
    elif path.exists():
        previous = load_manifest(path)
        previous.refuse_other_run(fresh, path)
        fresh.partitions = previous.partitions
    elif any(PART_FILE.fullmatch(p.name) for p in out.iterdir()):
        raise ValueError(
            f"output: {out} holds part files but no {MANIFEST}; pass --overwrite to replace them"
        )
    remove_temporary(out)
    done = fresh.finished(out)
    fresh.partitions = {k: v for k, v in fresh.partitions.items() if k in done}
    fresh.write(path)
    return fresh
