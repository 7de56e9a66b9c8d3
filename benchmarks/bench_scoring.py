"""Benchmark: batchscore's score-and-publish path against the common naive way, same Redis.

    python benchmarks/bench_scoring.py --rows 200000
    python benchmarks/bench_scoring.py --rows 200000 --repeat 3 --memory-rows 2000000 \
        --flow-rows 1000000

What runs, in one invocation and against one Redis server (db 14 by default; it is
flushed before each measured run and at the end, never FLUSHALL):

* Rows shaped like the breast-cancer features (sampled around the real rows, seeded),
  written to one Parquet file in a temporary folder.
* Four models (tree, svc, knn, logreg) tuned once with `train_model(cv_folds=2)`.
* batchscore: `plan_shards` (row-group reads, validation, Arrow IPC shards in a file://
  store), `score_shard` per shard in `--max-workers` processes (like the flow's
  foreach), then `OnlineStore.publish` + `retire` (the pointer switch).
* The naive way: the whole table in pandas, `' '.join(map(str, row))` hashed with
  SHA-256 in a Python loop, a dict of every row's prediction, one HSET per row in one
  giant redis-py pipeline (MULTI/EXEC, redis-py's default).
* Each measured run is a fresh child process, so its peak RSS is its own.
* The Redis write stage alone (`OnlineStore.write`, one process), redis-benchmark's
  pipelined SET rate (-P 64) on the same server, and 1,000-row lookups.
* Optionally the peak RSS for `--memory-rows`, and BatchProcessingFlow end to end on
  `--flow-rows` rows through Metaflow.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import re
import resource
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
from urllib.parse import urlparse

import joblib
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batchscore.batch import ModelBundle, plan_shards, score_shard, stage
from batchscore.config import Settings
from batchscore.keys import first_occurrences, hash_rows, row_keys
from batchscore.models import positive_proba
from batchscore.online import KEEP_VERSIONS, WRITE_CHUNK, OnlineStore, new_version, ttl_seconds
from batchscore.scoring import LoadedModel, encode_predictions

warnings.filterwarnings("ignore", category=FutureWarning)  # scikit-learn deprecations
ROOT = Path(__file__).resolve().parents[1]

MODELS = ("tree", "svc", "knn", "logreg")
PROJECT_PREFIX = "benchproj"
NAIVE_PREFIX = "benchnaive"
TTL_DAYS = 0.0  # the flow's default `ttl_days`: no TTL, keys retired by newer versions
OPT_IN_TTL = 30 * 86_400  # `--ttl_days 30`: every key written with SET ... EX
MIB = 1024 * 1024


# ----------------------------------------------------------------------------- inputs


def train_bundle(seed: int) -> ModelBundle:
    """The four models, tuned once on the real breast-cancer rows; champion first."""
    from batchscore.data import load_dataset
    from batchscore.models import choose_champion, dump_model, train_model

    data = load_dataset("breast_cancer")
    trained = {
        n: train_model(n, data.features, data.labels, cv_folds=2, random_state=seed) for n in MODELS
    }
    champion = choose_champion(trained)
    order = [champion] + [n for n in MODELS if n != champion]
    models = []
    for name in order:
        _, sha = dump_model(trained[name].estimator)
        models.append(LoadedModel(name, trained[name].estimator, sha))
    return ModelBundle("bench-training", models, list(data.features.columns), data.classes)


def write_rows(path: Path, rows: int, seed: int, row_group: int = 100_000) -> None:
    """`rows` rows around the breast-cancer feature distribution, written in row groups.

    Each row is a real row scaled by (1 + 5% noise) per feature, rounded to the number
    of decimals the real column uses: realistic values, predictions and string lengths.
    """
    from sklearn.datasets import load_breast_cancer

    frame = load_breast_cancer(as_frame=True).data.astype("float64")
    real = frame.to_numpy()
    decimals = [
        max(len(repr(float(v)).split(".")[1]) if "." in repr(float(v)) else 0 for v in col)
        for col in real.T
    ]
    rng = np.random.default_rng(seed)
    writer = None
    try:
        for start in range(0, rows, row_group):
            n = min(row_group, rows - start)
            picked = real[rng.integers(0, len(real), n)]
            values = picked * (1.0 + 0.05 * rng.standard_normal(picked.shape))
            columns = {
                name: np.round(values[:, j], decimals[j]) for j, name in enumerate(frame.columns)
            }
            table = pa.table(columns)
            if writer is None:
                writer = pq.ParquetWriter(path, table.schema)
            writer.write_table(table, row_group_size=row_group)
    finally:
        if writer is not None:
            writer.close()


def bench_env(work: Path, redis_url: str) -> dict[str, str]:
    return {
        "BATCHSCORE_HOME": str(work / "home"),
        "BATCHSCORE_STORE_URL": (work / "store").as_uri(),
        "BATCHSCORE_DATABASE_URL": f"sqlite:///{work / 'metrics.db'}",
        "BATCHSCORE_REDIS_URL": redis_url,
        "BATCHSCORE_REDIS_PREFIX": PROJECT_PREFIX,
        "BATCHSCORE_ID_COLUMN": "",
    }


def settings_for(work: Path, redis_url: str) -> Settings:
    os.environ.update(bench_env(work, redis_url))
    return Settings(_env_file=None)


def scoring_threads(workers: int) -> int:
    """BATCHSCORE_SCORING_THREADS for `workers` parallel scoring tasks on this machine."""
    return max(1, (os.cpu_count() or 1) // workers)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


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
    models = [LoadedModel(m.name, TimedEstimator(m.estimator), m.sha256) for m in bundle.models]
    return ModelBundle(bundle.training_run_id, models, bundle.feature_columns, bundle.classes)


# ------------------------------------------------------------------------ batchscore way


def _score_task(
    shard: int, uri: str, bundle: ModelBundle, version: str, ttl: int | None
) -> dict[str, Any]:
    """One shard in a worker process, as the flow's `batch_processing` step runs it."""
    _MODEL_SECONDS[0] = 0.0
    result = score_shard(shard, uri, bundle, version, Settings(_env_file=None), ttl)
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
        for shard in plan_shards(path.as_uri(), bundle.feature_columns, 5, "Warm/0", with_store):
            pa.ipc.open_file(pa.py_buffer(Path(urlparse(shard).path).read_bytes())).read_all()
    encode_predictions(bundle.models, frame, bundle.classes)
    first_occurrences(hash_rows(frame.to_numpy()))
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
        os.environ["BATCHSCORE_SCORING_THREADS"] = str(scoring_threads(workers))
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["batchscore.batch", "sklearn.svm", "sklearn.neighbors"])
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
        shards = plan_shards(uri, bundle.feature_columns, shard_rows, run_id, settings)
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
            "encode": total("predict") - models,
            "write": total("write"),
            "switch": (staged - start) + (end - scored),
        },
        "scoring_wall": scored - planned,
        "peak_mib": max([peak_rss_mib()] + [o["peak_mib"] for o in outcomes]),
        "parent_peak_mib": peak_rss_mib(),
        "worker_peak_mib": max(o["peak_mib"] for o in outcomes),
    }


