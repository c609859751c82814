"""Imports flow one way (STYLE.md): recipes -> llm_cxr, and inside the library
explain/evaluation -> generation -> modeling -> tokens -> vqgan, data."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LIB = REPO / "llm_cxr"
# Lower rank may not import higher rank.
RANK = {"errors": 0, "configs": 0, "accel": 0, "pipeline": 0, "data": 1, "vqgan": 1, "classifier": 2, "tokens": 2, "prompts": 2, "textlm": 2, "instruct": 3, "diagnosis": 3, "modeling": 3, "lm_train": 3, "cli_lm": 6, "cli_gen": 6, "cli_serve": 6, "generation": 4,
        "evaluation": 5, "explain": 5, "webapp": 5}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_library_never_imports_recipes():
    for path in LIB.rglob("*.py"):
        for name in _imports(path):
            top = name.split(".")[0]
            assert top not in {"training", "inference", "benchmarks", "tests"}, f"{path} imports {name}"


def test_library_layers_import_downwards_only():
    for path in LIB.rglob("*.py"):
        rel = path.relative_to(LIB).parts
        own = rel[0].removesuffix(".py")
        if own not in RANK:
            continue
        for name in _imports(path):
            parts = name.split(".")
            if parts[0] != "llm_cxr" or len(parts) < 2 or parts[1] not in RANK or parts[1] == own:
                continue
            assert RANK[parts[1]] <= RANK[own] or parts[1] == "errors", f"{path} imports {name} (upward)"


def test_library_has_no_print_calls():
    allowed = {LIB / "cli.py", LIB / "cli_lm.py", LIB / "cli_gen.py", LIB / "cli_serve.py"}
    for path in LIB.rglob("*.py"):
        if path in allowed:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print":
                raise AssertionError(f"{path}:{node.lineno} prints; library code logs instead")
