"""The model zoo, training, champion choice, and the hash-checked model files."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.calibration import CalibratedClassifierCV
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from batchscore.training.datasets import load_dataset
from batchscore.training.evaluation import evaluate_model
from batchscore.training.models import (
    BRANCH_CPUS,
    CV_SCORING,
    MODEL_NAMES,
    SAMPLE_ROWS,
    THRESHOLD_METRICS,
    IntegrityError,
    TrainedModel,
    choose_champion,
    dump_model,
    labels_at,
    load_model,
    model_zoo,
    positive_proba,
    train_model,
    training_jobs,
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
    for name, entry in zoo.items():
        pipeline = entry.pipeline
        assert isinstance(pipeline, Pipeline), name
        assert isinstance(pipeline.steps[0][1], StandardScaler), name
        grids = entry.grid if isinstance(entry.grid, list) else [entry.grid]
        params = pipeline.get_params()
        for grid in grids:
            assert grid, name
            for key, values in grid.items():
                assert key in params, f"{name}: {key} is not a pipeline parameter"
                assert values, name
        # One searched without probabilities is calibrated afterwards: every saved model has them.
        assert entry.calibrate or hasattr(pipeline, "predict_proba"), name
    assert CV_SCORING == "roc_auc"
    # Kernel SVM and KNN are the models whose cost grows fastest with rows.
    assert {n for n, e in zoo.items() if e.sample_rows} == {"svc", "knn"}


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
    # A threshold chosen on held-out folds, published with 6 decimals like the proba.
    assert 0.0 <= trained.threshold <= 1.0
    assert trained.threshold == round(trained.threshold, 6)
    assert trained.threshold_metric == "f1"
    assert trained.fit_rows == len(labels)
    # What the batch flow loads: a plain, hash-checked scikit-learn object.
    data, sha256 = dump_model(trained.estimator)
    loaded = load_model(data, sha256)
    np.testing.assert_array_equal(
        positive_proba(loaded, features), positive_proba(trained.estimator, features)
    )


def test_svc_is_searched_bare_and_calibrated_once(small_data):
    features, labels = small_data
    trained = train_model("svc", features, labels, cv_folds=2)
    assert set(trained.best_params) == {"kernel", "C"}
    assert trained.best_params["kernel"] in ("rbf", "linear")
    model = trained.estimator.named_steps["model"]
    assert isinstance(model, CalibratedClassifierCV)
    assert model.ensemble is False  # one SVM fitted on every training row, Platt-scaled
    proba = positive_proba(trained.estimator, features)
    assert ((proba > 0) & (proba < 1)).all()


def test_large_tables_sample_kernel_and_neighbour_models():
    rng = np.random.default_rng(0)
    rows = SAMPLE_ROWS + 2_000
    features = pd.DataFrame(rng.normal(size=(rows, 3)), columns=["a", "b", "c"])
    labels = (features["a"] + rng.normal(size=rows) > 1.6).astype(int).to_numpy()
    trained = train_model("knn", features, labels, cv_folds=2)
    assert trained.fit_rows == SAMPLE_ROWS
    # Stratified: the fitted neighbours keep the table's positive share.
    fitted = trained.estimator.named_steps["model"]
    assert fitted.n_samples_fit_ == SAMPLE_ROWS
    assert abs(np.mean(fitted._y) - labels.mean()) < 0.001
    assert train_model("logreg", features, labels, cv_folds=2).fit_rows == rows


def test_an_unknown_threshold_metric_lists_the_known_ones(small_data):
    features, labels = small_data
    with pytest.raises(ValueError, match="recall") as info:
        train_model("logreg", features, labels, cv_folds=2, threshold_metric="recall")
    for metric in THRESHOLD_METRICS:
        assert metric in str(info.value)


@pytest.mark.parametrize("metric", THRESHOLD_METRICS)
def test_every_threshold_metric_chooses_a_threshold(small_data, metric):
    features, labels = small_data
    trained = train_model("logreg", features, labels, cv_folds=2, threshold_metric=metric)
    assert trained.threshold_metric == metric
    assert 0.0 < trained.threshold < 1.0


def test_another_threshold_metric_moves_the_threshold():
    features, labels = _rare_positives(1_000, seed=1)
    f1 = train_model("logreg", features, labels, cv_folds=3)
    accuracy = train_model("logreg", features, labels, cv_folds=3, threshold_metric="accuracy")
    assert accuracy.threshold_metric == "accuracy"
    # Accuracy on 5% positives is best calling (almost) everything negative: a higher cut.
    assert accuracy.threshold > f1.threshold


def _rare_positives(rows: int, seed: int) -> tuple[pd.DataFrame, np.ndarray]:
    """A weak, noisy signal and ~5% positives: no row's true probability reaches 0.5, as
    in real insurance or fraud tables, so a 0.5 cut-off labels every row negative."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 8))
    logit = -3.4 + 0.9 * x[:, 0] + 0.6 * x[:, 1] - 0.5 * x[:, 2]
    labels = (rng.random(rows) < 1 / (1 + np.exp(-logit))).astype(int)
    return pd.DataFrame(x, columns=[f"f{i}" for i in range(8)]), labels


