"""The JSON value each row gets in Redis: champion on top, every model under "models"."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.tree import DecisionTreeClassifier

from batchscore.data import load_dataset
from batchscore.models import positive_proba
from batchscore.scoring import LoadedModel, encode_predictions, predict

CLASSES = ("benign", "malignant")


@pytest.fixture(scope="module")
def rows_and_models():
    dataset = load_dataset("breast_cancer")
    train, rows = dataset.features.iloc[::3], dataset.features.iloc[1::40].reset_index(drop=True)
    labels = dataset.labels[::3]
    logreg = make_pipeline(StandardScaler(), LogisticRegression()).fit(train, labels)
    tree = make_pipeline(StandardScaler(), DecisionTreeClassifier(max_depth=2)).fit(train, labels)
    models = [
        LoadedModel("logreg", logreg, hashlib.sha256(b"logreg").hexdigest()),
        LoadedModel("tree", tree, hashlib.sha256(b"tree").hexdigest()),
    ]
    return rows, models


def test_loaded_model_version_is_a_short_hash():
    model = LoadedModel("svc", None, "ab" * 32)
    assert model.version == "abababababab"


def test_predict_returns_labels_and_positive_probabilities(rows_and_models):
    rows, (logreg, _) = rows_and_models
    labels, proba = predict(logreg, rows)
    np.testing.assert_array_equal(labels, logreg.estimator.predict(rows))
    np.testing.assert_array_equal(proba, positive_proba(logreg.estimator, rows))
    assert labels.dtype == np.int64


def test_one_model(rows_and_models):
    rows, (logreg, _) = rows_and_models
    values = encode_predictions([logreg], rows, CLASSES).to_pylist()
    assert len(values) == len(rows)
    expected_labels = logreg.estimator.predict(rows)
    expected_proba = positive_proba(logreg.estimator, rows)
    for value, label, proba in zip(values, expected_labels, expected_proba, strict=True):
        decoded = json.loads(value)
        assert set(decoded) == {"label", "class", "proba", "model", "model_version"}
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
        labels = model.estimator.predict(rows)
        proba = positive_proba(model.estimator, rows)
        for decoded, label, p in zip(values, labels, proba, strict=True):
            entry = decoded["models"][name]
            assert set(entry) == {"label", "proba", "model_version"}
            assert entry["label"] == int(label)
            assert entry["proba"] == pytest.approx(float(p), abs=1e-6)
            assert entry["model_version"] == model.version
    for decoded in values:
        assert list(decoded["models"]) == ["logreg", "tree"]
        assert decoded["model"] == "logreg"
        assert decoded["label"] == decoded["models"]["logreg"]["label"]
        assert decoded["proba"] == decoded["models"]["logreg"]["proba"]
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
