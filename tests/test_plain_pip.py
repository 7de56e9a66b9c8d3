"""The seed's own commands, without make, in a fresh clone and a fresh virtualenv:

    pip install -r requirements.txt
    python metaflow/train_models.py run
    python metaflow/batch_processing.py run

Slow (a virtualenv install, ~1 min with a warm pip cache, then both flows): marked `slow`,
and run by `make test` and CI like every other test. CI runs as root, so there this also
covers Metaflow's refusal of `root`. The clone is of the committed HEAD.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.flows]


def fresh_copy(target: Path) -> None:
    if (ROOT / ".git").exists():
        subprocess.run(["git", "clone", "--quiet", str(ROOT), str(target)], check=True)
    else:  # not a git checkout: the files a clone would hold
        shutil.copytree(
            ROOT,
            target,
            ignore=shutil.ignore_patterns(
                ".venv", ".batchscore", ".metaflow", ".env", "__pycache__"
            ),
        )


def run(args: list[str], cwd: Path, env: dict[str, str], timeout: int = 900) -> str:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{output[-4000:]}"
    return output


def test_pip_install_then_both_flows_in_a_fresh_clone(tmp_path):
    clone = tmp_path / "batchscore"
    fresh_copy(clone)
    # A new user's shell: none of the test session's Metaflow or batchscore settings, no
    # METAFLOW_USER (as root, Metaflow would refuse to run without one).
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("METAFLOW_", "BATCHSCORE_", "VIRTUAL_ENV", "PYTHON"))
    }
    subprocess.run([sys.executable, "-m", "venv", str(clone / "venv")], check=True)
    python = str(clone / "venv" / "bin" / "python")
    run([python, "-m", "pip", "install", "--quiet", "-r", "requirements.txt"], clone, env)
    try:
        train = run([python, "metaflow/train_models.py", "run"], clone, env)
        assert "champion:" in train
        # The card command the run prints works headless, and for another user (namespace).
        printed = re.search(
            r"card: python (metaflow/train_models\.py card get \S+ card\.html)", train
        )
        assert printed, train[-2000:]
        run([python, *printed.group(1).split()], clone, {**env, "METAFLOW_USER": "someone-else"})
        run_id = printed.group(1).split()[3].split("/")[0]
        assert f"TrainModelsFlow/{run_id}/evaluate/" in (clone / "card.html").read_text()
        batch = run([python, "metaflow/batch_processing.py", "run"], clone, env)
        assert "rows scored" in batch
        status = run([python, "-m", "batchscore", "status"], clone, env)
        assert "114" in status  # the breast-cancer test split
        # Everything embedded stayed in the clone's own folders.
        assert (clone / ".batchscore" / "store").is_dir()
        assert (clone / ".metaflow" / "TrainModelsFlow").is_dir()
    finally:
        subprocess.run([python, "-m", "batchscore", "stop-embedded"], cwd=clone, env=env)
