"""Imports flow one way (STYLE.md): recipes -> llm_cxr, and inside the library
cli -> demo, webapp -> explain -> evaluation, train -> lm, classifier -> vqgan -> data -> errors, configs.
Inference (``llm_cxr.lm``) never imports training (``llm_cxr.train``)."""

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LIB = REPO / "llm_cxr"
# Lower rank may not import higher rank; the same rank may not import each other either, except within a package.
RANK = {"errors": 0, "configs": 0, "files": 0, "accel": 0, "pipeline": 0, "rng": 0,
        "data": 1, "report_html": 2, "vqgan": 3,
        "classifier": 4, "lm": 4,
        "train": 5, "evaluation": 5, "explain": 6,
        "demo_page": 7, "webapp": 7, "demo": 8,
        "cli": 9, "__main__": 10}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            if node.module == "llm_cxr":  # `from llm_cxr import lm` names the package imported
                names |= {f"llm_cxr.{a.name}" for a in node.names}
    return names


def _package(path: Path) -> str:
    return path.relative_to(LIB).parts[0].removesuffix(".py")


def test_every_library_package_has_a_rank():
    unranked = {_package(p) for p in LIB.rglob("*.py")} - set(RANK) - {"__init__"}
    assert not unranked, f"give these a rank in RANK: {sorted(unranked)}"


def test_library_never_imports_recipes():
    for path in LIB.rglob("*.py"):
        for name in _imports(path):
            top = name.split(".")[0]
            assert top not in {"training", "inference", "benchmarks", "tests"}, f"{path} imports {name}"


def _upward_imports(root: Path) -> list[str]:
    """Imports in the package tree ``root`` (laid out as llm_cxr) of a package of the same or a higher rank."""
    upward = []
    for path in root.rglob("*.py"):
        own = path.relative_to(root).parts[0].removesuffix(".py")
        if own == "__init__":
            continue
        for name in _imports(path):
            parts = name.split(".")
            if parts[0] != "llm_cxr" or len(parts) < 2 or parts[1] in ("__version__", own):
                continue
            other = parts[1]
            if RANK.get(other, 99) >= RANK.get(own, -1) and other not in ("errors", "configs"):
                upward.append(f"{path.relative_to(root)} imports {name}")
    return upward


def test_library_packages_import_downwards_only():
    upward = _upward_imports(LIB)
    assert not upward, "\n".join(upward)


def test_the_rule_catches_inference_importing_training(tmp_path):
    """The check itself: a module of llm_cxr.lm importing llm_cxr.train, or llm_cxr.data importing llm_cxr.lm, is
    reported; a downward import is not."""
    (tmp_path / "lm").mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "lm" / "bad.py").write_text("from llm_cxr.train.stage import train_lm\n")
    (tmp_path / "lm" / "good.py").write_text("from llm_cxr.data.schema import Finding\nimport llm_cxr.errors\n")
    (tmp_path / "data" / "bad.py").write_text("from llm_cxr import lm\n")
    assert sorted(_upward_imports(tmp_path)) == ["data/bad.py imports llm_cxr.lm",
                                                 "lm/bad.py imports llm_cxr.train.stage"]


def test_inference_entry_point_loads_no_training_module():
    code = ("import sys, llm_cxr.lm.generation, llm_cxr.lm.model, llm_cxr.lm.run; "
            "print(sorted(m for m in sys.modules if m.startswith('llm_cxr.train')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]", out.stdout


def test_library_has_no_print_calls():
    for path in LIB.rglob("*.py"):
        if _package(path) == "cli":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print":
                raise AssertionError(f"{path}:{node.lineno} prints; library code logs instead")


def test_library_files_and_functions_stay_small():
    """STYLE: modules under ~500 lines; functions under ~80 lines unless their docstring says why."""
    long_files, long_functions = [], []
    for path in LIB.rglob("*.py"):
        text = path.read_text()
        if len(text.splitlines()) > 520:
            long_files.append(f"{path.relative_to(REPO)}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                doc = ast.get_docstring(node) or ""
                if n > 80 and "long because" not in doc.lower():
                    long_functions.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}: {n} lines")
    assert not long_files, long_files
    assert not long_functions, long_functions


def test_the_config_reference_is_generated_from_the_code():
    """docs/configuration.md is what scripts/config_reference.py writes now, and every config key has help."""
    from llm_cxr.configs import config_fields
    from llm_cxr.train.config import _sections

    out = subprocess.run([sys.executable, str(REPO / "scripts" / "config_reference.py"), "--check"],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    missing = [f"{p}{name}" for p, cls in _sections() for name, _, _, h in config_fields(cls) if not h.strip()]
    assert not missing, f"config keys without help: {missing}"
