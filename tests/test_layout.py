"""The layout of the tests, pinned: shared helpers live in tests/support/ (no test module imports
another, nor conftest), the benchmarks import nothing from tests/ (but the cluster benchmark
its server starters), and every test names its layer (tests/conftest.py refuses one that does
not)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.support.paths import ROOT

pytestmark = pytest.mark.unit

TESTS = ROOT / "tests"


def imported_modules(path: Path, root: Path = ROOT) -> set[str]:
    """Every module the file ``path`` imports, by absolute name (relative imports resolved
    from its place under ``root``); ``from package import name`` counts package.name too."""
    package = path.relative_to(root).parent.parts
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            parts = list(package[: len(package) - node.level + 1]) if node.level else []
            base = ".".join([*parts, node.module] if node.module else parts)
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return found


def python_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.py") if "node_modules" not in p.parts)


def importers_of(files: list[Path], forbidden: set[str], root: Path = ROOT) -> dict[str, list[str]]:
    """File -> the forbidden modules it imports (files that import none are left out)."""
    found = {
        p.relative_to(root).as_posix(): sorted(imported_modules(p, root) & forbidden) for p in files
    }
    return {path: modules for path, modules in found.items() if modules}


def forbidden_modules(tests: Path) -> set[str]:
    """The modules no file may import: each test module, and conftest (pytest loads it)."""
    return {f"tests.{p.stem}" for p in tests.glob("test_*.py")} | {"tests.conftest"}


def test_no_test_module_imports_another_or_conftest() -> None:
    offenders = importers_of(python_files(TESTS), forbidden_modules(TESTS))
    assert not offenders, f"shared helpers belong in tests/support/: {offenders}"


# The one exception: benchmarks/cluster.py starts PostgreSQL, RabbitMQ, SeaweedFS and cluster
# worker hosts as the cluster tests do, with their starters (which share their modules with
# the tests' fixtures; its docstring says why they were not moved), and the example plugin,
# the simulated GPU model, is a test plugin anyway. Nothing else of tests/.
CLUSTER_BENCHMARK_SUPPORT = {
    f"tests.support.{name}" for name in ("postgres", "rabbitmq", "seaweedfs", "cluster", "node")
}


def test_benchmarks_import_nothing_from_tests() -> None:
    offenders = {}
    for path in python_files(ROOT / "benchmarks"):
        allowed = CLUSTER_BENCHMARK_SUPPORT if path.name == "cluster.py" else set()
        from_tests = {
            m
            for m in imported_modules(path)
            if (m == "tests" or m.startswith("tests."))
            and not any(m == a or m.startswith(f"{a}.") for a in allowed)
        }
        if from_tests:
            offenders[path.name] = sorted(from_tests)
    assert not offenders, f"benchmarks must not import the test suite: {offenders}"


def test_the_import_check_sees_every_form_of_import(tmp_path: Path) -> None:
    tests = tmp_path / "tests"
    (tests / "support").mkdir(parents=True)
    for name in ("a", "b", "c", "d", "e", "f"):
        (tests / f"test_{name}.py").write_text("")
    (tests / "test_probe.py").write_text(
        "import tests.test_a\nfrom tests.test_b import x\nfrom tests import test_c\n"
        "from . import test_d\nfrom .test_e import y\nfrom tests.support.paths import ROOT\n"
    )
    (tests / "support" / "helper.py").write_text("from ..test_f import z\n")
    offenders = importers_of(python_files(tests), forbidden_modules(tests), tmp_path)
    assert offenders == {
        "tests/test_probe.py": [f"tests.test_{n}" for n in "abcde"],
        "tests/support/helper.py": ["tests.test_f"],
    }


CONFTEST = (TESTS / "conftest.py").read_text()


@pytest.mark.parametrize(
    ("source", "complaint"),
    [
        ("def test_x():\n    pass\n", "test_x: layers none"),
        (
            "import pytest\n\n@pytest.mark.unit\n@pytest.mark.integration\n"
            "def test_x():\n    pass\n",
            "test_x: layers ['integration', 'unit']",
        ),
        (
            "import pytest\n\n@pytest.mark.unit\ndef test_x(make_node):\n    pass\n",
            "test_x: marked unit but starts a node",
        ),
    ],
    ids=["unmarked", "two layers", "unit with a node"],
)
def test_conftest_refuses_a_test_without_exactly_one_layer(
    pytester: pytest.Pytester, source: str, complaint: str
) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_probe=source)
    pytester.makeini("[pytest]\nmarkers =\n    unit\n    integration\n    browser\n    slow\n")
    pytester.syspathinsert(ROOT)
    result = pytester.runpytest_inprocess("--collect-only", "-q")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert complaint in result.stderr.str()


def test_conftest_accepts_a_test_with_one_layer(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(
        test_probe="import pytest\n\npytestmark = pytest.mark.unit\n\ndef test_x():\n    pass\n"
    )
    pytester.syspathinsert(ROOT)
    assert pytester.runpytest_inprocess("-q").ret == pytest.ExitCode.OK
