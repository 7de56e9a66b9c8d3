"""score_shard on its own: a shard planned into the store, scored into a staged version."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from threadpoolctl import threadpool_info

from batchscore.batch import SCORE_BLOCK_ROWS, ModelBundle, plan_shards, score_shard
from batchscore.keys import row_keys
from batchscore.online import OnlineStore, new_version
from batchscore.scoring import LoadedModel

COLUMNS = ["a", "b"]


class RecordingModel:
    """Probability = a's fraction of a + b; remembers the thread pools it ran under."""

    classes_ = np.array([0, 1])

    def __init__(self) -> None:
        self.threads: list[int] = []
        self.calls = 0

    def predict_proba(self, features: pd.DataFrame) -> np.ndarray:
        self.calls += 1
        self.threads += [pool["num_threads"] for pool in threadpool_info()]
        a, b = features["a"].to_numpy(), features["b"].to_numpy()
        positive = a / (a + b)
        return np.column_stack([1 - positive, positive])


@pytest.fixture
def planned(tmp_path, redis_url, redis_prefix, settings_for):
    rows = pd.DataFrame({"a": np.arange(1.0, 50_001.0), "b": np.full(50_000, 2.0)})
    rows.loc[49_999] = rows.loc[0]  # one duplicate row, written once
    path = tmp_path / "rows.parquet"
    rows.to_parquet(path, index=False)
    settings = settings_for(
        {
            "BATCHSCORE_HOME": str(tmp_path / "home"),
            "BATCHSCORE_REDIS_URL": redis_url,
            "BATCHSCORE_REDIS_PREFIX": redis_prefix,
            "BATCHSCORE_SCORING_THREADS": "1",
        }
    )
    shards = plan_shards(path.as_uri(), COLUMNS, 50_000, "Flow/1", settings)
    return rows, shards, settings


@pytest.mark.services
def test_a_shard_is_scored_in_blocks_and_counted_once(planned, redis_client):
    rows, shards, settings = planned
    model = RecordingModel()
    bundle = ModelBundle("train-1", [LoadedModel("ratio", model, "ab" * 32)], COLUMNS, ("n", "y"))
    version = new_version("Flow/1")
    online = OnlineStore.from_settings(settings)
    online.stage(version, {"model": "ratio"})

    result = score_shard(0, shards[0], bundle, version, settings)

    assert (result.rows_scored, result.keys_written, result.duplicates) == (50_000, 49_999, 1)
    assert model.calls == math.ceil(49_999 / SCORE_BLOCK_ROWS)  # scored a block at a time
    assert set(model.threads) == {1}  # BATCHSCORE_SCORING_THREADS capped every pool
    assert redis_client.hget(online.manifest(version), "shard:0") == b"49999"
    assert online.publish(version, 49_999, 1)
    first, last = online.get_many(row_keys(rows.iloc[[0, 49_998]].to_numpy()))
    assert (first["label"], first["proba"]) == (0, round(1 / 3, 6))
    assert (last["label"], last["class"], last["proba"]) == (1, "y", round(49_999 / 50_001, 6))
    assert first["model_version"] == "ab" * 6
