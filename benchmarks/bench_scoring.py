"""Benchmark: batchscore's score-and-publish path against the seed's naive way, in process.

    python benchmarks/bench_scoring.py --rows 200000
    python benchmarks/bench_scoring.py --rows 200000 --repeat 5 --memory-rows 2000000

The library's own work, without Metaflow (`bench_flow.py` times the flow as users run it;
`bench_write.py` the Redis write stage alone). In one invocation, against one Redis server
(db 14 by default; FLUSHDB before each measured run and at the end, never FLUSHALL):

* `--rows` breast-cancer-shaped rows in one Parquet file, and the seed's four models
  (`workload.py`).
* batchscore: `plan_shards`, then `score_shard` per shard, in one process and in
  `--max-workers` processes (threads per worker: cores / workers, as the flow sizes them),
  then `OnlineStore.publish` + `retire`.
* the naive way (`workload.run_naive`), same models, rows and server.
* each measured run a fresh child process (its peak RSS is its own), runs paired and
  medians taken; then 1,000-row lookups, and optionally the peak RSS at `--memory-rows`.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from workload import flush, peak_rss_mib, run_naive, train_bundle, write_rows

from batchscore.batch.bundle import ModelBundle
from batchscore.batch.predictions import LoadedModel, predict_all
from batchscore.batch.publishing import stage
from batchscore.batch.scoring import score_shard
from batchscore.batch.shards import Shard, plan_shards, read_shard
from batchscore.config import Settings
from batchscore.online.store import OnlineStore, ttl_seconds
from batchscore.rows.keys import hash_rows
from batchscore.sizing import machine_cores, scoring_threads
from batchscore.versions import new_version

warnings.filterwarnings("ignore", category=FutureWarning)  # scikit-learn deprecations

PROJECT_PREFIX = "benchproj"
TTL_DAYS = 0.0  # the flow's default `ttl_days`: no TTL, keys retired by newer versions


def settings_for(work: Path, redis_url: str) -> Settings:
    os.environ.update(
        {
            "BATCHSCORE_HOME": str(work / "home"),
            "BATCHSCORE_STORE_URL": (work / "store").as_uri(),
            "BATCHSCORE_DATABASE_URL": f"sqlite:///{work / 'metrics.db'}",
            "BATCHSCORE_REDIS_URL": redis_url,
            "BATCHSCORE_REDIS_PREFIX": PROJECT_PREFIX,
            "BATCHSCORE_ID_COLUMN": "",
        }
    )
    return Settings(_env_file=None)


# ----------------------------------------------------------------- model-time accounting


_MODEL_SECONDS = [0.0]


class TimedEstimator:
    """Forwards to the estimator and adds the time of its predict calls to a counter.

    The models' own predict calls cost the same in both ways; timing them inside the
    real path lets the table split "predict" from the pipeline's own work.
    """

    def __init__(self, estimator: Any) -> None:
        self.estimator = estimator
        self.classes_ = estimator.classes_

    def predict(self, features: Any) -> np.ndarray:
        return self._timed(self.estimator.predict, features)

    def predict_proba(self, features: Any) -> np.ndarray:
        return self._timed(self.estimator.predict_proba, features)

    @staticmethod
    def _timed(call: Any, features: Any) -> np.ndarray:
        start = time.perf_counter()
        try:
            return call(features)
        finally:
            _MODEL_SECONDS[0] += time.perf_counter() - start


def timed_bundle(bundle: ModelBundle) -> ModelBundle:
    models = [
        LoadedModel(m.name, TimedEstimator(m.estimator), m.sha256, m.threshold)
        for m in bundle.models
    ]
    return ModelBundle(bundle.training_run_id, models, bundle.feature_columns, bundle.classes)


# ------------------------------------------------------------------------ batchscore way


def _score_task(
    shard: int, spec: Shard, bundle: ModelBundle, version: str, ttl: int | None
) -> dict[str, Any]:
    """One shard in a worker process, as the flow's `batch_processing` step runs it."""
    _MODEL_SECONDS[0] = 0.0
    result = score_shard(shard, spec, bundle, version, Settings(_env_file=None), ttl)
    return {
        "result": result,
        "model_seconds": _MODEL_SECONDS[0],
        "peak_mib": peak_rss_mib(),
        "finished": time.time(),
    }


