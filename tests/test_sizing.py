"""Shards and threads sized from the cores a step has: no oversubscription at the defaults."""

from __future__ import annotations

import os

import pytest

from batchscore import sizing


@pytest.fixture
def local(monkeypatch):
    monkeypatch.delenv("METAFLOW_KUBERNETES_WORKLOAD", raising=False)
    monkeypatch.delenv("AWS_BATCH_JOB_ID", raising=False)


def test_machine_cores_is_the_affinity_mask(local):
    assert sizing.machine_cores() <= len(os.sched_getaffinity(0))
    assert sizing.machine_cores() >= 1


def test_machine_cores_counts_what_joblib_counts(local):
    """The maintained library's count (affinity, cgroup quota), without its import cost."""
    import joblib

    assert sizing.machine_cores() == joblib.cpu_count()


@pytest.mark.parametrize(
    ("files", "limit"),
    [
        ({"cpu.max": "max 100000\n"}, None),  # v2, unlimited
        ({"cpu.max": "150000 100000\n"}, 2),  # 1.5 CPUs: rounded up, as joblib does
        ({"cpu.max": "50000 100000\n"}, 1),
        ({"cpu.max": "400000 100000\n"}, 4),
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),  # v1
        ({"cpu/cpu.cfs_quota_us": "250000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 3),
        ({"cpu.max": "garbage"}, None),
        ({}, None),  # no cgroup files at all
    ],
)
def test_a_containers_cpu_limit_is_read_from_cgroup_v2_or_v1(tmp_path, files, limit):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert sizing.cgroup_cpu_limit(tmp_path) == limit


def test_a_cpu_limit_below_the_affinity_mask_wins(local, monkeypatch):
    monkeypatch.setattr(sizing, "cgroup_cpu_limit", lambda: 1)
    assert sizing.machine_cores() == 1
    monkeypatch.setattr(sizing, "cgroup_cpu_limit", lambda: 10_000)
    assert sizing.machine_cores() == len(os.sched_getaffinity(0))


def test_shards_stay_small_enough_to_hold(local):
    # Locally the plan is one shard per core (tests/test_flows.py); where shards are sized
    # for memory, whatever the row count, each holds at most SHARD_FEATURE_BYTES of features.
    most = sizing.SHARD_FEATURE_BYTES // (8 * 300)
    assert sizing.shard_rows_for_memory(300) == most
    assert sizing.shard_rows_for_memory(0) == sizing.SHARD_FEATURE_BYTES // 8


def test_threads_split_the_cores_between_concurrent_tasks(local):
    assert sizing.scoring_threads(shards=2, cores=2) == 1
    assert sizing.scoring_threads(shards=10, cores=2) == 1  # --max-workers 16: still 1 each
    assert sizing.scoring_threads(shards=1, cores=8) == 8
    assert sizing.scoring_threads(shards=2, cores=8) == 4
    assert sizing.scoring_threads(shards=2, cores=2, override=3) == 3  # the variable wins


class _Decorator:
    def __init__(self, name: str, cpu) -> None:
        self.name, self.attributes = name, {"cpu": cpu}


class _Flow:
    def batch_processing(self):  # a step as Metaflow decorates it
        pass

    batch_processing.decorators = [_Decorator("resources", 2), _Decorator("kubernetes", "4")]


def test_in_a_pod_a_task_takes_the_cpu_its_step_asks_for(monkeypatch):
    monkeypatch.setenv("METAFLOW_KUBERNETES_WORKLOAD", "1")
    assert sizing.step_cores(_Flow(), "batch_processing") == 4
    assert sizing.scoring_threads(shards=50, cores=4) == 4  # one pod per shard
    # Shards are sized for memory: the cluster runs them side by side.
    assert sizing.shard_rows_for_memory(30) == sizing.SHARD_FEATURE_BYTES // 240


def test_locally_the_decorators_do_not_count(local):
    assert sizing.step_cores(_Flow(), "batch_processing") == sizing.machine_cores()
