"""The layout keeps its promises: no import cycle in the library, empty `__init__.py` files
(a flow step pays only for the modules it imports), no `metaflow/__init__.py` shadowing
Metaflow, and every test that runs a flow carries the `flows` marker."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

SRC = ROOT / "src"
PACKAGE = SRC / "batchscore"


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str | None:
    """The absolute module a `from ... import` names (relative imports included)."""
    if not node.level:
        return node.module
    parts = module.split(".")
    base = parts if is_package else parts[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _runtime_nodes(tree: ast.AST):
    """Every node, function bodies included, except under `if TYPE_CHECKING:`: an import
    only a type checker runs is no import at run time, and no cycle."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo.extend(node.orelse)  # its `else` still runs
        else:
            todo.extend(ast.iter_child_nodes(node))


def import_graph() -> dict[str, set[str]]:
    """Module -> the batchscore modules it imports, from every `import` and `from` in it,
    function-level ones included (ast.walk visits every node) and type-checking-only
    ones left out."""
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {_module_name(p) for p in paths}
    graph: dict[str, set[str]] = {}
    for path in paths:
        name = _module_name(path)
        deps: set[str] = set()
        for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name in modules}
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(node, name, path.name == "__init__.py")
                if target in modules:
                    deps.add(target)
                deps |= {f"{target}.{a.name}" for a in node.names} & modules
        # A module importing its own package (to reach a sibling) is no cycle of interest.
        graph[name] = deps - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle_through_a_function_level_import():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_function_level_imports_and_skips_type_checking_ones():
    graph = import_graph()
    # batch/shards.py imports rows.keys inside a function.
    assert "batchscore.rows.keys" in graph["batchscore.batch.shards"]
    assert len(graph) > 30
    tree = ast.parse(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import a\nelse:\n    import b\n"
        "def f():\n    import c\n"
    )
    names = {a.name for n in _runtime_nodes(tree) if isinstance(n, ast.Import) for a in n.names}
    assert names == {"b", "c"}


def test_the_library_import_graph_has_no_cycle():
    assert cycles(import_graph()) == []


def test_every_init_file_is_empty():
    inits = sorted(PACKAGE.rglob("__init__.py"))
    assert len(inits) >= 8
    for path in inits:
        assert path.read_text().strip() == "", f"{path.relative_to(ROOT)} is not empty"


def test_metaflow_folder_has_no_init_file():
    assert not (ROOT / "metaflow" / "__init__.py").exists()


# ------------------------------------------------------------------ test markers

_FLOW_FILES = ("train_models.py", "batch_processing.py")


def _marks(decorators: list[ast.expr]) -> set[str]:
    """Marker names in `@pytest.mark.x` decorators and `pytestmark = [...]` values."""
    names = set()
    for node in decorators:
        for sub in ast.walk(node):
            if (
                isinstance(sub, ast.Attribute)
                and isinstance(sub.value, ast.Attribute)
                and sub.value.attr == "mark"
            ):
                names.add(sub.attr)
    return names


def _runs_a_flow(node: ast.AST, helpers: set[str]) -> bool:
    """True when the code names a flow file (not in an expected message, `match=`),
    Metaflow's Runner, or a helper that does."""
    messages = {
        id(k.value) for sub in ast.walk(node) if isinstance(sub, ast.Call) for k in sub.keywords
        if k.arg == "match"
    }  # fmt: skip
    for sub in ast.walk(node):
        if isinstance(sub, ast.Constant) and sub.value in _FLOW_FILES and id(sub) not in messages:
            return True
        if isinstance(sub, ast.Name) and (sub.id == "Runner" or sub.id in helpers):
            return True
    return False


def _flow_helpers(functions: list[ast.FunctionDef], known: set[str]) -> set[str]:
    """Non-test functions (helpers, fixtures) that run flows, to a fixed point."""
    helpers = set(known)
    while True:
        more = {
            f.name
            for f in functions
            if not f.name.startswith("test_") and f.name not in helpers and _runs_a_flow(f, helpers)
        }
        if not more:
            return helpers
        helpers |= more


def _functions(path: Path) -> list[ast.FunctionDef]:
    tree = ast.parse(path.read_text(), str(path))
    return [n for n in tree.body if isinstance(n, ast.FunctionDef)]


def flow_tests_without_the_marker(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    functions = _functions(path)
    module_marks = set()
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "pytestmark" for t in node.targets
        ):
            module_marks |= _marks([node.value])
    # conftest's fixtures and helpers that run flows (the shared trainings) count too.
    shared = _flow_helpers(_functions(ROOT / "tests" / "conftest.py"), set())
    helpers = _flow_helpers(functions, shared)
    missing = []
    for f in functions:
        if not f.name.startswith("test_"):
            continue
        requested = {a.arg for a in f.args.args}
        runs = _runs_a_flow(f, helpers) or requested & helpers
        if runs and "flows" not in module_marks | _marks(f.decorator_list):
            missing.append(f"{path.name}::{f.name}")
    return missing


def test_every_test_that_runs_a_flow_is_marked_flows():
    files = sorted((ROOT / "tests").glob("test_*.py"))
    missing = [m for path in files for m in flow_tests_without_the_marker(path)]
    assert missing == []


def test_the_marker_check_catches_an_unmarked_flow_test(tmp_path):
    sample = tmp_path / "test_sample.py"
    sample.write_text(
        "import pytest\n"
        "def go(env):\n    return start_flow('batch_processing.py', env)\n"
        "def test_unmarked(env):\n    go(env)\n"
        "@pytest.mark.flows\ndef test_marked(env):\n    go(env)\n"
        "def test_no_flow():\n    assert True\n"
    )
    assert flow_tests_without_the_marker(sample) == ["test_sample.py::test_unmarked"]


# ------------------------------------------------------------------ the documentation

DOCS = ROOT / "docs" / "architecture.md"


def _flow_names(flow: Path) -> tuple[set[str], set[str]]:
    """A flow file's step names and Parameter names."""
    steps, parameters = set(), set()
    for node in ast.walk(ast.parse(flow.read_text())):
        if isinstance(node, ast.FunctionDef) and any(
            isinstance(d, ast.Name) and d.id == "step" for d in node.decorator_list
        ):
            steps.add(node.name)
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "Parameter"
        ):
            parameters.add(node.args[0].value)
    return steps, parameters


def test_architecture_doc_names_every_step_and_parameter_of_both_flows():
    text = DOCS.read_text()
    for flow in sorted((ROOT / "metaflow").glob("*.py")):
        steps, parameters = _flow_names(flow)
        assert steps and parameters, flow
        for name in steps | parameters:
            assert f"`{name}`" in text or f" {name} " in text or f"{name} →" in text, (flow, name)


def test_readme_links_the_architecture_doc_and_nothing_cites_the_old_name():
    assert "(docs/architecture.md)" in (ROOT / "README.md").read_text()
    old = "ARCHITECTURE" + ".md"  # the brief's file, not in this repository
    files = [ROOT / "README.md"]
    for folder in ("src", "tests", "metaflow", "benchmarks"):
        files += (ROOT / folder).rglob("*.py")
    assert [str(f) for f in files if old in f.read_text()] == []
