"""The architecture as the folder shows it (issue 39): no function in ``zoo/`` or ``inference/``
over 60 lines (its docstring not counted), and ``zoo/models/`` holding models and their shared
helpers only."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 60


def _lines(node) -> int:
    body, count = node.body, node.end_lineno - node.lineno + 1
    first = body[0] if body else None
    if isinstance(first, ast.Expr) and isinstance(getattr(first, "value", None), ast.Constant):
        if isinstance(first.value.value, str):
            count -= first.end_lineno - first.lineno + 1
    return count


def test_no_function_is_over_sixty_lines():
    long = []
    for package in ("zoo", "inference"):
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    if _lines(node) > LIMIT:
                        long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
    assert not long, f"functions over {LIMIT} lines: {long}"


def test_the_models_folder_holds_models_and_their_helpers_only():
    from zoo import registry

    registered = {spec.cls.__module__ for spec in map(registry.get, registry.names())}
    for path in (ROOT / "zoo" / "models").glob("*.py"):
        name = path.stem
        if name.startswith("_") or name == "nets":
            continue  # __init__, the mixtures' shared base, the shared networks
        assert f"zoo.models.{name}" in registered, f"{path} registers no model"