# ----------------------------------------------------------------------------- naive way


def run_naive(parquet: Path, bundle: ModelBundle, redis_url: str) -> dict[str, Any]:
    """The common way the issue describes, doing the same work with the same models."""
    import redis

    client = redis.Redis.from_url(redis_url)
    models = bundle.models
    champion = models[0]
    stages: dict[str, float] = {}
    start = last = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal last
        now = time.perf_counter()
        stages[name] = now - last
        last = now

    frame = pd.read_parquet(parquet)
    features = frame[bundle.feature_columns]
    lap("read")
    predictions = {}
    for m in models:
        predictions[m.name] = (m.estimator.predict(features), positive_proba(m.estimator, features))
    lap("predict")
    keys = []
    for row in features.itertuples(index=False, name=None):
        keys.append(hashlib.sha256(" ".join(map(str, row)).encode()).hexdigest())
    lap("key")
    results: dict[str, dict[str, Any]] = {}
    labels, proba = predictions[champion.name]
    for i, key in enumerate(keys):
        results[key] = {
            "label": int(labels[i]),
            "class": bundle.classes[int(labels[i])],
            "proba": round(float(proba[i]), 6),
            "model": champion.name,
            "model_version": champion.version,
            "models": json.dumps(
                {
                    m.name: {
                        "label": int(predictions[m.name][0][i]),
                        "proba": round(float(predictions[m.name][1][i]), 6),
                        "model_version": m.version,
                    }
                    for m in models
                }
            ),
        }
    lap("encode")
    pipe = client.pipeline()
    for key, fields in results.items():
        pipe.hset(f"{NAIVE_PREFIX}:{key}", mapping=fields)
    pipe.execute()
    lap("write")
    stages["switch"] = 0.0
    return {
        "rows": len(frame),
        "keys": len(results),
        "wall": time.perf_counter() - start,
        "stages": stages,
        "peak_mib": peak_rss_mib(),
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


# ------------------------------------------------------------------------ side measures


def flush(redis_url: str) -> None:
    import redis

    redis.Redis.from_url(redis_url).flushdb()  # db of --redis-url only; never FLUSHALL


def redis_benchmark(redis_url: str, value_bytes: int, key_bytes: int) -> dict[str, float] | None:
    """redis-benchmark's pipelined SET rate (-P 64, its default 50 clients) on this server.

    `default`: its defaults (3-byte value, one key). `plain`: SET with our key and value
    sizes, random keys (what the default MSET write is held to). `same`: the command the
    opt-in TTL write sends, SET key value EX ttl, same sizes.
    """
    exe = shutil.which("redis-benchmark")
    if exe is None:
        return None
    url = urlparse(redis_url)
    base = [exe, "-h", url.hostname or "127.0.0.1", "-p", str(url.port or 6379), "-q"]
    if url.password:
        base += ["-a", url.password]
    base += ["--dbnum", (url.path or "/0").strip("/") or "0", "-P", "64"]
    many = ["-n", "400000", "-r", "100000000"]
    key = "k" * max(key_bytes - 12, 1) + "__rand_int__"  # __rand_int__ becomes 12 digits
    value = "v" * value_bytes
    variants = {
        "default": ["-t", "set", "-n", "2000000"],
        "plain": [*many, "SET", key, value],
        "same": [*many, "SET", key, value, "EX", str(OPT_IN_TTL)],
    }
    rates = {}
    for name, extra in variants.items():
        done = subprocess.run(base + extra, capture_output=True, text=True)
        found = re.findall(r"([\d.]+) requests per second", done.stdout.replace("\r", "\n"))
        rates[name] = float(found[-1]) if found else float("nan")
        flush(redis_url)
    return rates


def write_alone(
    bundle: ModelBundle, settings: Settings, parquet: Path, rows: int, chunks: list[int]
) -> dict[str, Any]:
    """`OnlineStore.write` by itself: one shard of real keys and values, medians of 5."""
    frame = pq.ParquetFile(parquet).read_row_group(0).to_pandas().iloc[:rows]
    features = frame[bundle.feature_columns]
    keys = row_keys(features.to_numpy())
    values = encode_predictions(bundle.models, features, bundle.classes)
    online = OnlineStore.from_settings(settings)
    version = new_version("BenchFlow/write")
    rates: dict[str, dict[int, float]] = {"ttl": {}, "no_ttl": {}}
    for chunk in chunks:
        for mode, ttl in (("ttl", OPT_IN_TTL), ("no_ttl", None)):
            runs = []
            for _ in range(5):
                flush(settings.redis_url)
                start = time.perf_counter()
                online.write(version, 0, keys, values, ttl, chunk=chunk)
                runs.append(len(keys) / (time.perf_counter() - start))
            rates[mode][chunk] = statistics.median(runs)
    # Steady state: a publish leaves KEEP_VERSIONS + 1 versions, and retire drops the oldest.
    flush(settings.redis_url)
    for i in range(KEEP_VERSIONS + 1):
        old = new_version(f"BenchFlow/retire-{i}")
        online.stage(old, {"model": bundle.champion})
        online.write(old, 0, keys, values)
        online.publish(old, len(keys), 1)
    start = time.perf_counter()
    retired = online.retire()
    retire_seconds = time.perf_counter() - start
    if len(retired) != 1:
        raise RuntimeError(f"retire removed {retired}, expected one version")
    flush(settings.redis_url)
    return {
        "retire_seconds": retire_seconds,
        "retire_keys_in_db": (KEEP_VERSIONS + 1) * len(keys),
        "rates": rates,
        "value_bytes": int(np.median(pc.binary_length(values).to_numpy())),
        "key_bytes": len(online.key(version, keys[0])),
        "keys": len(keys),
    }


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


def run_flow(rows: int, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """TrainModelsFlow (cv_folds 2), then BatchProcessingFlow timed on `rows` rows."""
    from batchscore.embedded_redis import stop_server

    flow_work = work / "flow"
    flow_work.mkdir()
    parquet = flow_work / "rows.parquet"
    write_rows(parquet, rows, args.seed)
    env = {
        **os.environ,
        **bench_env(flow_work, args.redis_url),
        "BATCHSCORE_REDIS_PREFIX": "benchflow",
        "METAFLOW_USER": "bench",
        "METAFLOW_DATASTORE_SYSROOT_LOCAL": str(flow_work / "metaflow"),
        "METAFLOW_DEFAULT_DATASTORE": "local",
        "METAFLOW_DEFAULT_METADATA": "local",
        "PYTHONWARNINGS": "ignore::FutureWarning",
        "BATCHSCORE_SCORING_THREADS": str(scoring_threads(args.max_workers)),
    }
    flush(args.redis_url)
    python = sys.executable
    train = [python, str(ROOT / "metaflow/train_models.py"), "--quiet", "run", "--cv_folds", "2"]
    started = time.perf_counter()
    done = subprocess.run(train, env=env, cwd=flow_work, capture_output=True, text=True)
    train_seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"TrainModelsFlow failed:\n{done.stderr[-5000:]}")
    score = [
        python,
        str(ROOT / "metaflow/batch_processing.py"),
        "--quiet",
        "run",
        "--max-workers",
        str(args.max_workers),
        "--input_path",
        str(parquet),
        "--models",
        "all",
        "--shard_rows",
        str(args.flow_shard_rows),
    ]
    started = time.perf_counter()
    done = subprocess.run(score, env=env, cwd=flow_work, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"BatchProcessingFlow failed:\n{done.stderr[-5000:]}")
    import redis

    client = redis.Redis.from_url(args.redis_url)
    keys = client.hgetall(f"benchflow:manifest:{client.get('benchflow:current').decode()}")
    written = sum(int(v) for k, v in keys.items() if k.startswith(b"shard:"))
    stop_server(Path(env["BATCHSCORE_HOME"]) / "redis.db")  # only if one was started
    flush(args.redis_url)
    return {"rows": rows, "seconds": seconds, "keys": written, "train_seconds": train_seconds}


# ------------------------------------------------------------------------------ report


STAGES = ("read", "predict", "key", "encode", "write", "switch")


def own_seconds(run: dict[str, Any]) -> float:
    """Everything except the models' predict calls (which cost the same in both ways)."""
    return sum(v for k, v in run["stages"].items() if k != "predict")


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-field medians over repeats."""
    out = dict(runs[len(runs) // 2])
    for field in ("wall", "own_wall", "peak_mib", "parent_peak_mib", "worker_peak_mib"):
        if field in out:
            out[field] = statistics.median(r[field] for r in runs)
    out["stages"] = {s: statistics.median(r["stages"].get(s, 0.0) for r in runs) for s in STAGES}
    return out


def naive_own(run: dict[str, Any]) -> float:
    return run["wall"] - run["stages"]["predict"]


def paired(ratios: list[tuple[float, float]]) -> list[tuple[float, float, float]]:
    """(median, min, max) of each column of per-run ratios."""
    return [(statistics.median(c), min(c), max(c)) for c in zip(*ratios, strict=True)]


def _stats(values: tuple[float, float, float]) -> dict[str, float]:
    return dict(zip(("median", "low", "high"), values, strict=True))


def ratio(a: float, b: float) -> str:
    return f"{a / b:.1f}x" if a > 0 and b > 0 else ""


def report(results: dict[str, Any], args: argparse.Namespace) -> None:
    naive, one, many = results["naive"], results["project_1"], results["project_n"]
    workers = args.max_workers
    rate = {k: r["rows"] / r["wall"] for k, r in (("naive", naive), ("one", one), ("many", many))}
    # Ratios pair each naive run with the batchscore runs that followed it (the machine's
    # speed drifts between runs), then take the median over the repeats.
    runs = (results["naive_runs"], results["project_1_runs"], results["project_n_runs"])
    pairs = list(zip(*runs, strict=True))
    end_to_end = paired([(n["wall"] / o["wall"], n["wall"] / m["wall"]) for n, o, m in pairs])
    own_ratio = paired(
        [(naive_own(n) / o["own_wall"], naive_own(n) / m["own_wall"]) for n, o, m in pairs]
    )
    head = ("", "naive", "batchscore, 1 process", f"batchscore, {workers} workers", "ratio")
    rows: list[tuple[str, ...]] = [
        ("rows scored", f"{naive['rows']:,}", f"{one['rows']:,}", f"{many['rows']:,}", ""),
        ("keys written", f"{naive['keys']:,}", f"{one['keys']:,}", f"{many['keys']:,}", ""),
        ("wall seconds", f"{naive['wall']:.2f}", f"{one['wall']:.2f}", f"{many['wall']:.2f}", ""),
        (
            "**rows/s end to end**",
            f"{rate['naive']:,.0f}",
            f"{rate['one']:,.0f} ({end_to_end[0][0]:.1f}x)",
            f"{rate['many']:,.0f} ({end_to_end[1][0]:.1f}x)",
            f"**{end_to_end[1][0]:.1f}x**",
        ),
    ]
    for name in STAGES:
        a, b, c = (r["stages"].get(name, 0.0) for r in (naive, one, many))
        rows.append((f"{name} s", f"{a:.3f}", f"{b:.3f}", f"{c:.3f}", ratio(a, b)))
    summed = [own_seconds(r) for r in (naive, one, many)]
    rows.append(
        (
            "own stages s, summed over shards (all but predict)",
            f"{summed[0]:.3f}",
            f"{summed[1]:.3f}",
            f"{summed[2]:.3f}",
            ratio(summed[0], summed[1]),
        )
    )
    own = [naive_own(naive), one["own_wall"], many["own_wall"]]
    rows.append(
        (
            "**own stages s, wall** (wall minus predict on the critical path)",
            f"{own[0]:.3f}",
            f"{own[1]:.3f} ({own_ratio[0][0]:.1f}x)",
            f"{own[2]:.3f} ({own_ratio[1][0]:.1f}x)",
            f"**{own_ratio[1][0]:.1f}x**",
        )
    )
    rows.append(
        (
            "peak RSS MiB (largest process)",
            f"{naive['peak_mib']:.0f}",
            f"{one['peak_mib']:.0f}",
            f"{many['peak_mib']:.0f}",
            "",
        )
    )

    extra: list[tuple[str, str]] = []
    write = results["write"]
    # The rate at the chunk size the code uses, not the sweep's best.
    best = {mode: rates[WRITE_CHUNK] for mode, rates in write["rates"].items()}
    for mode, label in (
        ("no_ttl", "MSET (default, no TTL)"),
        ("ttl", "SET EX (--ttl_days 30)"),
    ):
        sweep = ", ".join(f"{c}: {r:,.0f}" for c, r in write["rates"][mode].items())
        extra.append(
            (f"write stage alone, {write['keys']:,} keys, {label}: keys/s by chunk", sweep)
        )
    spread = "{median:.1f}x, median of {n} paired runs ({low:.1f}x to {high:.1f}x)"
    targets: list[tuple[str, bool, str]] = [
        (
            f"end to end >= 5x naive rows/s ({workers} workers)",
            end_to_end[1][0] >= 5,
            spread.format(n=len(pairs), **_stats(end_to_end[1])),
        ),
        (
            f"own stages (wall minus predict) >= 10x faster than naive's ({workers} workers)",
            own_ratio[1][0] >= 10,
            spread.format(n=len(pairs), **_stats(own_ratio[1])),
        ),
    ]
    extra.append(
        (
            f"retire one old version of {write['keys']:,} keys ({write['retire_keys_in_db']:,} "
            "keys in the db), s: housekeeping after a publish, readers already switched",
            f"{write['retire_seconds']:.3f}",
        )
    )
    bench = results.get("redis_benchmark")
    if bench:
        sizes = f"{write['key_bytes']}-byte keys, {write['value_bytes']}-byte values"
        for name, label in (
            ("default", "defaults: SET of a 3-byte value to one key"),
            ("plain", f"SET, {sizes}, random keys"),
            ("same", f"SET EX, {sizes}, random keys"),
        ):
            extra.append((f"redis-benchmark -P 64 -c 50, {label}: req/s", f"{bench[name]:,.0f}"))
        for mode, name in (
            ("no_ttl", "plain"),
            ("no_ttl", "default"),
            ("ttl", "same"),
            ("ttl", "default"),
        ):
            kind = "MSET" if mode == "no_ttl" else "SET EX"
            against = {"plain": "SET, same sizes", "same": "SET EX, same sizes"}.get(name, name)
            targets.append(
                (
                    f"write stage ({kind}) >= 1/2 redis-benchmark -P 64 ({against})",
                    best[mode] >= bench[name] / 2,
                    f"{best[mode] / bench[name]:.2f} of it",
                )
            )
    else:
        extra.append(("redis-benchmark", "not installed"))
    look = results["lookup"]
    extra.append(
        (
            f"lookup_rows, {look['rows']:,} rows in one call, ms (median / p95)",
            f"{look['median_ms']:.2f} / {look['p95_ms']:.2f}",
        )
    )
    targets.append(
        ("1,000-row lookup, median < 20 ms", look["median_ms"] < 20, f"{look['median_ms']:.2f} ms")
    )
    mem = results.get("memory")
    if mem:
        big = mem["big"]
        for field, label in (
            ("peak_mib", "largest process"),
            ("parent_peak_mib", "plan_shards + publish process"),
            ("worker_peak_mib", "score_shard workers"),
        ):
            growth = big[field] / many[field]
            extra.append(
                (
                    f"peak RSS MiB, {label}: {big['rows']:,} vs {many['rows']:,} rows",
                    f"{big[field]:.0f} vs {many[field]:.0f} ({growth:.2f}x)",
                )
            )
            targets.append(
                (
                    f"peak RSS ({label}), {big['rows']:,} rows <= 1.3x {many['rows']:,}",
                    growth <= 1.3,
                    f"{growth:.2f}x",
                )
            )
    flow = results.get("flow")
    if flow:
        extra.append(
            (
                f"BatchProcessingFlow, {flow['rows']:,} rows, models=all (5), shard_rows "
                f"{args.flow_shard_rows:,}, --max-workers {workers}",
                f"{flow['seconds']:.1f} s ({flow['rows'] / flow['seconds']:,.0f} rows/s), "
                f"{flow['keys']:,} keys",
            )
        )

    title = (
        f"{many['rows']:,} rows, 4 models (champion {results['champion']}), shard_rows "
        f"{args.shard_rows:,}, median of {args.repeat}"
    )
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        pass
    else:
        console = Console(stderr=False)
        table = Table(title=title)
        for i, col in enumerate(head):
            table.add_column(col, justify="left" if i == 0 else "right")
        for row in rows:
            table.add_row(*(c.replace("**", "") for c in row))
        console.print(table)
        side = Table(show_header=False)
        side.add_column()
        side.add_column(justify="right")
        for row in extra:
            side.add_row(*row)
        console.print(side)
        checks = Table(title="targets")
        for col in ("target", "met", "measured"):
            checks.add_column(col)
        for name, ok, value in targets:
            checks.add_row(name, "yes" if ok else "NO", value)
        console.print(checks)
    print()
    print(f"**{title}**")
    print()
    print("| " + " | ".join(head) + " |")
    print("|---|" + "---:|" * (len(head) - 1))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print()
    print("| measure | value |")
    print("|---|---:|")
    for row in extra:
        print(f"| {row[0]} | {row[1]} |")
    print()
    print("| target | met | measured |")
    print("|---|:---:|---:|")
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
    parser.add_argument(
        "--memory-rows",
        type=int,
        default=0,
        help="also the peak RSS for this many rows (e.g. 2000000); 0 = skip",
    )
    parser.add_argument(
        "--flow-rows",
        type=int,
        default=0,
        help="BatchProcessingFlow end to end on this many rows; 0 = skip",
    )
    parser.add_argument("--flow-shard-rows", type=int, default=250_000)
    parser.add_argument("--lookup-rows", type=int, default=1_000)
    parser.add_argument("--lookup-repeat", type=int, default=50)
    parser.add_argument(
        "--write-chunks",
        default="1000,2000,5000",
        help="comma-separated chunk sizes for the write-alone sweep",
    )
    parser.add_argument("--json", help="also write the raw results to this file")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--parquet", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args)
        return

    work = Path(tempfile.mkdtemp(prefix="batchscore-bench-"))
    try:
        results = measure(args, work)
        report(results, args)
    finally:
        flush(args.redis_url)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def measure(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    def say(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    say(f"training {', '.join(MODELS)} (cv_folds=2) ...")
    bundle = train_bundle(args.seed)
    joblib.dump(bundle, work / "bundle.joblib")
    settings = settings_for(work, args.redis_url)
    parquet = work / "rows.parquet"
    say(f"writing {args.rows:,} rows to {parquet} ...")
    write_rows(parquet, args.rows, args.seed)
    results: dict[str, Any] = {"champion": bundle.champion}

    say("write stage alone ...")
    chunks = [int(c) for c in args.write_chunks.split(",")]
    results["write"] = write_alone(bundle, settings, parquet, args.shard_rows, chunks)
    say("redis-benchmark ...")
    write = results["write"]
    results["redis_benchmark"] = redis_benchmark(
        args.redis_url, write["value_bytes"], write["key_bytes"]
    )

    runs: dict[str, list[dict[str, Any]]] = {"naive": [], "project_1": [], "project_n": []}
    for i in range(args.repeat):
        say(f"run {i + 1}/{args.repeat}: naive ...")
        runs["naive"].append(run_child("naive", parquet, work, args))
        say(f"run {i + 1}/{args.repeat}: batchscore, 1 process ...")
        runs["project_1"].append(run_child("project", parquet, work, args, 1))
        say(f"run {i + 1}/{args.repeat}: batchscore, {args.max_workers} workers ...")
        runs["project_n"].append(run_child("project", parquet, work, args, args.max_workers))
    for name, measured in runs.items():
        results[name] = median_run(measured)
        results[f"{name}_runs"] = measured
    counts = {name: results[name]["keys"] for name in runs}
    if len(set(counts.values())) != 1:
        raise RuntimeError(f"the ways wrote different numbers of keys: {counts}")
    say("lookups ...")  # the last batchscore run's version is still current
    results["lookup"] = lookup_latency(
        bundle, settings, parquet, args.lookup_rows, args.lookup_repeat
    )

    if args.memory_rows:
        say(f"peak RSS for {args.memory_rows:,} rows ...")
        big = work / "big.parquet"
        write_rows(big, args.memory_rows, args.seed)
        results["memory"] = {"big": run_child("project", big, work, args, args.max_workers)}
        big.unlink()
    if args.flow_rows:
        say(f"BatchProcessingFlow on {args.flow_rows:,} rows ...")
        results["flow"] = run_flow(args.flow_rows, work, args)
    return results


if __name__ == "__main__":
    main()
