"""What TrainModelsFlow's steps do: prepare the split, evaluate, save models and records."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from batchscore.batch.drift import ReferenceProfile
from batchscore.config import Settings
from batchscore.storage.object_store import ObjectStore
from batchscore.training.datasets import Dataset, load_dataset
from batchscore.training.models import TrainedModel


@dataclass
class PreparedData:
    """The split every branch trains and is evaluated on, and where its test rows went."""

    dataset: str
    feature_columns: list[str]
    classes: tuple[str, str]
    train_features: pd.DataFrame
    train_labels: np.ndarray
    test_features: pd.DataFrame
    test_labels: np.ndarray
    batch_input_uri: str = ""
    batch_labels_uri: str = ""


def prepare_data(
    source: str,
    target: str | None,
    test_size: float,
    random_state: int,
    settings: Settings,
    positive_class: str | None = None,
    run_id: str = "local",
) -> PreparedData:
    """Load, split (stratified), and publish the test split as the default batch input.

    The split goes under the run's own path (`data/<run>/<dataset>.csv`), never shared:
    a later run, even one that fails, cannot change the data an earlier batch was scored on.
    """
    from sklearn.model_selection import train_test_split  # here: every task imports this file

    dataset: Dataset = load_dataset(source, target, positive_class, settings)
    if not 0 < test_size < 1:
        raise ValueError(f"test_size must be between 0 and 1, not {test_size}")
    x_train, x_test, y_train, y_test = train_test_split(
        dataset.features,
        dataset.labels,
        test_size=test_size,
        random_state=random_state,
        stratify=dataset.labels,
    )
    prepared = PreparedData(
        dataset=dataset.name,
        feature_columns=list(dataset.features.columns),
        classes=dataset.classes,
        train_features=x_train.reset_index(drop=True),
        train_labels=np.asarray(y_train),
        test_features=x_test.reset_index(drop=True),
        test_labels=np.asarray(y_test),
    )
    store = ObjectStore.from_settings(settings)
    folder = f"data/{run_id.replace('/', '-')}"
    prepared.batch_input_uri = store.put_bytes(
        f"{folder}/{dataset.name}.csv", _csv(prepared.test_features)
    )
    labels = pd.DataFrame(
        {"label": prepared.test_labels, "class": [dataset.classes[i] for i in prepared.test_labels]}
    )
    prepared.batch_labels_uri = store.put_bytes(f"{folder}/{dataset.name}.labels.csv", _csv(labels))
    return prepared


def _csv(frame: pd.DataFrame) -> bytes:
    # Python's shortest round-trip repr: the published values parse back bit-for-bit,
    # so keys computed from the CSV equal keys computed from the DataFrame.
    buffer = io.StringIO()
    frame.to_csv(buffer, index=False, float_format=None)
    return buffer.getvalue().encode()


def evaluate_all(
    trained: dict[str, TrainedModel], data: PreparedData
) -> tuple[dict[str, dict[str, Any]], dict[str, bytes]]:
    """Every model on the test split: full results (for the card) and PNG figures."""
    from batchscore.training.evaluation import evaluate_model, figures  # matplotlib: this step only

    results = {
        name: evaluate_model(model.estimator, data.test_features, data.test_labels, model.threshold)
        for name, model in trained.items()
    }
    return results, figures(results, data.test_labels, data.classes)


@dataclass(frozen=True)
class SavedTraining:
    champion: str
    model_uris: dict[str, str]
    plot_uris: dict[str, str]


def save_training(
    run_id: str,
    trained: dict[str, TrainedModel],
    metrics: dict[str, dict[str, float]],
    pngs: dict[str, bytes],
    champion: str,
    data: PreparedData,
    settings: Settings,
    target: str | None = None,
    profile: ReferenceProfile | None = None,
) -> SavedTraining:
    """Models and plots to the store, then metrics and the champion to the database.

    Store first: a database row never points at an object that is not there yet.
    `profile`: the champion's `reference_profile`, when the caller already built it.
    """
    store = ObjectStore.from_settings(settings)
    folder = run_id.replace("/", "-")
    rows: dict[str, dict[str, Any]] = {}
    model_uris: dict[str, str] = {}
    for name, model in trained.items():
        blob, sha256 = model.joblib_bytes()
        model_uris[name] = store.put_bytes(f"models/{folder}/{name}.joblib", blob)
        rows[name] = {
            **metrics[name],
            "cv_score": model.cv_score,
            "best_params": _jsonable(model.best_params),
            "threshold": model.threshold,
            "model_uri": model_uris[name],
            "model_sha256": sha256,
        }
    plot_uris = {file: store.put_bytes(f"plots/{folder}/{file}", png) for file, png in pngs.items()}
    # The yardstick for the batch flow's drift gate, stored and checked like a model.
    profile = profile or reference_profile(trained[champion], data)
    profile_uri = store.put_bytes(f"models/{folder}/profile.json", profile.to_json())
    run = {
        "dataset": data.dataset,
        "target": target,
        "negative_class": data.classes[0],
        "positive_class": data.classes[1],
        "feature_columns": data.feature_columns,
        "n_train": len(data.train_labels),
        "n_test": len(data.test_labels),
        "batch_input_uri": data.batch_input_uri,
        "profile_uri": profile_uri,
        "profile_sha256": profile.sha256(),
    }
    from batchscore.storage.tracking import Tracker  # SQLAlchemy: not in the branches

    with Tracker(settings.resolved_database_url) as tracker:
        tracker.record_training(run_id, run, rows, champion)
    return SavedTraining(champion=champion, model_uris=model_uris, plot_uris=plot_uris)


def reference_profile(champion: TrainedModel, data: PreparedData) -> ReferenceProfile:
    """The training features' bins and the champion's scores on the rows it learned from."""
    from batchscore.training.models import positive_proba

    scores = positive_proba(champion.estimator, data.train_features)
    return ReferenceProfile.build(
        data.train_features.to_numpy(), data.feature_columns, scores, champion.name
    )


def _jsonable(params: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in params.items()}
