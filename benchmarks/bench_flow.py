"""BatchProcessingFlow as users run it, against the seed's way and the model floor.

    python benchmarks/bench_flow.py                     # 1,000,000 rows, one run of each
    python benchmarks/bench_flow.py --repeat 3          # paired runs, medians

Once: TrainModelsFlow (`--cv_folds 2`) into a temporary BATCHSCORE_HOME, and `--rows` rows
shaped like breast cancer written as one Parquet file. Then per repeat, each a fresh process
on the same rows, models and Redis (db 14 unless `--redis-url`; FLUSHDB before each run):

* **flow**: `python metaflow/batch_processing.py run --input_path ROWS --models all`, no
  other flag and no BATCHSCORE_SCORING_THREADS: the command's wall time, start-up included.
  Its log splits it into fixed cost (launcher and every step outside the foreach) and the
  foreach (first shard task started to last finished).
* **seed's way**: `workload.run_naive` with the recorded tree, svc, knn and logreg (the
  seed's four models): the process's wall time, start-up and model loading included.
* **model floor**: the five recorded models' `predict_proba` on the same rows, nothing
  else, split over the cores (one process per core, one thread each, rows and models loaded
  before the clock starts): from the first process starting to the last finishing.

Ratios are computed per repeat (each flow run against the runs right after it), then the
median: the machine's speed drifts between runs.
"""

from __future__ import annotations

import argparse
import compileall
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
from datetime import datetime
from pathlib import Path
from typing import Any

from workload import SEED_MODELS, flush, run_naive, write_rows

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "benchflow"
TARGET_VS_SEED = 3.0  # the flow at least this many times faster than the seed's way
TARGET_VS_FLOOR = 2.5  # the flow at most this many times the model floor (moonshot 2)
TARGET_FIXED = 6.0  # seconds: launcher plus every step outside the foreach
_TASK_LINE = re.compile(r"^(\S+ \S+) \[[^/]+/(\w+)/\d+ \(pid \d+\)\] Task (is starting|finished)")


