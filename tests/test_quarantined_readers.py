"""Readers of a version published with `--bad_rows quarantine`: `lookup --sample` and the
notebook read the rows that version published, not its input with the strict checks.

The input lives on a real S3 endpoint (moto's server), as it does under Compose (MinIO).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import execute_notebook

from batchscore.batch.predictions import LoadedModel
from batchscore.online.store import OnlineStore
from batchscore.rows.errors import InputError
from batchscore.rows.keys import row_keys
from batchscore.rows.published import read_published_rows
from batchscore.storage.object_store import ObjectStore
from batchscore.versions import new_version

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ["mean radius", "mean texture", "fractal dimension error"]
CLASSES = ["benign", "malignant"]
# Ten rows; rows 3, 6 and 7 (1-based) were set aside by the run: an empty cell (NaN), text,
# and inf. Labels alternate, so labels that do not line up with the published rows show.
CELLS = [[10.0 + n, 20.0 + n, 0.001 * (n + 1)] for n in range(10)]
CELLS[2][2], CELLS[5][1], CELLS[6][0] = "", "n/a", "inf"
SET_ASIDE = [2, 5, 6]  # 0-based positions
LABELS = [n % 2 for n in range(10)]
GOOD = [n for n in range(10) if n not in SET_ASIDE]


@pytest.fixture
def env(s3_env, redis_url, redis_prefix, home) -> dict[str, str]:
    return {
        **s3_env,
        "BATCHSCORE_REDIS_URL": redis_url,
        "BATCHSCORE_REDIS_PREFIX": redis_prefix,
        "BATCHSCORE_HOME": str(home),
    }


@pytest.fixture
def quarantined(env, settings_for, redis_client, redis_prefix) -> tuple[str, str, list[str]]:
    """A live version published from an input with bad rows, its good rows only, as
    `--bad_rows quarantine` publishes it; the input and its labels on S3."""
    settings = settings_for(env)
    store = ObjectStore.from_settings(settings)
    table = pd.DataFrame(CELLS, columns=COLUMNS, dtype=object)
    uri = store.put_bytes("data/run-1/breast_cancer.csv", table.to_csv(index=False).encode())
    labels = pd.DataFrame({"label": LABELS}).to_csv(index=False).encode()
    store.put_bytes("data/run-1/breast_cancer.labels.csv", labels)

    online = OnlineStore(redis_client, prefix=redis_prefix)
    version = new_version("BatchProcessingFlow/5")
    meta = {"input": uri, "model": "svc", "feature_columns": COLUMNS, "classes": CLASSES}
    online.stage(version, {**meta, "key_scheme": "feature_hash"})
    keys = row_keys(np.array([CELLS[n] for n in GOOD], dtype=np.float64))
    proba = np.array([0.1 + 0.8 * LABELS[n] for n in GOOD])
    svc = LoadedModel("svc", None, "abcdef012345" + "0" * 52)
    online.write(version, 0, keys, [(svc, (proba >= 0.5) * 1, proba)])
    assert online.publish(version, len(keys), 1)
    return version, uri, keys


def test_read_published_rows_leaves_out_what_the_run_set_aside(quarantined, env, settings_for):
    _, uri, _ = quarantined
    settings = settings_for(env)
    rows = read_published_rows(uri, COLUMNS, settings)
    assert rows.index.tolist() == GOOD  # positions in the input: labels line up
    assert rows.columns.tolist() == COLUMNS and (rows.dtypes == "float64").all()
    assert rows.loc[3].tolist() == CELLS[3]
    assert read_published_rows(uri, COLUMNS, settings, limit=4).index.tolist() == GOOD[:4]
    with pytest.raises(InputError, match="missing feature column"):
        read_published_rows(uri, [*COLUMNS, "worst area"], settings)


def test_lookup_sample_on_a_quarantined_version(quarantined, env, tmp_path):
    version, _, keys = quarantined
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHSCORE_")} | env
    result = subprocess.run(
        [sys.executable, "-m", "batchscore", "lookup", "--sample", "5", "--json"],
        env=full_env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    answer = json.loads(result.stdout)
    assert (answer["version"], answer["found"]) == (version, 5)
    assert answer["keys"] == keys[:5]
    assert [p["label"] for p in answer["predictions"]] == [LABELS[n] for n in GOOD[:5]]


def test_notebook_on_a_quarantined_version(quarantined, env, tmp_path):
    """Executed from notebooks/, as Jupyter runs it, against the quarantined version."""
    project = tmp_path / "project"
    (project / "notebooks").mkdir(parents=True)
    shutil.copy(ROOT / "pyproject.toml", project)
    shutil.copy(ROOT / "notebooks" / "predictions.ipynb", project / "notebooks")
    outputs = execute_notebook(project / "notebooks", env)
    assert f"{len(GOOD)} rows published" in outputs, outputs[-2000:]
    assert f"hit rate: 100.0% ({len(GOOD)} of {len(GOOD)} rows" in outputs
    # The stored labels are the true ones: only labels lined up with the rows give 1.0.
    assert "accuracy against the labels: 1.0000" in outputs
