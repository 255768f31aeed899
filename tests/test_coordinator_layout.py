"""A measure anyone can run: no function in ``coordinator/`` is longer than 80 lines.

A long function there has meant decisions tangled with I/O (issue 15: ``intake.submit`` and
``Scheduler.dispatch``); the decisions belong in the pure planners (``plan_submit.py``,
``plan_dispatch.py``, ``decide.py``) and what is left is thin. A small AST walk, so nested
functions and methods count too, each from its first decorator to its last line.
"""

from __future__ import annotations

import ast
from pathlib import Path

import gigafactory.coordinator as coordinator

MAX_FUNCTION_LINES = 80


def long_functions(folder: Path, max_lines: int) -> list[str]:
    """``path:line name (n lines)`` for every function or method under ``folder`` longer
    than ``max_lines``."""
    out = []
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                lines = node.end_lineno - first + 1
                if lines > max_lines:
                    out.append(f"{path.relative_to(folder.parent)}:{node.lineno} {node.name} ({lines} lines)")
    return out


def test_no_function_in_the_coordinator_is_longer_than_80_lines():
    folder = Path(coordinator.__file__).parent
    assert list(folder.glob("*.py")), f"no sources found in {folder}"

    too_long = long_functions(folder, MAX_FUNCTION_LINES)

    assert too_long == [], (f"functions over {MAX_FUNCTION_LINES} lines (split them where a decision meets "
                            "I/O; put the decision in a pure planner): " + "; ".join(too_long))


def test_the_measure_counts_methods_nested_functions_and_decorators(tmp_path):
    def lines(n: int, indent: str) -> str:
        return "".join(f"{indent}x{i} = {i}\n" for i in range(n))

    (tmp_path / "m.py").write_text(
        "def ok():\n" + lines(79, "    ")  # 80 lines exactly: allowed
        + "@staticmethod\ndef decorated():\n" + lines(79, "    ")  # 81 with its decorator
        + "class C:\n    def outer(self):\n        def inner():\n" + lines(80, "            ")
        + "        return inner\n")

    found = long_functions(tmp_path, MAX_FUNCTION_LINES)

    assert sorted(f.split(" ")[1] for f in found) == ["decorated", "inner", "outer"]
