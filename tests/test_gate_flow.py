"""The publish gate through the real flows: drift blocks, quarantine, promote, history."""

from __future__ import annotations

import base64
import io
import os
import re
import sys
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import keyspace, run_command, start_flow
from sqlalchemy import create_engine, select, update

from batchscore.batch.predictions import LoadedModel
from batchscore.cli import main as cli
from batchscore.online.store import OnlineStore
from batchscore.storage.object_store import ObjectStore
from batchscore.storage.tracking import batch_runs, training_runs
from batchscore.versions import new_version

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.flows, pytest.mark.services]


def card_text(flow_file: str, run, step: str, env: dict[str, str], cwd: Path) -> str:
    """What a card shows (its components, which the HTML page carries base64-encoded), read
    as the run's summary tells a user to: `card get`, from the directory the run started in
    (a local run keeps its cards there)."""
    page = cwd / f"{run.id}-{step}.html"
    command = [sys.executable, str(ROOT / "metaflow" / flow_file), "card", "get"]
    run_command([*command, f"{run.id}/{step}", str(page)], cwd, {**os.environ, **env})
    found = re.findall(r'__MF_DATA__\["[^"]+"\] = "([^"]+)"', page.read_text())
    return "".join(base64.b64decode(data).decode() for data in found)


def test_drift_blocks_quarantine_sets_rows_aside_and_promote_publishes(
    service_training, trained_service_env_local_datastore, tmp_path, settings_for, monkeypatch
):
    # Scored with the session's one service-mode training (conftest), on a copy of its
    # database: this test's batch runs and promotions stay its own.
    service_env = trained_service_env_local_datastore
    settings = settings_for(service_env)
    work = tmp_path / "work"
    train = service_training.run
    store = ObjectStore.from_settings(settings)
    rows = pd.read_csv(io.BytesIO(store.get_bytes(train.data.data.batch_input_uri)))
    status, first, output = start_flow("batch_processing.py", service_env, work)
    assert status == "successful", output
    online = OnlineStore.from_settings(settings)
    live = online.current()
    assert live == first.data.version

    # Every value x 3: blocked. The pointer and the live keys stay; the run fails non-zero.
    shifted = tmp_path / "shifted.csv"
    (rows * 3).to_csv(shifted, index=False)
    layout = online.layout(live)

    def rows_stored() -> int:  # every row of the live version, bucket by bucket
        pipe = online.client.pipeline(transaction=False)
        for bucket in range(layout.buckets):
            pipe.hlen(f"{layout.rows}{bucket}")
        return sum(pipe.execute())

    keys_before = rows_stored()
    status, blocked, output = start_flow(
        "batch_processing.py", service_env, work, input_path=str(shifted)
    )
    assert status == "failed"
    assert "drifted beyond PSI 0.25" in output
    assert online.current() == live
    assert rows_stored() == keys_before > 0
    card = card_text("batch_processing.py", blocked, "ingest_redis", service_env, work)
    assert "BLOCKED" in card and "mean radius" in card
    # The score histogram is a Vega-Lite chart the card's own script draws (offline).
    assert '"type": "vegaChart"' in card and "this batch" in card and "training split" in card
    version = blocked.data.version
    engine = create_engine(service_env["BATCHSCORE_DATABASE_URL"])
    with engine.connect() as conn:
        row = conn.execute(select(batch_runs).where(batch_runs.c.redis_version == version)).one()
    assert not row.published and row.gate.startswith("blocked") and row.max_drift > 1

    # A person looked, and publishes it anyway: same checks, same atomic switch.
    for name, value in service_env.items():
        monkeypatch.setenv(name, value)
    assert cli(["promote", version]) == 0
    assert online.current() == version
    assert cli(["rollback"]) == 0
    assert online.current() == live
    assert cli(["history"]) == 0

    # Quarantine: 1% bad rows are set aside with their reasons; the rest is published...
    messy = pd.concat([rows] * 9, ignore_index=True).astype(object)
    bad = np.arange(0, len(messy), 100)
    for n, row in enumerate(bad):
        messy.iat[row, n % messy.shape[1]] = ["n/a", "", "inf"][n % 3]
    path = tmp_path / "messy.csv"
    messy.to_csv(path, index=False)
    options = {"input_path": str(path), "bad_rows": "quarantine"}
    status, loose, output = start_flow(
        "batch_processing.py", service_env, work, max_bad_rows=0.02, **options
    )
    assert status == "successful", output
    assert online.current() == loose.data.version
    rejected = pd.read_csv(io.BytesIO(store.get_bytes(loose.data.plan.rejected_uri)))
    assert rejected["row"].tolist() == (bad + 1).tolist()  # 1-based data rows
    assert set(rejected["reason"]) == {"not a number", "missing value",
                                       "not a finite number (NaN or inf)"}  # fmt: skip
    assert loose.data.plan.rows_read - loose.data.plan.rows_rejected == len(messy) - len(bad)

    # ...unless their share is over the limit: blocked, here for a champion trained before
    # reference profiles existed, whose drift cannot be measured (issue 22, item 4; one run
    # for both, the limit with a profile is tests/test_drift.py's).
    with engine.begin() as conn:
        conn.execute(update(training_runs).values(profile_uri=None, profile_sha256=None))
    status, strict, output = start_flow(
        "batch_processing.py", service_env, work, max_bad_rows=0.005, **options
    )
    assert status == "failed"
    assert "rows rejected" in output and "drift not measured" in output
    assert online.current() == loose.data.version

    # Another run publishes a newer version while this one writes (here: before it gets to
    # ingest_redis, with a version that sorts after it): this run publishes nothing and
    # ends non-zero, naming the run that superseded it (issue 22, item 6).
    newer = new_version("BatchProcessingFlow/9999", at=datetime(2999, 1, 1, tzinfo=UTC))
    online.stage(newer, {"run_id": "BatchProcessingFlow/9999", "model": "svc"})
    svc = LoadedModel("svc", None, "0" * 64)
    online.write(newer, 0, ["0" * 64], [(svc, np.array([1]), np.array([0.9]))])
    assert online.publish(newer, 1, 1)
    before = keyspace(online.client, online.prefix)
    status, late, output = start_flow("batch_processing.py", service_env, work)
    assert status == "failed"
    line = (
        f"superseded: {late['ingest_redis'].task.data.version} was not published because "
        f"{newer} (run BatchProcessingFlow/9999) went live while this run wrote"
    )
    assert output.count(line) == 1, output[-3000:]
    assert "Traceback" not in output
    assert online.current() == newer
    assert keyspace(online.client, online.prefix) == before  # its rows and manifest: gone
