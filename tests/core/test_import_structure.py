"""Who may import whom, read from the source (every module, imported or not).

* samples and benchmarks never import each other (both use doconv_core.testing.machine);
* doconv_core imports no framework (the runtime check is test_no_dependencies.py);
* doconv_core's runtime modules import nothing from doconv_core.testing.
"""

import ast
import pathlib

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
FRAMEWORKS = {"torch", "tensorflow", "keras", "mxnet", "jax", "jaxlib", "gluoncv"}


def imported_modules(path: pathlib.Path) -> set[str]:
    """Absolute names of everything ``path`` imports (relative imports resolved)."""
    package = ".".join(path.relative_to(REPO_ROOT).with_suffix("").parts)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[:len(parts) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def modules_under(folder: str) -> list[pathlib.Path]:
    paths = sorted((REPO_ROOT / folder).rglob("*.py"))
    assert paths, f"no modules under {folder}"
    return paths


def top(name: str) -> str:
    return name.split(".")[0]


def test_the_reader_resolves_relative_imports(tmp_path):
    imports = imported_modules(REPO_ROOT / "doconv_core" / "testing" / "crosscheck.py")
    assert "doconv_core.spec" in imports and "doconv_core.testing.cases" in imports


@pytest.mark.parametrize("folder, other", [("samples", "benchmarks"), ("benchmarks", "samples")])
def test_samples_and_benchmarks_do_not_import_each_other(folder, other):
    offenders = {str(p.relative_to(REPO_ROOT)): sorted(n for n in imported_modules(p)
                                                        if top(n) == other)
                 for p in modules_under(folder)}
    assert {path: names for path, names in offenders.items() if names} == {}


def test_core_imports_no_framework():
    offenders = {str(p.relative_to(REPO_ROOT)): sorted(n for n in imported_modules(p)
                                                        if top(n) in FRAMEWORKS)
                 for p in modules_under("doconv_core")}
    assert {path: names for path, names in offenders.items() if names} == {}


def test_core_runtime_does_not_import_its_testing_package():
    runtime = [p for p in modules_under("doconv_core") if "testing" not in p.parts]
    offenders = {str(p.relative_to(REPO_ROOT)): sorted(
        n for n in imported_modules(p) if n.startswith("doconv_core.testing"))
        for p in runtime}
    assert {path: names for path, names in offenders.items() if names} == {}