def warm_up(bundle: ModelBundle) -> float:
    """First-call costs (lazy imports in pyarrow, pandas, scikit-learn) paid before timing.

    Done the same way in every measured process, so that neither way is charged for
    them; the flow timing, where each task is a fresh process, includes them.
    """
    tiny = pd.DataFrame(np.ones((10, len(bundle.feature_columns))), columns=bundle.feature_columns)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "tiny.parquet"
        pq.write_table(pa.Table.from_pandas(tiny, preserve_index=False), path)
        frame = pd.read_parquet(path)  # the naive way's reader
        store = (Path(folder) / "store").as_uri()
        with_store = Settings(_env_file=None, store_url=store, home=folder, redis_url="unused")
        for shard in plan_shards(
            path.as_uri(), bundle.feature_columns, 5, "Warm/0", with_store
        ).shards:
            list(read_shard(shard, with_store))
    predict_all(bundle.models, frame)
    hash_rows(frame.to_numpy())
    time.sleep(0.5)  # keeps this worker busy so that the pool starts every worker
    return peak_rss_mib()


def run_project(
    parquet: Path, bundle: ModelBundle, settings: Settings, shard_rows: int, workers: int
) -> dict[str, Any]:
    """plan_shards -> score_shard per shard (in parallel) -> publish; seconds per stage."""
    bundle = timed_bundle(bundle)
    online = OnlineStore.from_settings(settings)
    pool = None
    if workers > 1:
        # As the README advises for parallel tasks on one machine: cores / tasks threads each.
        os.environ["BATCHSCORE_SCORING_THREADS"] = str(scoring_threads(workers, machine_cores()))
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(
            ["batchscore.batch.scoring", "sklearn.svm", "sklearn.neighbors"]
        )
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=context)
        list(pool.map(warm_up, [bundle] * workers))  # workers started and warm: not timed
    try:
        start = time.perf_counter()
        run_id = f"BenchFlow/{time.time_ns()}"
        version = new_version(run_id)
        ttl = ttl_seconds(TTL_DAYS)
        uri = parquet.as_uri()
        stage(version, run_id, uri, bundle, settings, ttl)
        staged = time.perf_counter()
        shards = plan_shards(
            uri, bundle.feature_columns, shard_rows, run_id, settings, max_tasks=workers
        ).shards
        planned = time.perf_counter()
        if pool is None:
            outcomes = [_score_task(i, s, bundle, version, ttl) for i, s in enumerate(shards)]
        else:
            futures = [
                pool.submit(_score_task, i, s, bundle, version, ttl) for i, s in enumerate(shards)
            ]
            outcomes = [f.result() for f in futures]
        scored = time.perf_counter()
        results = [o["result"] for o in outcomes]
        keys = sum(r.keys_written for r in results)
        if not online.publish(version, keys, len(results)):
            raise RuntimeError("the benchmark's version was not published")
        online.retire()
        end = time.perf_counter()
    finally:
        if pool is not None:
            pool.shutdown()

    def total(name: str) -> float:
        return sum(r.seconds.get(name, 0.0) for r in results)

    models = sum(o["model_seconds"] for o in outcomes)
    # The predict time on the critical path: all of it in one process; with workers, that
    # of the worker that finished last (the run waited for it).
    last = max(outcomes, key=lambda o: o["finished"])
    critical = models if workers == 1 else last["model_seconds"]
    return {
        "rows": sum(r.rows_scored for r in results),
        "keys": keys,
        "version": version,
        "shards": len(results),
        "wall": end - start,
        "own_wall": end - start - critical,
        "stages": {
            "read": (planned - staged) + total("read"),
            "predict": models,
            "key": total("key"),
            "around predict": total("predict") - models,  # frames in and out of the models
            "profile": total("profile"),
            "write": total("write"),
            "switch": (staged - start) + (end - scored),
        },
        "scoring_wall": scored - planned,
        "peak_mib": max([peak_rss_mib()] + [o["peak_mib"] for o in outcomes]),
        "parent_peak_mib": peak_rss_mib(),
        "worker_peak_mib": max(o["peak_mib"] for o in outcomes),
    }


