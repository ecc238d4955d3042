"""The shape of ``job/``: sizes, layers and the README's map of them, checked on the source itself."""

from __future__ import annotations

import ast
import re

import pytest

from tests.helpers import REPO

JOB = REPO / "job"
MAX_CLASS_LINES, MAX_FUNCTION_LINES = 200, 60
# Each module's layer: a module imports only from its own layer or those below (no import runs upward).
LAYERS = {
    "cli": 6,
    "launch": 6,
    "pipeline": 5,
    "finetune": 4,
    "dpo": 4,
    "generate": 4,
    "judge": 4,
    "report": 4,
    "trainer": 3,
    "objectives": 3,
    "train_outputs": 3,
    "config": 2,
    "weights": 2,
    "llama_weights": 2,
    "families": 2,
    "data": 2,
    "preference": 2,
    "smoke": 2,
    "order": 2,
    "lora": 2,
    "download": 2,
    "decoding": 2,
    "runlock": 2,
    "manifest": 2,
    "stage_record": 2,
    "checkpoint": 2,
    "checkpoint_files": 2,
    "binding": 2,
    "model": 1,
    "llama": 1,
    "tokenizer": 1,
    "storage": 1,
    "errors": 0,
    "sizes": 0,
    "observability": 0,
    "parsing": 0,
    "bounded_http": 0,
    "chat_template": 0,
    "retry": 0,
    "roles": 0,
}


def _sizes(source: str) -> list[tuple[str, str, int]]:
    """(kind, name, lines) of every class and function in ``source``, nested ones included."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            kind = "class" if isinstance(node, ast.ClassDef) else "function"
            found.append((kind, node.name, node.end_lineno - node.lineno + 1))
    return found


def _too_long(source: str) -> list[str]:
    limit = {"class": MAX_CLASS_LINES, "function": MAX_FUNCTION_LINES}
    return [f"{kind} {name} ({lines} lines)" for kind, name, lines in _sizes(source) if lines > limit[kind]]


def _job_imports(source: str) -> set[str]:
    """The ``job`` modules ``source`` imports (``from job import x`` counts as module x where x is one)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module == "job":
            found |= {a.name for a in node.names if a.name in LAYERS}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("job."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("job.")}
    return found


@pytest.mark.parametrize("path", sorted(JOB.glob("*.py")), ids=lambda p: p.name)
def test_no_class_over_200_lines_and_no_function_over_60(path):
    assert _too_long(path.read_text()) == []


def test_the_size_check_sees_a_long_class_and_a_long_function():
    """The check itself: a 61-line function and a 201-line class are caught, their neighbours are not."""
    body = "".join(f"    x{i} = {i}\n" for i in range(59))
    long_function = f"def f():\n{body}    return 0\n"  # 61 lines
    assert _too_long(long_function) == ["function f (61 lines)"]
    assert _too_long(f"def f():\n{body}") == []  # 60 lines
    methods = "".join(f"    def m{i}(self):\n        return {i}\n\n" for i in range(67))  # 201 lines with the header
    assert _too_long(f"class C:\n{methods}")[0] == "class C (201 lines)"


def test_every_module_has_a_layer_and_no_import_runs_upward():
    modules = {p.stem for p in JOB.glob("*.py")} - {"__init__"}
    assert modules == set(LAYERS), "a new module needs its layer here and in the README's Layout table"
    upward = [
        f"{m} (layer {LAYERS[m]}) imports {dep} (layer {LAYERS[dep]})"
        for m in sorted(modules)
        for dep in sorted(_job_imports((JOB / f"{m}.py").read_text()))
        if LAYERS[dep] > LAYERS[m]
    ]
    assert upward == []


def test_the_readme_layout_table_is_the_layers_here():
    """Each row of the README's layer table names exactly the modules of that layer."""
    readme = (REPO / "README.md").read_text()
    rows = re.findall(r"^\| (\d) \| (.+) \|$", readme, flags=re.M)
    table = {name: int(layer) for layer, text in rows for name in re.findall(r"`(\w+)\.py`", text)}
    assert table == LAYERS
