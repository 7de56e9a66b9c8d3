"""The JSON value each row gets in Redis: champion on top, every model under "models"."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pandas as pd
import pytest
from sklearn.frozen import FrozenEstimator
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import FixedThresholdClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.tree import DecisionTreeClassifier

from batchscore.batch.predictions import LoadedModel, encode_predictions, predict
from batchscore.training.datasets import load_dataset
from batchscore.training.models import (
    MODEL_NAMES,
    labels_at,
    model_zoo,
    positive_proba,
    train_model,
)

CLASSES = ("benign", "malignant")


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


def test_one_model(rows_and_models):
    rows, (logreg, _) = rows_and_models
    values = encode_predictions([logreg], rows, CLASSES).to_pylist()
    assert len(values) == len(rows)
    expected_labels = _reference_labels(logreg, rows)
    expected_proba = positive_proba(logreg.estimator, rows)
    for value, label, proba in zip(values, expected_labels, expected_proba, strict=True):
        decoded = json.loads(value)
        assert set(decoded) == {"label", "class", "proba", "threshold", "model", "model_version"}
        assert decoded["threshold"] == 0.2
        assert decoded["label"] == int(decoded["proba"] >= decoded["threshold"])
        assert decoded["label"] == int(label)
        assert decoded["class"] == CLASSES[int(label)]
        assert decoded["proba"] == pytest.approx(float(proba), abs=1e-6)
        assert decoded["model"] == "logreg"
        assert decoded["model_version"] == logreg.sha256[:12]
    assert {json.loads(v)["class"] for v in values} == set(CLASSES)  # both classes occur


def test_several_models_champion_on_top(rows_and_models):
    rows, models = rows_and_models
    values = [json.loads(v) for v in encode_predictions(models, rows, CLASSES).to_pylist()]
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


def test_class_names_come_from_the_classes_tuple(rows_and_models):
    rows, (logreg, _) = rows_and_models
    odd = ('no "finding"', "finding é")  # quotes and non-ASCII survive JSON encoding
    values = [json.loads(v) for v in encode_predictions([logreg], rows, odd).to_pylist()]
    assert {v["class"] for v in values} == set(odd)
    for value in values:
        assert value["class"] == odd[value["label"]]


def test_a_nan_probability_is_refused_not_written_as_invalid_json(rows_and_models):
    rows, _ = rows_and_models

    class Broken:
        classes_ = np.array([0, 1])

        def predict_proba(self, x):
            return np.column_stack([np.full(len(x), np.nan), np.full(len(x), np.nan)])

    with pytest.raises(ValueError, match="'broken' returned a probability that is NaN"):
        encode_predictions([LoadedModel("broken", Broken(), "0" * 64)], rows, CLASSES)


def test_probabilities_keep_six_decimals_in_their_shortest_form(rows_and_models):
    rows, (logreg, _) = rows_and_models
    value = encode_predictions([logreg], rows.iloc[:1], CLASSES)[0].as_py()
    proba = positive_proba(logreg.estimator, rows.iloc[:1])[0]
    assert f'"proba":{round(float(proba), 6)!r}' in value


def _table_with_a_contradiction() -> tuple[pd.DataFrame, np.ndarray]:
    """Two classes to learn, plus one point that appears twice, once with each label:
    a fully grown tree's leaf there and a distance-weighted KNN both say exactly 0.5."""
    rng = np.random.default_rng(4)
    features = pd.DataFrame(rng.normal(size=(120, 3)), columns=["a", "b", "c"])
    labels = (features["a"] + 0.5 * rng.normal(size=120) > 0).astype(int).to_numpy()
    twice = pd.DataFrame([[6.0, 6.0, 6.0]] * 2, columns=features.columns)
    return pd.concat([features, twice], ignore_index=True), np.append(labels, [0, 1])


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_labels_follow_the_threshold_for_every_zoo_model(name):
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
        values = [json.loads(v) for v in encode_predictions([model], features, CLASSES).to_pylist()]
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
