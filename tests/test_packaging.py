"""Packaging: `pip install .` gives a working `batchscore` command.

pyproject.toml declares the runtime dependencies; requirements.txt (what the flows, CI and
the images install) lists the same pins, which the agreement checks (instant) hold to. The
install is `slow`: the package goes on its own beside conftest's fresh virtualenv.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from importlib.metadata import packages_distributions, requires
from pathlib import Path

import pytest
from conftest import run_command as run
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def _key(requirement: str) -> tuple[str, frozenset[str], str, str]:
    parsed = Requirement(requirement)
    return (
        canonicalize_name(parsed.name),
        frozenset(parsed.extras),
        str(parsed.specifier),
        str(parsed.marker or ""),
    )


def _requirements_txt() -> list[str]:
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    specs = [line.split("#", 1)[0].strip() for line in lines]
    assert "-e ." in specs, "requirements.txt must still install the project itself"
    return [spec for spec in specs if spec and not spec.startswith("-")]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_pyproject_and_requirements_txt_agree():
    project = _pyproject()
    declared = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        declared += extra
    listed = _requirements_txt()
    assert sorted(map(_key, declared)) == sorted(map(_key, listed)), (
        "pyproject.toml (dependencies + extras) and requirements.txt list different pins:\n"
        f"only in pyproject.toml: {sorted(set(declared) - set(listed))}\n"
        f"only in requirements.txt: {sorted(set(listed) - set(declared))}"
    )
    # Every pin is a compatible range: bug fixes in, breaking releases out.
    assert all("~=" in str(Requirement(r).specifier) for r in listed), listed


def test_every_library_import_is_a_declared_dependency():
    """A module `src/batchscore` imports is installed by `pip install .` (not only by
    the test requirements, nor only by chance as another package's dependency)."""
    imported: set[str] = set()
    for path in (ROOT / "src" / "batchscore").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - {"batchscore", "__future__"}
    dependencies = [Requirement(r) for r in _pyproject()["dependencies"]]
    declared = {canonicalize_name(r.name) for r in dependencies}
    # The libraries a declared one is built on, and whose API it exposes, come with it
    # (fastapi: starlette, boto3: botocore, pydantic-settings: pydantic), and those of the
    # extras asked for (redis[hiredis]: hiredis).
    brought = {
        canonicalize_name(needed.name)
        for dependency in dependencies
        for needed in map(Requirement, requires(dependency.name) or [])
        if needed.marker is None
        or any(needed.marker.evaluate({"extra": e}) for e in ("", *dependency.extras))
    }
    providers = packages_distributions()
    undeclared = {
        module: providers.get(module, ["?"])
        for module in third_party
        if not {canonicalize_name(d) for d in providers.get(module, [])} & (declared | brought)
    }
    assert not undeclared, f"imported by src/batchscore, not in pyproject.toml: {undeclared}"


@pytest.mark.slow
def test_pip_install_dot_gives_a_working_command(fresh_install, tmp_path):
    # Installed on its own (`--no-deps --target`) beside the fresh clone's
    # `pip install -r requirements.txt`, whose pins are pyproject's (checked above): the
    # built package, its data (Lua scripts, /docs assets) and its command are what run.
    clone, env = fresh_install.clone, {**fresh_install.env}
    installed = tmp_path / "installed"
    pip = [fresh_install.python, "-m", "pip", "install", "--quiet", "--no-deps"]
    run([*pip, "--target", str(installed), "."], clone, env)
    env["PYTHONPATH"] = str(installed)  # ahead of the clone's editable install
    env["BATCHSCORE_HOME"] = str(tmp_path / "home")
    elsewhere = tmp_path / "elsewhere"  # not the clone: the installed copy is what runs
    elsewhere.mkdir()
    command = str(installed / "bin" / "batchscore")
    try:
        assert "lookup" in run([command, "--help"], elsewhere, env)
        # Imports everything the CLI needs and starts the embedded Redis (its Lua scripts
        # are package data): an empty store answers "nothing published yet", exit 1.
        result = subprocess.run(
            [command, "status"], cwd=elsewhere, env=env, capture_output=True, text=True
        )
        assert result.returncode == 1, result.stdout + result.stderr
        assert "no prediction set published yet" in result.stdout
        # The HTTP service builds, /docs assets included.
        code = (
            "import batchscore\n"
            f"assert batchscore.__file__.startswith({str(installed)!r}), batchscore.__file__\n"
            "from batchscore.service.app import create_app\n"
            "app = create_app()\n"
            "assert any(getattr(r, 'path', '') == '/docs' for r in app.routes)\n"
            "import batchscore.online.store, batchscore.batch.scoring, batchscore.training.steps"
        )
        run([fresh_install.python, "-c", code], elsewhere, env)
    finally:
        subprocess.run([command, "stop-embedded"], cwd=elsewhere, env=env)
