"""Scoring, and the prediction readers get for each scored row (written through the real
store, read back): champion on top, every model under "models"."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable

import numpy as np
import pandas as pd
import pytest
from sklearn.frozen import FrozenEstimator
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import FixedThresholdClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.tree import DecisionTreeClassifier

from batchscore.batch.predictions import LoadedModel, predict, predict_all
from batchscore.online.store import OnlineStore
from batchscore.training.datasets import load_dataset
from batchscore.training.models import (
    MODEL_NAMES,
    labels_at,
    model_zoo,
    positive_proba,
    train_model,
)
from batchscore.versions import new_version

CLASSES = ("benign", "malignant")
ID_SCHEME = {"key_scheme": "id", "id_column": "id"}  # rows named by text ids


@pytest.fixture(scope="module")
def rows_and_models():
    dataset = load_dataset("breast_cancer")
    train, rows = dataset.features.iloc[::3], dataset.features.iloc[1::40].reset_index(drop=True)
    labels = dataset.labels[::3]
    logreg = make_pipeline(StandardScaler(), LogisticRegression()).fit(train, labels)
    tree = make_pipeline(StandardScaler(), DecisionTreeClassifier(max_depth=2)).fit(train, labels)
    models = [
        LoadedModel("logreg", logreg, hashlib.sha256(b"logreg").hexdigest(), threshold=0.2),
        LoadedModel("tree", tree, hashlib.sha256(b"tree").hexdigest(), threshold=0.75),
    ]
    return rows, models


def test_loaded_model_version_is_a_short_hash():
    model = LoadedModel("svc", None, "ab" * 32)
    assert model.version == "abababababab"


def test_predict_returns_labels_and_positive_probabilities(rows_and_models):
    rows, (logreg, _) = rows_and_models
    labels, proba = predict(logreg, rows)
    np.testing.assert_array_equal(labels, _reference_labels(logreg, rows))
    np.testing.assert_array_equal(proba, positive_proba(logreg.estimator, rows))
    assert labels.dtype == np.int64
    # The recorded threshold, not predict()'s 0.5: some rows differ between the two.
    assert (labels != logreg.estimator.predict(rows)).any()


def _reference_labels(model: LoadedModel, rows) -> np.ndarray:
    """scikit-learn's own thresholded predict (`>=` on predict_proba) at the model's threshold."""
    fixed = FixedThresholdClassifier(
        FrozenEstimator(model.estimator), threshold=model.threshold, response_method="predict_proba"
    )
    return fixed.fit(rows, np.arange(len(rows)) % 2).predict(rows)


@pytest.fixture
def serve(redis_client, redis_prefix) -> Callable[..., list[dict]]:
    """What readers get for rows scored by `models`: `predict_all` written by the real
    store's writer into a version of their own, published, and read back with `get_many`.

    `serve.text(i)` is row i's JSON text as the HTTP service sends it (`Layout.json`).
    """
    store = OnlineStore(redis_client, redis_prefix)

    def serve_rows(
        models: list[LoadedModel], rows: pd.DataFrame, classes: tuple[str, str] = CLASSES
    ) -> list[dict]:
        version = new_version("BatchProcessingFlow/1")
        meta = {"model": models[0].name, "classes": list(classes), **ID_SCHEME}
        store.stage(version, meta)
        keys = [f"row{i}" for i in range(len(rows))]
        assert store.write(version, 0, keys, predict_all(models, rows)) == len(keys)
        assert store.publish(version, len(keys), 1)
        return store.get_many(keys)

    def text(index: int) -> bytes:
        layout = store.layout()
        name, field = layout.locate(f"row{index}")
        return layout.json(store.client.hget(name, field))

    serve_rows.store, serve_rows.text = store, text  # type: ignore[attr-defined]
    return serve_rows


def test_one_model(rows_and_models, serve):
    rows, (logreg, _) = rows_and_models
    values = serve([logreg], rows)
    assert len(values) == len(rows)
    expected_labels = _reference_labels(logreg, rows)
    expected_proba = positive_proba(logreg.estimator, rows)
    for decoded, label, proba in zip(values, expected_labels, expected_proba, strict=True):
        assert set(decoded) == {"label", "class", "proba", "threshold", "model", "model_version"}
        assert decoded["threshold"] == 0.2
        assert decoded["label"] == int(decoded["proba"] >= decoded["threshold"])
        assert decoded["label"] == int(label)
        assert decoded["class"] == CLASSES[int(label)]
        assert decoded["proba"] == pytest.approx(float(proba), abs=1e-6)
        assert decoded["model"] == "logreg"
        assert decoded["model_version"] == logreg.sha256[:12]
    assert {v["class"] for v in values} == set(CLASSES)  # both classes occur


def test_several_models_champion_on_top(rows_and_models, serve):
    rows, models = rows_and_models
    values = serve(models, rows)
    for name, model in (("logreg", models[0]), ("tree", models[1])):
        labels = _reference_labels(model, rows)
        proba = positive_proba(model.estimator, rows)
        for decoded, label, p in zip(values, labels, proba, strict=True):
            entry = decoded["models"][name]
            assert set(entry) == {"label", "class", "proba", "threshold", "model_version"}
            assert entry["label"] == int(label)
            assert entry["class"] == CLASSES[entry["label"]]
            assert entry["proba"] == pytest.approx(float(p), abs=1e-6)
            assert entry["threshold"] == model.threshold
            assert entry["model_version"] == model.version
    for decoded in values:
        assert list(decoded["models"]) == ["logreg", "tree"]
        assert decoded["model"] == "logreg"
        assert decoded["label"] == decoded["models"]["logreg"]["label"]
        assert decoded["proba"] == decoded["models"]["logreg"]["proba"]
        assert decoded["threshold"] == decoded["models"]["logreg"]["threshold"]
        assert decoded["class"] == CLASSES[decoded["label"]]
    # The models disagree somewhere on probability: each entry is its own prediction.
    assert any(d["models"]["logreg"]["proba"] != d["models"]["tree"]["proba"] for d in values)
    # The service's JSON text keeps the champion first too.
    assert list(json.loads(serve.text(0))["models"]) == ["logreg", "tree"]


def test_class_names_come_from_the_classes_tuple(rows_and_models, serve):
    rows, (logreg, _) = rows_and_models
    odd = ('no "finding"', "finding é")  # quotes and non-ASCII survive JSON encoding
    values = serve([logreg], rows, odd)
    assert {v["class"] for v in values} == set(odd)
    for value in values:
        assert value["class"] == odd[value["label"]]
    texts = [json.loads(serve.text(i)) for i in range(len(rows))]
    assert texts == values


class _Constant:
    """A model whose positive-class probability is `proba` for every row."""

    classes_ = np.array([0, 1])

    def __init__(self, proba: float) -> None:
        self.proba = proba

    def predict_proba(self, x):
        return np.column_stack([np.full(len(x), 1 - self.proba), np.full(len(x), self.proba)])


@pytest.mark.parametrize("proba", [np.nan, np.inf, -np.inf])
def test_a_nan_or_infinite_probability_is_refused_before_anything_is_written(
    rows_and_models, serve, proba
):
    rows, (logreg, _) = rows_and_models
    store = serve.store
    version = new_version("BatchProcessingFlow/1")
    store.stage(version, {"model": logreg.name, "classes": list(CLASSES), **ID_SCHEME})
    broken = LoadedModel("broken", _Constant(proba), "0" * 64)
    keys = [f"row{i}" for i in range(len(rows))]
    for models in ([broken], [logreg, broken]):  # the champion's, or another model's
        with pytest.raises(ValueError, match="'broken' returned a probability that is NaN"):
            store.write(version, 0, keys, predict_all(models, rows))
    _assert_nothing_written(store, version)


@pytest.mark.parametrize("threshold", [-0.1, 1.5, float("nan")])
def test_a_threshold_outside_zero_one_is_refused_before_anything_is_written(
    rows_and_models, serve, threshold
):
    rows, (logreg, _) = rows_and_models
    store = serve.store
    version = new_version("BatchProcessingFlow/1")
    store.stage(version, {"model": logreg.name, "classes": list(CLASSES), **ID_SCHEME})
    odd = LoadedModel("odd", logreg.estimator, "1" * 64, threshold=threshold)
    keys = [f"row{i}" for i in range(len(rows))]
    for models in ([odd], [logreg, odd]):
        with pytest.raises(ValueError, match=r"'odd' has threshold .*, outside \[0, 1\]"):
            store.write(version, 0, keys, predict_all(models, rows))
    _assert_nothing_written(store, version)


def _assert_nothing_written(store: OnlineStore, version: str) -> None:
    """A refused block left no rows, no models and no shard count in the version."""
    layout = store.layout(version)
    assert layout.models == []
    assert store.manifest_field(version, "shard:0") is None
    assert not any(store.client.exists(f"{layout.rows}{b}") for b in range(layout.buckets))


def test_probabilities_keep_six_decimals_in_their_shortest_form(rows_and_models, serve):
    rows, (logreg, _) = rows_and_models
    serve([logreg], rows.iloc[:1])
    value = serve.text(0).decode()
    proba = positive_proba(logreg.estimator, rows.iloc[:1])[0]
    assert f'"proba":{round(float(proba), 6)!r}' in value
    assert len(repr(float(proba))) > len(repr(round(float(proba), 6)))  # it was rounded


def _table_with_a_contradiction() -> tuple[pd.DataFrame, np.ndarray]:
    """Two classes to learn, plus one point that appears twice, once with each label:
    a fully grown tree's leaf there and a distance-weighted KNN both say exactly 0.5."""
    rng = np.random.default_rng(4)
    features = pd.DataFrame(rng.normal(size=(120, 3)), columns=["a", "b", "c"])
    labels = (features["a"] + 0.5 * rng.normal(size=120) > 0).astype(int).to_numpy()
    twice = pd.DataFrame([[6.0, 6.0, 6.0]] * 2, columns=features.columns)
    return pd.concat([features, twice], ignore_index=True), np.append(labels, [0, 1])


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_labels_follow_the_threshold_for_every_zoo_model(name, serve):
    features, labels = _table_with_a_contradiction()
    estimator = train_model(name, features, labels, cv_folds=2).estimator
    proba = positive_proba(estimator, features)
    published = np.round(proba, 6)
    tie = float(published[-1])  # a threshold some row's published probability equals
    for threshold in (0.5, tie, float(np.median(published))):
        model = LoadedModel(name, estimator, "c" * 64, threshold=threshold)
        got, _ = predict(model, features)
        # scikit-learn's own thresholded predict, wherever rounding cannot matter ...
        clear = np.abs(proba - threshold) > 1e-6
        np.testing.assert_array_equal(got[clear], _reference_labels(model, features)[clear])
        # ... and a probability written exactly at the threshold is positive.
        at = published == threshold
        assert (got[at] == 1).all()
        values = serve([model], features)
        assert all(v["label"] == int(v["proba"] >= v["threshold"]) for v in values)


@pytest.mark.parametrize(
    ("name", "params"),
    [("tree", {"model__max_depth": None}), ("knn", {"model__weights": "distance"})],
)
def test_an_exact_half_is_positive_at_threshold_one_half(name, params):
    features, labels = _table_with_a_contradiction()
    estimator = model_zoo()[name].pipeline.set_params(**params).fit(features, labels)
    twice = features.iloc[-1:]
    assert positive_proba(estimator, twice)[0] == 0.5  # a real tie, not a rounding
    assert estimator.predict(twice)[0] == 0  # predict() breaks it towards class 0 ...
    got, _ = predict(LoadedModel(name, estimator, "d" * 64, threshold=0.5), twice)
    assert got[0] == 1  # ... the published label, like the contract, towards 1
    np.testing.assert_array_equal(got, labels_at(np.array([0.5]), 0.5))
