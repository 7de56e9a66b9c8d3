"""Parallelism sized from the cores a step really has: shard count, rows per shard, threads.

Locally every foreach task shares one machine, and Metaflow starts up to `--max-workers`
(default 16) of them at once: with no flags the batch flow makes one shard per core (a
larger input: shards of at most `SHARD_FEATURE_BYTES`) and gives each task
cores / concurrent tasks threads, so nothing oversubscribes. On Kubernetes or AWS Batch
each task is its own pod or job with the cpu its `@resources` asks for, so a task takes
that many threads and shards are sized for memory only: the cluster runs them side by side.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

# Float64 feature bytes in one shard at most (30 features: ~560k rows): what one scoring
# task holds as Arrow plus pandas, so memory stays well inside the step's @resources.
SHARD_FEATURE_BYTES = 128 * 2**20
_COMPUTE_DECORATORS = ("resources", "kubernetes", "batch")
_CGROUP = Path("/sys/fs/cgroup")


def remote() -> bool:
    """True inside a Kubernetes pod or AWS Batch job that Metaflow started."""
    return bool(
        os.environ.get("METAFLOW_KUBERNETES_WORKLOAD") or os.environ.get("AWS_BATCH_JOB_ID")
    )


def machine_cores() -> int:
    """CPUs this process may run on: its affinity mask, bounded by a container's CPU limit.

    What `joblib.cpu_count()` counts (tests/test_sizing.py checks they agree), without
    importing joblib: that costs ~0.12 s of CPU, and the light batch steps (`load_data`
    plans shards with this) import nothing of scikit-learn's otherwise.
    """
    if hasattr(os, "sched_getaffinity"):
        cores = len(os.sched_getaffinity(0))
    else:  # pragma: no cover - macOS, Windows
        cores = os.cpu_count() or 1
    return max(1, min(cores, cgroup_cpu_limit() or cores))


def cgroup_cpu_limit(root: Path = _CGROUP) -> int | None:
    """A container's CPU limit, rounded up as joblib rounds it: cgroup v2 `cpu.max`, else
    v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`. None when unlimited or unknown."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        try:
            quota = (root / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period = (root / "cpu" / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            return None
    try:
        quota_us, period_us = (None if quota == "max" else int(quota)), int(period)
    except ValueError:
        return None
    if quota_us is None or quota_us <= 0 or period_us <= 0:  # v1 writes -1 for no limit
        return None
    return max(1, math.ceil(quota_us / period_us))


def step_cores(flow: Any = None, step_name: str | None = None) -> int:
    """Cores of the running step: in a pod, the cpu its @resources (or @kubernetes) asked
    for, since a pod without a CPU limit sees the whole node; locally, the machine's."""
    if remote() and flow is not None and step_name:
        function = getattr(flow, step_name, None)
        asked = [
            float(deco.attributes["cpu"])
            for deco in getattr(function, "decorators", [])
            if deco.name in _COMPUTE_DECORATORS and deco.attributes.get("cpu")
        ]
        if asked:
            return max(1, math.floor(max(asked)))
    return machine_cores()


def shard_rows_for_memory(features: int) -> int:
    """Rows per shard where shards are sized for memory (on a cluster, a pod each): at most
    `SHARD_FEATURE_BYTES` of float64 features."""
    return max(1, SHARD_FEATURE_BYTES // (8 * max(1, features)))


def scoring_threads(shards: int, cores: int, override: int | None = None) -> int:
    """Threads for one scoring task's model pools: `override` (BATCHSCORE_SCORING_THREADS)
    if set; in a pod of its own, all its cores; locally, cores / tasks running at once
    (never more tasks than shards, and past one per core each task gets one thread)."""
    if override:
        return override
    if remote():
        return cores
    return max(1, cores // max(1, min(shards, cores)))