# ------------------------------------------------------------------------ child process


def child_main(args: argparse.Namespace) -> None:
    """One measured run in a fresh process; prints its result as JSON on the last line."""
    work = Path(args.work)
    bundle = joblib.load(work / "bundle.joblib")
    settings = settings_for(work, args.redis_url)
    parquet = Path(args.parquet)
    warm_up(bundle)
    if args.child == "naive":
        out = run_naive(parquet, bundle, args.redis_url)
    else:
        out = run_project(parquet, bundle, settings, args.shard_rows, args.max_workers)
    print(json.dumps(out))


def run_child(
    kind: str, parquet: Path, work: Path, args: argparse.Namespace, workers: int = 1
) -> dict[str, Any]:
    flush(args.redis_url)
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        kind,
        "--parquet",
        str(parquet),
        "--work",
        str(work),
        "--redis-url",
        args.redis_url,
        "--shard-rows",
        str(args.shard_rows),
        "--max-workers",
        str(workers),
    ]
    done = subprocess.run(command, capture_output=True, text=True, cwd=work)
    if done.returncode != 0:
        raise RuntimeError(f"{kind} run failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------ lookups


def lookup_latency(
    bundle: ModelBundle, settings: Settings, parquet: Path, rows: int, repeat: int
) -> dict[str, float]:
    """`OnlineStore.lookup_rows` of `rows` raw rows in one call: median and p95 ms."""
    frame = pq.ParquetFile(parquet).read_row_group(0).to_pandas()
    online = OnlineStore.from_settings(settings)
    rng = np.random.default_rng(0)
    timings = []
    found = 0
    for _ in range(repeat):
        sample = frame.iloc[rng.choice(len(frame), size=min(rows, len(frame)), replace=False)]
        start = time.perf_counter()
        got = online.lookup_rows(sample, bundle.feature_columns)
        timings.append((time.perf_counter() - start) * 1000)
        found += sum(v is not None for v in got)
    return {
        "median_ms": statistics.median(timings),
        "p95_ms": float(np.percentile(timings, 95)),
        "found": found / repeat,
        "rows": min(rows, len(frame)),
    }


# ------------------------------------------------------------------------------ report


STAGES = ("read", "key", "predict", "around predict", "profile", "write", "switch")


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-field medians over repeats."""
    out = dict(runs[len(runs) // 2])
    for field in ("wall", "own_wall", "peak_mib", "parent_peak_mib", "worker_peak_mib"):
        if field in out:
            out[field] = statistics.median(r[field] for r in runs)
    out["stages"] = {s: statistics.median(r["stages"].get(s, 0.0) for r in runs) for s in STAGES}
    return out


def naive_own(run: dict[str, Any]) -> float:
    """Everything except the models' predict calls, which cost the same in both ways."""
    return run["wall"] - run["stages"]["predict"]


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.1f}x ({min(values):.1f}x to {max(values):.1f}x)"


