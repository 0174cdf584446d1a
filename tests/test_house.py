"""The house rules: rooms stay small, and the README's table names every room a newcomer looks for."""

import ast
import re

import pytest

from conftest import ROOT

ROOMS = ("gpt", "launch", "export", "serve")
SOURCES = sorted(p for room in ROOMS for p in (ROOT / room).glob("*.py"))
MAX_FUNCTION_LINES, MAX_FILE_LINES = 60, 400


@pytest.mark.parametrize("path", SOURCES, ids=[str(p.relative_to(ROOT)) for p in SOURCES])
def test_no_function_over_60_lines(path):
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines, line {node.lineno})"
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"{path.relative_to(ROOT)}: split {', '.join(long)} into named steps"


def test_no_file_over_400_lines_unless_its_opening_comment_says_why():
    long = [f"{p.relative_to(ROOT)} ({n} lines)" for p in SOURCES
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_FILE_LINES
            and "one job" not in (ast.get_docstring(ast.parse(p.read_text(encoding="utf-8"))) or "")]
    assert not long, f"give each job its own module: {', '.join(long)}"


def test_the_readme_table_names_every_module_of_every_room():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    named: dict[str, set[str]] = {}
    room = None
    for line in readme.splitlines():
        cells = [c.strip() for c in line.split("|")[1:-1]]
        if len(cells) != 3:
            continue
        if cells[0]:
            room = cells[0].strip("`/")
        named.setdefault(room, set()).update(re.findall(r"`([a-z_]+\.py)`", cells[1]))
    for room in ROOMS:
        modules = {p.name for p in (ROOT / room).glob("*.py")} - {"__init__.py"}
        assert modules <= named.get(room, set()), f"README's table lacks {room}/{sorted(modules - named[room])}"


@pytest.mark.parametrize("question, file, word, marker", [
    ("where is the int4 quantizer", "export/variants.py", "int4", "def quantize_nbits("),
    ("where does a checkpoint get its latest pointer", "gpt/checkpoint.py", "latest", '/ "latest"'),
    ("where does a sequence join the batch", "serve/batch.py", "joins", "def add(self, sequences"),
])
def test_the_readme_table_answers_where_things_are(question, file, word, marker):
    room, name = file.split("/")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    rows = [line for line in readme.splitlines() if line.startswith("|") and f"`{name}`" in line]
    assert rows and word in rows[0], f"{question}? the README's row for {name} should say"
    assert marker in (ROOT / file).read_text(encoding="utf-8"), f"{question}? not in {file} any more"


def test_the_serving_rooms_imports_run_one_way():
    """cache, manifest <- runtime <- scoring <- batch <- generate: no module of serve/ imports, even for
    its type hints, one that imports it back (directly or around a longer circle)."""
    graph = {}
    for path in sorted((ROOT / "serve").glob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("serve."):
                names.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                names |= {a.name.split(".")[1] for a in node.names if a.name.startswith("serve.")}
        graph[path.stem] = names - {path.stem}

    def reaches(start: str, goal: str, seen: set) -> bool:
        return any(n == goal or (n not in seen and reaches(n, goal, seen | {n})) for n in graph.get(start, ()))

    circles = sorted(m for m in graph if reaches(m, m, {m}))
    assert not circles, f"serve/ modules in an import circle: {circles}"
    assert "batch" not in graph["runtime"] and "runtime" not in graph["cache"]
