"""Reference profiles, PSI and the publish gate, on data shaped like real batches."""

from __future__ import annotations

import numpy as np
import pytest

from batchscore.batch.drift import BatchProfile, ReferenceProfile, bin_counts, psi
from batchscore.batch.gate import check


def _training(rows: int = 5_000, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    matrix = np.column_stack(
        [
            rng.normal(10, 2, rows),  # continuous
            rng.integers(0, 2, rows).astype(float),  # binary: quantiles collapse
            rng.exponential(1.0, rows),  # skewed
        ]
    )
    return matrix, ["mean radius", "flag", "amount"]


def _profile(matrix, columns, scores=None) -> ReferenceProfile:
    scores = np.linspace(0, 1, len(matrix)) if scores is None else scores
    return ReferenceProfile.build(matrix, columns, scores, model="logreg")


def test_same_distribution_has_small_psi_for_every_feature():
    matrix, columns = _training()
    reference = _profile(matrix, columns)
    fresh, _ = _training(seed=1)
    batch = BatchProfile()
    batch.add(reference, fresh, np.full(len(fresh), 0.3), np.zeros(len(fresh), int))
    drift = batch.drift(reference)
    assert set(drift) == set(columns)
    assert max(drift.values()) < 0.02


def test_a_shifted_feature_is_named_first():
    matrix, columns = _training()
    reference = _profile(matrix, columns)
    shifted = matrix.copy()
    shifted[:, 2] *= 3
    batch = BatchProfile()
    batch.add(reference, shifted, np.zeros(len(shifted)), np.zeros(len(shifted), int))
    drift = batch.drift(reference)
    assert next(iter(drift)) == "amount"
    assert drift["amount"] > 0.25
    assert drift["mean radius"] < 0.01


def test_a_binary_feature_whose_share_flips_drifts():
    matrix, columns = _training()
    reference = _profile(matrix, columns)
    assert reference.edges["flag"] == [0.0, 1.0]  # deciles of 0/1 collapse to two cuts
    flipped = matrix.copy()
    flipped[:, 1] = (np.arange(len(matrix)) % 10 == 0).astype(float)  # 10% ones, not 50%
    batch = BatchProfile()
    batch.add(reference, flipped, np.zeros(len(matrix)), np.zeros(len(matrix), int))
    assert batch.drift(reference)["flag"] > 0.25


def test_shards_merge_to_the_whole_batch():
    matrix, columns = _training()
    reference = _profile(matrix, columns)
    scores = np.random.default_rng(2).uniform(size=len(matrix))
    labels = (scores >= 0.5).astype(int)
    whole = BatchProfile()
    whole.add(reference, matrix, scores, labels)
    parts = []
    for rows in np.array_split(np.arange(len(matrix)), 3):
        part = BatchProfile()
        part.add(reference, matrix[rows], scores[rows], labels[rows])
        parts.append(BatchProfile.from_dict(part.to_dict()))  # as a Metaflow artifact would
    merged = BatchProfile.merge(parts)
    assert merged == whole
    assert merged.rows == len(matrix)
    assert sum(merged.label_counts) == len(matrix)


def test_profile_round_trips_and_hashes_stably():
    matrix, columns = _training()
    reference = _profile(matrix, columns)
    again = ReferenceProfile.from_json(reference.to_json())
    assert again == reference
    assert again.sha256() == reference.sha256()


def test_psi_of_identical_and_empty_distributions():
    assert psi([10, 20, 30], [1, 2, 3]) == pytest.approx(0.0)
    assert psi([10, 20, 30], [0, 0, 0]) == 0.0
    assert psi([50, 50], [100, 0]) > 1


def test_gate_names_the_worst_features_and_the_bad_row_share():
    drift = {"a": 0.9, "b": 0.4, "c": 0.05}
    result = check(drift, rows_read=1000, rows_rejected=10, max_drift=0.25, max_bad_rows=0.005)
    assert not result.passed
    assert "2 feature(s) drifted beyond PSI 0.25: 'a' 0.90, 'b' 0.40" in result.summary
    assert "10 of 1000 rows rejected (1.00%)" in result.summary
    assert check(drift, 1000, 10, max_drift=1.0, max_bad_rows=0.01).passed


def test_gate_rejects_nonsense_limits():
    with pytest.raises(ValueError, match="max_bad_rows"):
        check({}, 1, 0, 0.25, 1.5)
    with pytest.raises(ValueError, match="max_drift"):
        check({}, 1, 0, -1, 0)


def test_bin_counts_match_searchsorted_bins():
    # Right-closed cuts: a value equal to an edge falls in the bin below it; NaN last.
    rng = np.random.default_rng(3)
    for edges in ([], [0.5], np.unique(rng.random(9)), [0.2, 0.2000001, 0.9]):
        values = np.r_[rng.random(500), edges, [0.0, 1.0, np.nan]]
        expected = np.bincount(np.searchsorted(edges, values), minlength=len(edges) + 1)
        assert bin_counts(values, edges).tolist() == expected.tolist()


def test_without_a_profile_the_bad_row_limit_still_applies_and_drift_is_not_measured():
    blocked = check(None, rows_read=1000, rows_rejected=10, max_drift=0.25, max_bad_rows=0.005)
    assert not blocked.passed
    assert blocked.summary == (
        "blocked: 10 of 1000 rows rejected (1.00%), more than --max_bad_rows 0.005 "
        "(drift not measured: the champion recorded no reference profile)"
    )
    passed = check(None, 1000, 10, max_drift=0.25, max_bad_rows=0.02)
    assert passed.passed and passed.summary.startswith("passed (drift not measured")


@pytest.mark.services
def test_a_champion_without_a_profile_is_judged_on_its_rejected_rows(
    redis_url, redis_prefix, settings_for, tmp_path
):
    """A model trained before reference profiles existed: the batch report says drift was
    not measured, and a batch over the bad-row limit is blocked all the same (issue 22)."""
    from batchscore.batch.bundle import ModelFiles
    from batchscore.batch.publishing import GateLimits, judge
    from batchscore.batch.report import card_components
    from batchscore.batch.scoring import ShardResult
    from batchscore.batch.shards import ShardPlan
    from batchscore.online.store import OnlineStore
    from batchscore.storage.model_record import ModelRecord

    settings = settings_for(
        {
            "BATCHSCORE_HOME": str(tmp_path),
            "BATCHSCORE_REDIS_URL": redis_url,
            "BATCHSCORE_REDIS_PREFIX": redis_prefix,
        }
    )
    record = ModelRecord(
        "TrainModelsFlow/1", "logreg", "file:///m", "0" * 64, ["a"], ("no", "yes"), True
    )
    files = ModelFiles([record], [b""], profile=None)
    shards = [ShardResult(0, 600, 600), ShardResult(1, 390, 390)]
    plan = ShardPlan(["s0", "s1"], rows_read=1000, rows_rejected=10)
    online = OnlineStore.from_settings(settings)

    report = judge("v1", shards, files, online, plan, GateLimits(max_bad_rows=0.005), 990, 0)
    assert not report.gate.passed
    assert "10 of 1000 rows rejected" in report.gate.summary
    assert report.max_drift is None and report.rows_scored == 990
    assert report.summary()["max_drift"] is None
    assert report.summary_lines()["largest drift (PSI)"] == "not measured (no reference profile)"
    card = repr([c.render() for c in card_components(report)])
    assert "Drift: not measured" in card and "BLOCKED" in card

    within = judge("v1", shards, files, online, plan, GateLimits(max_bad_rows=0.02), 990, 0)
    assert within.gate.passed