def report(results: dict[str, Any], args: argparse.Namespace) -> None:
    runs = [results[f"{k}_runs"] for k in ("naive", "project_1", "project_n")]
    naive, one, many = (median_run(r) for r in runs)
    workers = args.max_workers
    # Ratios pair each naive run with the batchscore runs right after it, then the median.
    pairs = list(zip(*runs, strict=True))
    end_to_end = [n["wall"] / m["wall"] for n, _, m in pairs]
    end_to_end_one = [n["wall"] / o["wall"] for n, o, _ in pairs]
    own = [naive_own(n) / m["own_wall"] for n, _, m in pairs]

    print(
        f"\n**{many['rows']:,} rows, 4 models, shard_rows {args.shard_rows:,}, "
        f"median of {args.repeat}**\n"
    )
    print(f"| | naive | batchscore, 1 process | batchscore, {workers} workers |")
    print("|---|---:|---:|---:|")
    table = [
        (
            "rows scored / keys written",
            *(f"{r['rows']:,} / {r['keys']:,}" for r in (naive, one, many)),
        )
    ]
    table.append(("wall seconds", *(f"{r['wall']:.2f}" for r in (naive, one, many))))
    table.append(("rows/s", *(f"{r['rows'] / r['wall']:,.0f}" for r in (naive, one, many))))
    for name in STAGES:
        table.append(
            (f"{name} s", *(f"{r['stages'].get(name, 0.0):.3f}" for r in (naive, one, many)))
        )
    table.append(
        (
            "own stages s, wall (wall minus predict on the critical path)",
            *(f"{v:.3f}" for v in (naive_own(naive), one["own_wall"], many["own_wall"])),
        )
    )
    table.append(
        ("peak RSS MiB (largest process)", *(f"{r['peak_mib']:.0f}" for r in (naive, one, many)))
    )
    for row in table:
        print("| " + " | ".join(row) + " |")

    look = results["lookup"]
    targets = [
        (
            f"end to end >= 5x naive rows/s ({workers} workers)",
            statistics.median(end_to_end) >= 5,
            spread(end_to_end),
        ),
        ("end to end, 1 process (no target)", True, spread(end_to_end_one)),
        (
            f"own stages >= 10x faster than naive's ({workers} workers)",
            statistics.median(own) >= 10,
            spread(own),
        ),
        (
            "1,000-row lookup, median < 20 ms",
            look["median_ms"] < 20,
            f"{look['median_ms']:.2f} ms (p95 {look['p95_ms']:.2f})",
        ),
    ]
    if "memory" in results:
        big = results["memory"]["big"]
        for field, label in (
            ("parent_peak_mib", "plan_shards + publish process"),
            ("worker_peak_mib", "score_shard workers"),
        ):
            growth = big[field] / many[field]
            targets.append(
                (
                    f"peak RSS ({label}), {big['rows']:,} rows <= 1.3x {many['rows']:,}",
                    growth <= 1.3,
                    f"{big[field]:.0f} vs {many[field]:.0f} MiB ({growth:.2f}x)",
                )
            )
    print("\n| target | met | measured: median (range) |\n|---|:---:|---:|")
    for name, ok, value in targets:
        print(f"| {name} | {'yes' if ok else 'no'} | {value} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))


# -------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--shard-rows", type=int, default=100_000)
    parser.add_argument("--max-workers", type=int, default=2, help="shards scored in parallel")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/14")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each way; medians shown")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--memory-rows", type=int, default=0, help="also peak RSS at this size")
    parser.add_argument("--json", help="also write the raw results to this file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--parquet", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args)
        return
    work = Path(tempfile.mkdtemp(prefix="batchscore-bench-"))
    try:
        report(measure(args, work), args)
    finally:
        flush(args.redis_url)
        shutil.rmtree(work, ignore_errors=True)


def measure(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    def say(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    say("training tree, svc, knn, logreg (cv_folds=2) ...")
    bundle = train_bundle(args.seed)
    joblib.dump(bundle, work / "bundle.joblib")
    settings = settings_for(work, args.redis_url)
    parquet = work / "rows.parquet"
    say(f"writing {args.rows:,} rows ...")
    write_rows(parquet, args.rows, args.seed)
    results: dict[str, Any] = {"champion": bundle.champion}
    for i in range(args.repeat):
        for name, kind, workers in (
            ("naive", "naive", 1),
            ("project_1", "project", 1),
            ("project_n", "project", args.max_workers),
        ):
            say(f"run {i + 1}/{args.repeat}: {name} ...")
            results.setdefault(f"{name}_runs", []).append(
                run_child(kind, parquet, work, args, workers)
            )
    counts = {r["keys"] for k in ("naive", "project_1", "project_n") for r in results[f"{k}_runs"]}
    if len(counts) != 1:
        raise RuntimeError(f"the ways wrote different numbers of keys: {counts}")
    say("lookups ...")  # the last batchscore run's version is still current
    results["lookup"] = lookup_latency(bundle, settings, parquet, 1_000, 50)
    if args.memory_rows:
        say(f"peak RSS for {args.memory_rows:,} rows ...")
        big = work / "big.parquet"
        write_rows(big, args.memory_rows, args.seed)
        results["memory"] = {"big": run_child("project", big, work, args, args.max_workers)}
    return results


if __name__ == "__main__":
    main()
