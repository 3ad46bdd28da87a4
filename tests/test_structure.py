"""The shape of the tree: the layers' imports, the size of files and functions, and the docs' links.

Layering, from the bottom up: ``features`` and ``synth`` (polars, numpy, pyarrow) -> the model and data code
of ``recsys`` (torch, torchrec) -> training, scoring, tracking and experiments (ray, mlflow) -> ``pipelines``
(command lines). These tests read the source with :mod:`ast`; nothing is imported.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("features", "synth", "recsys", "pipelines")
MAX_FILE_LINES = 500
MAX_FUNCTION_LINES = 60
RECIPE_FOLDERS = ("recsys/train", "recsys/scoring", "recsys/experiments")
# torch and torchrec only: the pure modules, the model, its losses, data, metrics, config and package.
MODEL_CORE = (
    "recsys/modules",
    "recsys/model.py",
    "recsys/losses.py",
    "recsys/data",
    "recsys/metrics.py",
    "recsys/config.py",
    "recsys/package.py",
)


def _sources(*folders: str) -> Iterator[Path]:
    for folder in folders:
        yield from sorted((REPO / folder).rglob("*.py"))


def _rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def _under(rel: str, prefixes: tuple[str, ...]) -> bool:
    return any(rel == p or rel.startswith(p.rstrip("/") + "/") for p in prefixes)


def _imported_packages(path: Path) -> set[str]:
    """Top-level names of every absolute import in ``path``, those inside functions included."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def _forbidden(rel: str) -> set[str]:
    """The top-level packages the file at ``rel`` may not import."""
    package = rel.split("/")[0]
    banned = set()
    if package in ("features", "synth"):
        banned |= {"torch", "torchrec", "fbgemm_gpu", "ray", "mlflow", "recsys", "pipelines"}
    if package == "features":
        banned.add("synth")
    if _under(rel, MODEL_CORE):
        banned |= {"ray", "mlflow"}
    if not _under(rel, ("recsys/tracking",)):
        banned.add("mlflow")
    if package != "pipelines":
        banned.add("pipelines")
    return banned


def test_each_layer_imports_only_the_layers_below_it():
    offenders = []
    for path in _sources(*PACKAGES):
        rel = _rel(path)
        for name in sorted(_imported_packages(path) & _forbidden(rel)):
            offenders.append(f"{rel} imports {name}")
    assert not offenders, "imports across the layers:\n" + "\n".join(offenders)


def test_the_layering_check_sees_imports_inside_functions(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import os\n\ndef f():\n    import mlflow.tracking\n    from ray import train\n")
    assert _imported_packages(probe) == {"os", "mlflow", "ray"}
    assert {"torch", "mlflow", "synth"} <= _forbidden("features/derive.py")
    assert "mlflow" not in _forbidden("recsys/tracking/client.py")
    assert "ray" in _forbidden("recsys/modules/gates.py")
    assert "ray" not in _forbidden("recsys/train/worker.py")
    assert "pipelines" in _forbidden("recsys/train/worker.py")
    assert "pipelines" not in _forbidden("pipelines/cli.py")


def _long_functions(path: Path, limit: int) -> Iterator[tuple[str, int]]:
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            length = node.end_lineno - node.lineno + 1
            if length > limit:
                yield node.name, length


def test_files_and_recipe_functions_stay_small():
    offenders = []
    for path in _sources("features", "synth", "recsys"):
        lines = len(path.read_text().splitlines())
        if lines > MAX_FILE_LINES:
            offenders.append(f"{_rel(path)}: {lines} lines (at most {MAX_FILE_LINES})")
    for path in _sources(*RECIPE_FOLDERS):
        for name, length in _long_functions(path, MAX_FUNCTION_LINES):
            offenders.append(f"{_rel(path)}:{name}:{length} lines (at most {MAX_FUNCTION_LINES})")
    assert not offenders, "too long:\n" + "\n".join(offenders)


LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
FENCE = re.compile(r"^\s*(```|~~~)")


def _prose(text: str) -> Iterator[str]:
    """The lines of a markdown text outside fenced code blocks, inline code blanked."""
    fenced = False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield re.sub(r"`[^`]*`", "``", line)


def _links(text: str) -> Iterator[str]:
    for line in _prose(text):
        yield from LINK.findall(line)
        reference = REFERENCE.match(line)
        if reference:
            yield reference.group(1)


def _anchors(text: str) -> set[str]:
    """The anchors GitHub gives the headings of a markdown text (duplicates get -1, -2, ...)."""
    anchors: set[str] = set()
    for line in _prose(text):
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not heading:
            continue
        title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.group(1))  # a link's text only
        slug = re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
        candidate, n = slug, 0
        while candidate in anchors:
            n += 1
            candidate = f"{slug}-{n}"
        anchors.add(candidate)
    return anchors


def _broken_links(doc: Path, root: Path = REPO) -> Iterator[str]:
    """Relative links of ``doc`` to a missing file, or to a missing heading of a markdown file."""
    name = doc.relative_to(root).as_posix()
    text = doc.read_text()
    for target in _links(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        linked = (doc.parent / file_part).resolve() if file_part else doc
        if not linked.exists():
            yield f"{name}: {target} (no such file)"
        elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked.read_text()):
            yield f"{name}: {target} (no heading #{anchor} in {linked.name})"


def test_relative_links_in_the_readme_and_docs_resolve():
    readme = REPO / "README.md"
    assert readme.stat().st_size <= 12_288, f"README.md: {readme.stat().st_size} bytes, at most 12 KB"
    docs = [readme, *sorted((REPO / "docs").glob("*.md"))]
    assert len(docs) > 1, "docs/ holds no markdown"
    broken = [problem for doc in docs for problem in _broken_links(doc)]
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_the_link_check_finds_a_missing_file_and_a_missing_heading(tmp_path):
    (tmp_path / "other.md").write_text("# Data path\n\n## Data path\n")
    doc = tmp_path / "doc.md"
    doc.write_text(
        "[ok](other.md#data-path) [dup](other.md#data-path-1) [web](https://example.com)\n"
        "[gone](missing.md) [no heading](other.md#layout)\n```\n[in code](nowhere.md)\n```\n"
    )
    assert list(_broken_links(doc, tmp_path)) == [
        "doc.md: missing.md (no such file)",
        "doc.md: other.md#layout (no heading #layout in other.md)",
    ]


def test_the_readme_model_example_runs(capsys):
    (code,) = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    exec(compile(code, "README.md", "exec"), {})
    assert "'click': (2,), 'purchase': (2,), 'purchase_given_click': (2,)" in capsys.readouterr().out
