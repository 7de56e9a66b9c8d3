"""Packaging: `pip install .` gives a working `batchscore` command.

pyproject.toml declares the runtime dependencies; requirements.txt (what the flows, CI and
the images install) lists the same pins. The fresh-virtualenv install is `slow` (~1-2 min
with a warm pip cache); the agreement checks are instant.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import tomllib
from importlib.metadata import packages_distributions, requires
from pathlib import Path

import pytest
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
    declared = {_key(r)[0] for r in _pyproject()["dependencies"]}
    # The libraries a declared one is built on, and whose API it exposes, come with it
    # (fastapi: starlette, boto3: botocore, pydantic-settings: pydantic).
    brought = {
        canonicalize_name(Requirement(r).name)
        for name in declared
        for r in requires(name) or []
        if "extra ==" not in r
    }
    providers = packages_distributions()
    undeclared = {
        module: providers.get(module, ["?"])
        for module in third_party
        if not {canonicalize_name(d) for d in providers.get(module, [])} & (declared | brought)
    }
    assert not undeclared, f"imported by src/batchscore, not in pyproject.toml: {undeclared}"


@pytest.mark.slow
def test_pip_install_dot_gives_a_working_command(tmp_path):
    from test_plain_pip import fresh_copy, run

    clone = tmp_path / "batchscore"
    fresh_copy(clone)  # the committed HEAD: what a user clones
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("METAFLOW_", "BATCHSCORE_", "VIRTUAL_ENV", "PYTHON"))
    }
    env["BATCHSCORE_HOME"] = str(tmp_path / "home")
    subprocess.run([sys.executable, "-m", "venv", str(tmp_path / "venv")], check=True)
    bin_dir = tmp_path / "venv" / "bin"
    run([str(bin_dir / "python"), "-m", "pip", "install", "--quiet", "."], clone, env)
    elsewhere = tmp_path / "elsewhere"  # not the clone: the installed copy is what runs
    elsewhere.mkdir()
    command = str(bin_dir / "batchscore")
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
            "from batchscore.service.app import create_app\n"
            "app = create_app()\n"
            "assert any(getattr(r, 'path', '') == '/docs' for r in app.routes)\n"
            "import batchscore.online.store, batchscore.batch.scoring, batchscore.training.steps"
        )
        run([str(bin_dir / "python"), "-c", code], elsewhere, env)
    finally:
        subprocess.run([command, "stop-embedded"], cwd=elsewhere, env=env)