def environment(work: Path, redis_url: str) -> dict[str, str]:
    """The configuration a user would export, everything under the temporary folder."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHSCORE_")}
    env.update(
        {
            "BATCHSCORE_HOME": str(work / "home"),
            "BATCHSCORE_STORE_URL": (work / "store").as_uri(),
            "BATCHSCORE_DATABASE_URL": f"sqlite:///{work / 'metrics.db'}",
            "BATCHSCORE_REDIS_URL": redis_url,
            "BATCHSCORE_REDIS_PREFIX": PREFIX,
            "METAFLOW_USER": "bench",
            "METAFLOW_DATASTORE_SYSROOT_LOCAL": str(work / "metaflow"),
            "METAFLOW_DEFAULT_DATASTORE": "local",
            "METAFLOW_DEFAULT_METADATA": "local",
            "PYTHONWARNINGS": "ignore::FutureWarning",
        }
    )
    return env


def redis_cpu(redis_url: str) -> float:
    """CPU seconds the Redis server has used so far (INFO cpu): its share of each way's work."""
    import redis

    info = redis.Redis.from_url(redis_url).info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def run(command: list[str], env: dict[str, str], cwd: Path) -> tuple[float, float, str]:
    """(wall seconds, CPU seconds of the command and every process it waited for, output)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    if done.returncode != 0:
        raise RuntimeError(
            f"{' '.join(command[:3])} failed:\n{done.stdout[-3000:]}{done.stderr[-5000:]}"
        )
    return seconds, cpu, done.stdout + done.stderr


# ------------------------------------------------------------------------------ the flow


def run_flow(rows: Path, env: dict[str, str], work: Path, redis_url: str) -> dict[str, Any]:
    command = [
        sys.executable,
        str(ROOT / "metaflow/batch_processing.py"),
        "run",
        "--input_path",
        str(rows),
        "--models",
        "all",
    ]
    redis_before = redis_cpu(redis_url)
    seconds, cpu, log = run(command, env, work)
    cpu += redis_cpu(redis_url) - redis_before
    steps: dict[str, list[float]] = {}
    for line in log.splitlines():
        found = _TASK_LINE.match(line)
        if found:
            at = datetime.fromisoformat(found.group(1)).timestamp()
            steps.setdefault(found.group(2), []).append(at)
    foreach = steps.get("batch_processing", [0.0])
    return {
        "wall": seconds,
        "cpu": cpu,
        "foreach": max(foreach) - min(foreach),
        "shard_tasks": len(foreach) // 2,
        "fixed": seconds - (max(foreach) - min(foreach)),
        "steps": {name: max(t) - min(t) for name, t in steps.items()},
    }


# ------------------------------------------------------------------------- seed's way


def naive_child(rows: str, redis_url: str) -> dict[str, Any]:
    """The seed's way with the flow's own recorded models (its four)."""
    from batchscore.batch.bundle import ModelBundle, load_models
    from batchscore.config import Settings

    bundle = load_models("all", Settings())
    models = [m for m in bundle.models if m.name in SEED_MODELS]
    seed = ModelBundle(bundle.training_run_id, models, bundle.feature_columns, bundle.classes)
    return run_naive(Path(rows), seed, redis_url)


# ------------------------------------------------------------------------ model floor


def _floor_part(part: int, parts: int, rows: str, barrier: Any, out: Any) -> None:
    """One core's share: load rows and models, wait for the others, then only predict."""
    import pyarrow.parquet as pq
    from threadpoolctl import threadpool_limits

    from batchscore.batch.bundle import load_models
    from batchscore.config import Settings

    bundle = load_models("all", Settings())
    table = pq.read_table(rows, columns=bundle.feature_columns)
    size = -(-table.num_rows // parts)
    features = table.slice(part * size, size).to_pandas()
    with threadpool_limits(limits=1):
        for m in bundle.models:
            m.estimator.predict_proba(features.iloc[:10])  # first-call costs, not timed
        barrier.wait()
        start, cpu = time.perf_counter(), time.process_time()
        for m in bundle.models:
            m.estimator.predict_proba(features)
        out.put((start, time.perf_counter(), time.process_time() - cpu, len(bundle.models)))


def model_floor(rows: Path, env: dict[str, str], cores: int) -> dict[str, Any]:
    os.environ.update(env)
    context = multiprocessing.get_context("spawn")
    barrier, out = context.Barrier(cores), context.Queue()
    workers = [
        context.Process(target=_floor_part, args=(i, cores, str(rows), barrier, out))
        for i in range(cores)
    ]
    for w in workers:
        w.start()
    spans = [out.get() for _ in workers]
    for w in workers:
        w.join()
    return {
        "wall": max(s[1] for s in spans) - min(s[0] for s in spans),
        "cpu": sum(s[2] for s in spans),
        "models": spans[0][3],
    }


# --------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=1, help="paired runs of each; medians")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/14")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--work", help="keep training and rows here (reused when present)")
    parser.add_argument("--json", help="also write the raw results to this file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:  # the seed's way, in a process of its own
        print(json.dumps(naive_child(args.child, args.redis_url)))
        return

    work = Path(args.work or tempfile.mkdtemp(prefix="batchscore-flow-bench-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = environment(work, args.redis_url)
    try:
        results = measure(args, work, env)
        report(results, args)
    finally:
        flush(args.redis_url)
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


def measure(args: argparse.Namespace, work: Path, env: dict[str, str]) -> dict[str, Any]:
    from batchscore.sizing import machine_cores

    def say(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    rows = work / f"rows-{args.rows}.parquet"
    if not rows.exists():
        say(f"writing {args.rows:,} rows ...")
        write_rows(rows, args.rows, args.seed)
    if not (work / "metrics.db").exists():
        say("TrainModelsFlow --cv_folds 2 ...")
        train = [sys.executable, str(ROOT / "metaflow/train_models.py"), "run", "--cv_folds", "2"]
        run(train, env, work)
    # Bytecode as a user's second run finds it: Python caches it on the first run, but
    # not where PYTHONDONTWRITEBYTECODE is set (containers, this sandbox), and each of the
    # flow's processes would compile the project again (~0.2 s each).
    compileall.compile_dir(ROOT / "src", quiet=1)
    cores = machine_cores()
    runs: dict[str, list[dict[str, Any]]] = {"flow": [], "seed": [], "floor": []}
    for i in range(args.repeat):
        say(f"run {i + 1}/{args.repeat}: the flow at its defaults ...")
        flush(args.redis_url)
        runs["flow"].append(run_flow(rows, env, work, args.redis_url))
        say(f"run {i + 1}/{args.repeat}: the seed's way ...")
        flush(args.redis_url)
        naive = [sys.executable, str(Path(__file__).resolve()), "--child", str(rows)]
        redis_before = redis_cpu(args.redis_url)
        seconds, cpu, out = run([*naive, "--redis-url", args.redis_url], env, work)
        cpu += redis_cpu(args.redis_url) - redis_before
        child = json.loads(out.strip().splitlines()[-1])
        runs["seed"].append({**child, "work": child["wall"], "wall": seconds, "cpu": cpu})
        flush(args.redis_url)
        say(f"run {i + 1}/{args.repeat}: the model floor ...")
        runs["floor"].append(model_floor(rows, env, cores))
    return {"rows": args.rows, "cores": cores, **runs}


def report(results: dict[str, Any], args: argparse.Namespace) -> None:
    flow, seed, floor = results["flow"], results["seed"], results["floor"]
    rows, cores, median = results["rows"], results["cores"], statistics.median
    vs_seed = [s["wall"] / f["wall"] for f, s in zip(flow, seed, strict=True)]
    vs_floor = [f["wall"] / m["wall"] for f, m in zip(flow, floor, strict=True)]
    fixed = [f["fixed"] for f in flow]

    def seconds(runs: list[dict[str, Any]], field: str = "wall") -> float:
        return median(r[field] for r in runs)

    table = [
        ("BatchProcessingFlow at its defaults (`--input_path`, `--models all`)", seconds(flow)),
        ("the seed's way (4 models, str + SHA-256 per row, one HSET pipeline)", seconds(seed)),
        (
            f"model floor ({floor[0]['models']} models' predict_proba on {cores} cores)",
            seconds(floor),
        ),
    ]
    print(f"\n**{rows:,} rows, {cores} cores, median of {len(flow)} paired run(s)**\n")
    print("| | seconds | rows/s | CPU seconds |\n|---|---:|---:|---:|")
    for (label, wall), runs in zip(table, (flow, seed, floor), strict=True):
        print(f"| {label} | {wall:.1f} | {rows / wall:,.0f} | {seconds(runs, 'cpu'):.1f} |")
    details = [
        ("flow: fixed cost (launcher and the steps outside the foreach)", median(fixed)),
        (f"flow: foreach ({flow[0]['shard_tasks']} shard tasks)", seconds(flow, "foreach")),
        *(
            (f"flow: step `{name}`", median(f["steps"].get(name, 0.0) for f in flow))
            for name in flow[0]["steps"]
            if name != "batch_processing"
        ),
        ("seed's way: its work alone (no start-up, no model loading)", seconds(seed, "work")),
    ]
    for label, value in details:
        print(f"| {label} | {value:.1f} | | |")

    print("\n| target | met | median (range) |\n|---|:---:|---:|")
    targets = [
        (f"flow >= {TARGET_VS_SEED:g}x the seed's way", median(vs_seed) >= TARGET_VS_SEED, vs_seed),
        (
            f"flow <= {TARGET_VS_FLOOR:g}x the model floor (moonshot 2x)",
            median(vs_floor) <= TARGET_VS_FLOOR,
            vs_floor,
        ),
        (f"fixed cost <= {TARGET_FIXED:g} s", median(fixed) <= TARGET_FIXED, fixed),
    ]
    for name, ok, values in targets:
        spread = f"{median(values):.2f} ({min(values):.2f} to {max(values):.2f})"
        print(f"| {name} | {'yes' if ok else 'no'} | {spread} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
