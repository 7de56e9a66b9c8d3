"""The seed's own commands, without make, in a fresh clone and a fresh virtualenv:

    pip install -r requirements.txt
    python metaflow/train_models.py run
    python metaflow/batch_processing.py run

Slow (a virtualenv install, ~30 s with a warm pip cache, then both flows): marked `slow`,
and run by `make test` and CI like every other test. CI runs as root, so there this also
covers Metaflow's refusal of `root`. The clone is of the committed HEAD.
"""

from __future__ import annotations

import re
import subprocess

import pytest
from conftest import run_command as run

pytestmark = [pytest.mark.slow, pytest.mark.flows]


def test_pip_install_then_both_flows_in_a_fresh_clone(fresh_install):
    # A new user's shell (no METAFLOW_USER: as root, Metaflow would refuse to run without
    # one), after `pip install -r requirements.txt` in a new virtualenv (conftest).
    clone, python, env = fresh_install.clone, fresh_install.python, fresh_install.env
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
