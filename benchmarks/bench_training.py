"""Training cost: each branch's fit time by table size, and the whole flow from the shell.

    python benchmarks/bench_training.py                     # branches at 1k, 10k, 100k rows
    python benchmarks/bench_training.py --rows 1000 10000   # smaller sizes only
    python benchmarks/bench_training.py --flow              # TrainModelsFlow end to end

Branches: `train_model` as one flow branch runs it (grid search, threshold tuning, refit;
5 folds), one process on one core, on `make_classification` tables with 30 features and
10% positives. Each branch runs alone: with the machine shared, the median of `--repeat`
runs is printed. Target: no branch over 10 minutes at 100k rows.

Flow (`--flow`): `python metaflow/train_models.py run` as a user types it, process
start-up included, on a table shaped like a real insurance one (5,822 rows x 85 integer
features, ~6% "Yes") and on breast cancer. Targets: <= 90 s and <= 30 s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.datasets import make_classification

from batchscore.training.models import MODEL_NAMES, SAMPLE_ROWS, train_model

ROOT = Path(__file__).resolve().parents[1]


def branch_table(rows: int) -> tuple[pd.DataFrame, np.ndarray]:
    x, y = make_classification(
        n_samples=rows, n_features=30, n_informative=8, weights=[0.9], random_state=0
    )
    return pd.DataFrame(x, columns=[f"f{i:02d}" for i in range(30)]), y


def time_branches(sizes: list[int], repeat: int) -> None:
    print(f"Branch fit time, seconds (median of {repeat}; svc and knn sample {SAMPLE_ROWS:,} rows)")
    print(f"{'rows':>8} " + " ".join(f"{name:>8}" for name in MODEL_NAMES))
    for rows in sizes:
        features, labels = branch_table(rows)
        cells = []
        for name in MODEL_NAMES:
            runs = []
            for _ in range(repeat):
                start = time.perf_counter()
                train_model(name, features, labels, n_jobs=1)
                runs.append(time.perf_counter() - start)
            cells.append(f"{statistics.median(runs):8.1f}")
        print(f"{rows:>8,} " + " ".join(cells), flush=True)


def insurance_like_table(path: Path) -> None:
    """5,822 rows x 85 small integer codes, ~6% "Yes": weak, overlapping classes."""
    x, y = make_classification(
        n_samples=5822,
        n_features=85,
        n_informative=8,
        n_redundant=20,
        weights=[0.955],
        flip_y=0.04,
        class_sep=0.4,
        random_state=7,
    )
    levels = np.random.default_rng(7).integers(2, 10, size=85)
    codes = np.clip(np.round((x + 2.5) / 5 * levels), 0, levels).astype(int)
    frame = pd.DataFrame(codes, columns=[f"f{i:02d}" for i in range(85)])
    frame["y"] = np.where(y == 1, "Yes", "No")
    frame.to_csv(path, index=False)


def time_flow(args: list[str], work: Path) -> float:
    """Wall time of one `train_models.py run`, with its own embedded home and datastore."""
    env = {
        **os.environ,
        "BATCHSCORE_HOME": str(work / "home"),
        "METAFLOW_DATASTORE_SYSROOT_LOCAL": str(work / "metaflow"),
        "METAFLOW_USER": os.environ.get("METAFLOW_USER", "bench"),
    }
    command = [sys.executable, str(ROOT / "metaflow" / "train_models.py"), "run", *args]
    start = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=work, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return seconds


def time_flows(repeat: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        table = Path(folder) / "insurance_like.csv"
        insurance_like_table(table)
        cases = {
            "5,822 x 85, 6% Yes": [
                "--dataset",
                str(table),
                "--target",
                "y",
                "--positive_class",
                "Yes",
            ],
            "breast cancer": [],
        }
        print(f"TrainModelsFlow from the shell, seconds (median of {repeat})")
        for label, args in cases.items():
            runs = []
            for i in range(repeat):
                work = Path(folder) / f"{label[:6].strip()}-{i}"
                work.mkdir()
                runs.append(time_flow(args, work))
            cells = " ".join(f"{s:.1f}" for s in runs)
            print(f"{label:>20}: {statistics.median(runs):6.1f}   (runs: {cells})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--flow", action="store_true", help="time the whole flow instead")
    args = parser.parse_args()
    if args.flow:
        time_flows(args.repeat)
    else:
        time_branches(args.rows, args.repeat)


if __name__ == "__main__":
    main()
