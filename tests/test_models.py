"""The model zoo, training, champion choice, and the hash-checked model files."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from batchscore.data import load_dataset
from batchscore.models import (
    CV_SCORING,
    MODEL_NAMES,
    IntegrityError,
    TrainedModel,
    choose_champion,
    dump_model,
    load_model,
    model_zoo,
    positive_proba,
    train_model,
)


@pytest.fixture(scope="module")
def small_data():
    dataset = load_dataset("breast_cancer")
    # A stratified-enough slice: every 5th row keeps both classes.
    features = dataset.features.iloc[::5].reset_index(drop=True)
    labels = dataset.labels[::5]
    return features, labels


def test_zoo_entries_are_scaled_pipelines_with_grids():
    zoo = model_zoo()
    assert tuple(zoo) == MODEL_NAMES == ("tree", "svc", "knn", "logreg", "xgboost")
    for name, (pipeline, grid) in zoo.items():
        assert isinstance(pipeline, Pipeline), name
        assert isinstance(pipeline.steps[0][1], StandardScaler), name
        assert grid, name
        params = pipeline.get_params()
        for key, values in grid.items():
            assert key in params, f"{name}: {key} is not a pipeline parameter"
            assert values, name
        assert hasattr(pipeline, "predict_proba"), name
    assert CV_SCORING == "roc_auc"


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_train_model_on_a_small_slice(small_data, name):
    features, labels = small_data
    trained = train_model(name, features, labels, cv_folds=2)
    assert trained.name == name
    assert 0.0 <= trained.cv_score <= 1.0
    assert trained.cv_score > 0.8  # breast cancer is easy, even on 114 rows
    assert trained.feature_columns == list(features.columns)
    assert all(not k.startswith("model__") for k in trained.best_params)
    # Refit on all training rows: predicts every row, takes raw (unscaled) features.
    assert trained.estimator.predict(features).shape == (len(features),)
    assert isinstance(trained.estimator.steps[0][1], StandardScaler)


def test_train_model_is_reproducible(small_data):
    features, labels = small_data
    first = train_model("tree", features, labels, cv_folds=2, random_state=3)
    second = train_model("tree", features, labels, cv_folds=2, random_state=3)
    assert first.cv_score == second.cv_score
    assert first.best_params == second.best_params


def test_unknown_model_is_named(small_data):
    features, labels = small_data
    with pytest.raises(KeyError, match="forest"):
        train_model("forest", features, labels, cv_folds=2)


def _logreg(features, labels) -> Pipeline:
    return make_pipeline(StandardScaler(), LogisticRegression()).fit(features, labels)


def _trained(name: str, score: float) -> TrainedModel:
    return TrainedModel(name=name, estimator=None, cv_score=score)


def test_champion_is_the_best_cv_score():
    models = {n: _trained(n, s) for n, s in [("tree", 0.91), ("svc", 0.99), ("knn", 0.95)]}
    assert choose_champion(models) == "svc"


def test_champion_ties_break_by_zoo_order_whatever_the_dict_order():
    names = ["xgboost", "logreg", "knn", "svc"]
    tied = {n: _trained(n, 0.98) for n in names}
    assert choose_champion(tied) == "svc"
    assert choose_champion(dict(reversed(list(tied.items())))) == "svc"
    # Floating-point noise below 1e-12 is a tie too.
    noisy = {"logreg": _trained("logreg", 0.98 + 1e-15), "knn": _trained("knn", 0.98)}
    assert choose_champion(noisy) == "knn"
    # Names outside the zoo come after it, then alphabetically.
    assert choose_champion({"zz": _trained("zz", 0.5), "aa": _trained("aa", 0.5)}) == "aa"
    assert choose_champion({"zz": _trained("zz", 0.5), "tree": _trained("tree", 0.5)}) == "tree"


def test_positive_proba_is_the_class_one_column(small_data):
    features, labels = small_data
    model = _logreg(features, labels)
    np.testing.assert_array_equal(
        positive_proba(model, features), model.predict_proba(features)[:, 1]
    )


def test_positive_proba_follows_classes_order():
    class ReversedClasses:
        """An estimator whose columns are ordered (1, 0): the lookup must not assume 0, 1."""

        classes_ = np.array([1, 0])

        def predict_proba(self, features):
            return np.array([[0.9, 0.1], [0.2, 0.8]])

    np.testing.assert_array_equal(positive_proba(ReversedClasses(), None), [0.9, 0.2])


def test_dump_and_load_round_trip(small_data):
    features, labels = small_data
    model = train_model("logreg", features, labels, cv_folds=2).estimator
    data, sha256 = dump_model(model)
    assert sha256 == hashlib.sha256(data).hexdigest()
    loaded = load_model(data, sha256, "file:///store/models/logreg.joblib")
    np.testing.assert_array_equal(
        loaded.predict_proba(features), model.predict_proba(features)
    )


class _CreatesFile:
    """Unpickling this runs open(path, 'w'): proof of code execution on load."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_tampered_model_is_refused_before_unpickling(tmp_path, small_data):
    features, labels = small_data
    model = _logreg(features, labels)
    _, recorded_sha = dump_model(model)

    marker = tmp_path / "pwned"
    payload = pickle.dumps(_CreatesFile(marker))
    with pytest.raises(IntegrityError, match="refusing to load") as info:
        load_model(payload, recorded_sha, "s3://batch/models/run/logreg.joblib")
    assert "s3://batch/models/run/logreg.joblib" in str(info.value)
    assert recorded_sha in str(info.value)
    assert not marker.exists()

    # The payload really would have run: loading it with its own hash creates the file.
    handle = load_model(payload, hashlib.sha256(payload).hexdigest())
    handle.close()
    assert marker.exists()


def test_one_flipped_byte_is_refused(small_data):
    features, labels = small_data
    data, sha256 = dump_model(_logreg(features, labels))
    tampered = bytearray(data)
    tampered[len(tampered) // 2] ^= 0x01
    with pytest.raises(IntegrityError):
        load_model(bytes(tampered), sha256)
