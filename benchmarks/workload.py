"""What the benchmarks share: the input rows, the models, and the seed's (naive) way.

* `write_rows`: rows shaped like the breast-cancer features (a real row scaled by
  1 + 5% noise per feature, rounded like the real column, seeded), as one Parquet file.
* `train_bundle`: tree, svc, knn and logreg tuned once with `train_model(cv_folds=2)`.
* `run_naive`: the seed's way: the whole table in pandas, `' '.join(map(str, row))` hashed
  with SHA-256 per row, a dict of every row's prediction (every model), one HSET per row
  in one redis-py pipeline (MULTI/EXEC, its default).
"""

from __future__ import annotations

import hashlib
import json
import resource
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from batchscore.batch.bundle import ModelBundle
from batchscore.batch.predictions import LoadedModel
from batchscore.training.models import positive_proba

SEED_MODELS = ("tree", "svc", "knn", "logreg")  # the seed's four models
NAIVE_PREFIX = "benchnaive"


def write_rows(path: Path, rows: int, seed: int, row_group: int = 100_000) -> None:
    """`rows` rows around the breast-cancer feature distribution, written in row groups."""
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


def train_bundle(seed: int) -> ModelBundle:
    """The seed's four models, tuned once on the real breast-cancer rows; champion first."""
    from batchscore.training.datasets import load_dataset
    from batchscore.training.models import choose_champion, dump_model, train_model

    data = load_dataset("breast_cancer")
    trained = {
        n: train_model(n, data.features, data.labels, cv_folds=2, random_state=seed)
        for n in SEED_MODELS
    }
    champion = choose_champion(trained)
    order = [champion] + [n for n in SEED_MODELS if n != champion]
    models = []
    for name in order:
        _, sha = dump_model(trained[name].estimator)
        models.append(LoadedModel(name, trained[name].estimator, sha, trained[name].threshold))
    return ModelBundle("bench-training", models, list(data.features.columns), data.classes)


def first_layout_values(outputs: Sequence[Any], classes: Sequence[str]) -> pa.StringArray:
    """The first layout's JSON value per row, built as its writer built them (Arrow
    kernels joining literal pieces and probabilities cast to text), for the benchmarks'
    baseline: `predict_all`'s outputs, champion on top, every model under "models" when
    there are several. Probabilities rounded to 6 decimals; the library no longer writes
    these, it only reads versions written so."""
    import pyarrow.compute as pc

    def number(proba: np.ndarray) -> pa.Array:
        return pc.cast(pa.array(np.round(proba, 6)), pa.string())

    def heads(before: str) -> pa.Array:
        """The text before a probability, one per label (picked per row by `take`)."""
        c = [json.dumps(c) for c in classes]
        return pa.array([f'{before}{{"label":{i},"class":{c[i]},"proba":' for i in (0, 1)])

    champion, labels, proba = outputs[0]
    parts: list[Any] = [
        heads("").take(pa.array(labels)),
        number(proba),
        f',"threshold":{json.dumps(float(champion.threshold))},"model":'
        f'{json.dumps(champion.name)},"model_version":"{champion.version}"',
    ]
    if len(outputs) > 1:
        parts.append(',"models":{')
        for i, (model, model_labels, model_proba) in enumerate(outputs):
            name = ("," if i else "") + json.dumps(model.name) + ":"
            parts += [
                heads(name).take(pa.array(model_labels)),
                number(model_proba),
                f',"threshold":{json.dumps(float(model.threshold))}'
                f',"model_version":"{model.version}"}}',
            ]
        parts.append("}")
    parts.append("}")
    return pc.binary_join_element_wise(*parts, "")


def flush(redis_url: str) -> None:
    """Empty the benchmark's own database (FLUSHDB of --redis-url's db, never FLUSHALL)."""
    import redis

    redis.Redis.from_url(redis_url, socket_timeout=None).flushdb()


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_naive(parquet: Path, bundle: ModelBundle, redis_url: str) -> dict[str, Any]:
    """The seed's way, with the same models, rows and Redis; seconds per stage."""
    import redis

    client = redis.Redis.from_url(redis_url, socket_timeout=None)  # one giant pipeline
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