def test_champion_finds_positives_on_a_table_with_six_percent_of_them():
    features, labels = _rare_positives(2_000, seed=0)
    assert 0.04 < labels.mean() < 0.07
    x_train, x_test, y_train, y_test = train_test_split(
        features, labels, test_size=0.25, stratify=labels, random_state=0
    )
    trained = {name: train_model(name, x_train, y_train, cv_folds=3) for name in MODEL_NAMES}
    champion = trained[choose_champion(trained)]
    result = evaluate_model(champion.estimator, x_test, y_test, champion.threshold)
    assert result["recall"] > 0
    assert result["f1"] > 0
    assert champion.threshold < 0.5
    # What 0.5 would have published: not one positive found.
    at_half = evaluate_model(champion.estimator, x_test, y_test, 0.5)
    assert at_half["recall"] == 0


def test_branches_share_the_local_cores_and_own_a_pods(monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setattr("batchscore.sizing.cgroup_cpu_limit", lambda: None)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))
    assert training_jobs() == 16 // len(MODEL_NAMES)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})
    assert training_jobs() == 1  # five branches on two cores: one process each
    # A container limited to 2 CPUs on a 16-core host counts 2, as the batch's shards do.
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setattr("batchscore.sizing.cgroup_cpu_limit", lambda: 2)
    assert training_jobs() == 1
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    assert training_jobs() == BRANCH_CPUS  # one pod per branch, with its @resources cpu


def test_labels_at_the_threshold_are_positive():
    proba = np.array([0.1, 0.2999994, 0.2999996, 0.3, 0.31])
    # Compared as published (6 decimals): 0.2999996 is written 0.3, so it is positive.
    np.testing.assert_array_equal(labels_at(proba, 0.3), [0, 0, 1, 1, 1])


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
    np.testing.assert_array_equal(loaded.predict_proba(features), model.predict_proba(features))


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


def test_threshold_metrics_equal_scikit_learns_degenerate_folds_included():
    # The threshold search scores 100 cut-offs per fold with these (scikit-learn's own
    # functions cost ~4 ms a call there); they must give scikit-learn's values exactly.
    import warnings

    from sklearn import metrics

    from batchscore.training.threshold_metrics import METRICS

    reference = {
        "f1": metrics.f1_score,
        "balanced_accuracy": metrics.balanced_accuracy_score,
        "matthews_corrcoef": metrics.matthews_corrcoef,
        "accuracy": metrics.accuracy_score,
    }
    assert set(METRICS) == set(THRESHOLD_METRICS)
    rng = np.random.default_rng(0)
    cases = [(rng.integers(0, 2, 40), rng.integers(0, 2, 40)) for _ in range(100)]
    three = np.r_[np.ones(3, int), np.zeros(7, int)]
    cases += [
        (np.zeros(10, int), np.zeros(10, int)),  # one class, all predicted negative
        (np.ones(10, int), np.ones(10, int)),
        (np.zeros(10, int), np.ones(10, int)),
        (three, np.zeros(10, int)),  # nothing predicted positive
        (three, np.ones(10, int)),  # everything predicted positive
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scikit-learn warns on the degenerate folds
        for name, function in METRICS.items():
            for truth, predicted in cases:
                assert function(truth, predicted) == pytest.approx(
                    reference[name](truth, predicted), abs=1e-12
                ), (name, truth, predicted)


def test_trained_model_travels_as_its_store_bytes_and_loads_on_first_use(tmp_path):
    # The training flow's join and store steps unpickle every branch's model: that must not
    # import scikit-learn, and the bytes stored are the very ones the branch dumped.
    import subprocess
    import sys

    data = load_dataset("breast_cancer")
    trained = train_model("logreg", data.features, data.labels, cv_folds=3, n_jobs=1)
    blob, sha = trained.joblib_bytes()
    path = tmp_path / "trained.pickle"
    path.write_bytes(pickle.dumps(pickle.loads(pickle.dumps(trained))))  # via a join
    check = (
        "import pickle, sys; m = pickle.loads(open(sys.argv[1], 'rb').read()); "
        "loaded = sorted(n for n in sys.modules if n.split('.')[0] in ('sklearn', 'xgboost')); "
        "print(m.joblib_bytes()[1], loaded)"
    )
    out = subprocess.run(
        [sys.executable, "-c", check, str(path)], capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == [sha, "[]"]
    again = pickle.loads(path.read_bytes())
    assert again.joblib_bytes() == (blob, sha)
    np.testing.assert_array_equal(
        again.estimator.predict_proba(data.features), trained.estimator.predict_proba(data.features)
    )
    assert again.joblib_bytes() == (blob, sha)  # loaded, not re-dumped
    again.estimator = _logreg(data.features.iloc[:, :3], data.labels)  # a new model: new bytes
    assert again.joblib_bytes()[1] != sha
