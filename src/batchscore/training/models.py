"""The model zoo: each name maps to a scikit-learn Pipeline (scaler inside) and its grid.

The scaler lives in the pipeline so that the saved model takes raw features: the same
raw values the row key is computed from.

Training one model: grid search on cross-validated ROC AUC (threshold-free), then a
decision threshold chosen by cross-validation on the same training rows
(`TunedThresholdClassifierCV`, F1 of the positive class by default), then the refit
on every training row. The saved model stays a plain Pipeline; its threshold is
recorded beside it, and every label (test metrics, published predictions) uses it.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from batchscore.sizing import machine_cores

if TYPE_CHECKING:  # numpy, scikit-learn and xgboost load only where a model is used: the
    # training flow's file imports this module for its constants in every process.
    import numpy as np
    import pandas as pd
    from sklearn.base import BaseEstimator
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import Pipeline

log = logging.getLogger(__name__)

# Threshold-free, so the champion does not depend on a cut-off chosen later.
CV_SCORING = "roc_auc"
# What the decision threshold maximises on held-out folds (scikit-learn scorer names).
# F1 of the positive class by default: on imbalanced data 0.5 labels (almost) everything
# negative, and accuracy rewards exactly that.
THRESHOLD_METRICS = ("f1", "balanced_accuracy", "matthews_corrcoef", "accuracy")
DEFAULT_THRESHOLD_METRIC = "f1"
# Kernel SVM fits grow ~quadratically with rows, and KNN's fit set is what every
# prediction (batch scoring included) searches: above this, they train on a stratified
# sample of this many rows.
SAMPLE_ROWS = 10_000
# What each training branch asks of a scheduler (`@resources(cpu=...)`).
BRANCH_CPUS = 2

# Probabilities are published with this many decimals; thresholds are recorded with as
# many, and labels compare the published value, so a reader of a value can check
# `label == (proba >= threshold)` on exactly what it reads.
PROBA_DECIMALS = 6


def _pipeline(estimator: BaseEstimator) -> Pipeline:
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    return Pipeline([("scale", StandardScaler()), ("model", estimator)])


@dataclass(frozen=True)
class ZooModel:
    """One zoo entry: the pipeline, its grid, and how it is kept affordable."""

    pipeline: Pipeline
    grid: dict[str, list[Any]] | list[dict[str, list[Any]]]
    # Train on a stratified sample of at most this many rows (None: every row).
    sample_rows: int | None = None
    # Searched on its decision function (ROC AUC needs no probabilities), then only the
    # chosen model is wrapped in Platt scaling: calibration inside the search refitted
    # every candidate once per inner fold (12 min on a 5,822-row table).
    calibrate: bool = False


def model_zoo(random_state: int = 42) -> dict[str, ZooModel]:
    """Name -> zoo entry. Order is the branch order in the flow."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.svm import SVC, LinearSVC
    from sklearn.tree import DecisionTreeClassifier
    from xgboost import XGBClassifier

    return {
        "tree": ZooModel(
            _pipeline(DecisionTreeClassifier(random_state=random_state)),
            # Depth capped at 12: an unbounded tree grew 38 levels on 80,000 rows, at ~5x
            # the fit time of depth 5, and leaves of one row rank rows poorly anyway.
            {"model__max_depth": [3, 6, 12], "model__min_samples_leaf": [1, 5]},
        ),
        "svc": ZooModel(
            _pipeline(SVC(random_state=random_state)),
            [
                {"model": [SVC(kernel="rbf", random_state=random_state)], "model__C": [0.1, 1, 10]},
                # The linear kernel through liblinear: libsvm's linear kernel took
                # seconds to minutes per fit at large C on overlapping classes.
                {"model": [LinearSVC(random_state=random_state)], "model__C": [0.01, 0.1, 1]},
            ],
            sample_rows=SAMPLE_ROWS,
            calibrate=True,
        ),
        "knn": ZooModel(
            _pipeline(KNeighborsClassifier()),
            {"model__n_neighbors": [5, 11, 21], "model__weights": ["uniform", "distance"]},
            sample_rows=SAMPLE_ROWS,
        ),
        "logreg": ZooModel(
            _pipeline(LogisticRegression(max_iter=5000)),
            {"model__C": [0.1, 1.0, 10.0]},
        ),
        "xgboost": ZooModel(
            _pipeline(
                XGBClassifier(
                    n_estimators=200, random_state=random_state, n_jobs=1, eval_metric="logloss"
                )
            ),
            {"model__max_depth": [2, 4], "model__learning_rate": [0.05, 0.2]},
        ),
    }


# The zoo's names, in branch order, without importing scikit-learn (a test keeps them equal).
MODEL_NAMES: tuple[str, ...] = ("tree", "svc", "knn", "logreg", "xgboost")


@dataclass
class TrainedModel:
    """A tuned pipeline, what its cross-validation said about it, and its threshold."""

    name: str
    estimator: Pipeline
    cv_score: float
    best_params: dict[str, Any] = field(default_factory=dict)
    feature_columns: list[str] = field(default_factory=list)
    # Label 1 when the positive-class probability reaches it (chosen on CV folds).
    threshold: float = 0.5
    threshold_metric: str = DEFAULT_THRESHOLD_METRIC
    fit_rows: int = 0  # rows it was trained on (fewer than given when sampled)

    # Pickled (as a Metaflow artifact) with the estimator as the joblib file the store
    # keeps, deserialised only when `estimator` is first used: the flow's join and store
    # steps pass the models on without importing scikit-learn or xgboost (~1.5 s a step).
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_joblib"] = self.joblib_bytes()[0]
        state.pop("estimator", None)
        return state

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "estimator":  # a new estimator: the bytes it came as no longer hold
            self.__dict__.pop("_joblib", None)
        super().__setattr__(name, value)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __getattr__(self, name: str) -> Any:
        # Only reached when `estimator` is not loaded yet (normal lookup failed).
        if name == "estimator" and "_joblib" in self.__dict__:
            import joblib

            estimator = joblib.load(io.BytesIO(self.__dict__["_joblib"]))
            self.__dict__["estimator"] = estimator
            return estimator
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def joblib_bytes(self) -> tuple[bytes, str]:
        """The model as the store keeps it (`dump_model`) and its SHA-256: the bytes it
        arrived as when it was unpickled (Metaflow re-saves every artifact a step reads,
        so a loaded model must not cost a dump), else a fresh dump of the estimator."""
        data = self.__dict__.get("_joblib")
        if data is None:
            return dump_model(self.__dict__["estimator"])
        return data, hashlib.sha256(data).hexdigest()


def check_threshold_metric(metric: str) -> str:
    """The metric name, or a ValueError listing the ones that can choose a threshold."""
    if metric not in THRESHOLD_METRICS:
        raise ValueError(
            f"threshold_metric {metric!r} is not one of {', '.join(THRESHOLD_METRICS)}"
        )
    return metric


def training_jobs(branches: int = len(MODEL_NAMES)) -> int:
    """Worker processes for one branch's searches, without oversubscribing the cores.

    In a Kubernetes pod the branch has its `@resources` cores to itself; run locally,
    Metaflow starts every branch at once on one machine, so they share its cores.
    """
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        return BRANCH_CPUS
    return max(1, machine_cores() // branches)  # affinity and container limit, as the batch


def train_model(
    name: str,
    features: pd.DataFrame,
    labels: np.ndarray,
    cv_folds: int = 5,
    random_state: int = 42,
    threshold_metric: str = DEFAULT_THRESHOLD_METRIC,
    n_jobs: int | None = None,
) -> TrainedModel:
    """Grid-search one zoo model on stratified folds, tune its threshold, refit on all rows."""
    from sklearn.base import clone
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from threadpoolctl import threadpool_limits

    zoo = model_zoo(random_state)
    if name not in zoo:
        raise KeyError(f"unknown model {name!r}; the zoo has {list(zoo)}")
    check_threshold_metric(threshold_metric)
    entry = zoo[name]
    x, y = _sample(features, labels, entry.sample_rows, random_state)
    folds = StratifiedKFold(n_splits=cv_folds, shuffle=True, random_state=random_state)
    jobs = n_jobs or training_jobs()
    with threadpool_limits(limits=jobs):  # BLAS threads too: branches share the cores
        search = GridSearchCV(
            entry.pipeline, entry.grid, scoring=CV_SCORING, cv=folds, n_jobs=jobs, refit=False
        ).fit(x, y)
        best = clone(entry.pipeline).set_params(**search.best_params_)
        if entry.calibrate:
            svm = best.named_steps["model"]
            best.set_params(model=CalibratedClassifierCV(svm, ensemble=False, cv=folds))
        estimator, threshold = _tune_threshold(best, x, y, folds, threshold_metric, jobs)
    return TrainedModel(
        name=name,
        estimator=estimator,
        cv_score=float(search.best_score_),
        best_params=_describe(search.best_params_),
        feature_columns=list(features.columns),
        threshold=threshold,
        threshold_metric=threshold_metric,
        fit_rows=len(y),
    )


def _sample(
    features: pd.DataFrame, labels: np.ndarray, rows: int | None, random_state: int
) -> tuple[pd.DataFrame, np.ndarray]:
    """At most `rows` training rows, stratified so the positive share stays the same."""
    import numpy as np

    if rows is None or len(labels) <= rows:
        return features, np.asarray(labels)
    from sklearn.model_selection import train_test_split

    x, _, y, _ = train_test_split(
        features, labels, train_size=rows, stratify=labels, random_state=random_state
    )
    log.info("training on a stratified sample of %d of %d rows", rows, len(labels))
    return x.reset_index(drop=True), np.asarray(y)


def _tune_threshold(
    pipeline: Pipeline,
    features: pd.DataFrame,
    labels: np.ndarray,
    folds: StratifiedKFold,
    metric: str,
    jobs: int,
) -> tuple[Pipeline, float]:
    """The pipeline refit on every row, and the threshold that maximised `metric` on the
    held-out folds (scikit-learn's TunedThresholdClassifierCV, which keeps `>=`)."""
    from sklearn.base import clone
    from sklearn.model_selection import TunedThresholdClassifierCV

    from batchscore.training.threshold_metrics import threshold_scorer

    tuned = TunedThresholdClassifierCV(
        pipeline,
        scoring=threshold_scorer(metric),
        response_method="predict_proba",
        cv=folds,
        n_jobs=jobs,
    )
    try:
        tuned.fit(features, labels)
    except ValueError as exc:
        if "constant predictions" not in str(exc):
            raise
        # Nothing to tune: every row gets the same probability in some fold.
        log.warning("%s; keeping the threshold at 0.5", exc)
        return clone(pipeline).fit(features, labels), 0.5
    return tuned.estimator_, round(float(tuned.best_threshold_), PROBA_DECIMALS)


def _describe(params: dict[str, Any]) -> dict[str, Any]:
    """Grid parameters as plain names: `model__C` -> `C`, an estimator -> its kernel."""
    from sklearn.base import BaseEstimator

    described: dict[str, Any] = {}
    for key, value in params.items():
        if isinstance(value, BaseEstimator):
            described["kernel"] = getattr(value, "kernel", "linear")
        else:
            described[key.removeprefix("model__")] = value
    return described


def choose_champion(models: dict[str, TrainedModel]) -> str:
    """Best cross-validated score; ties go to the earlier model in the zoo, then by name.

    Never the test set: that would pick the model that got lucky on the rows we report.
    """
    order = {name: i for i, name in enumerate(MODEL_NAMES)}
    return min(
        models.values(),
        key=lambda m: (-round(m.cv_score, 12), order.get(m.name, len(order)), m.name),
    ).name


def positive_proba(estimator: Any, features: np.ndarray | pd.DataFrame) -> np.ndarray:
    """Probability of label 1 (the positive class), whatever the estimator's class order."""
    proba = estimator.predict_proba(features)
    classes = list(estimator.classes_)
    return proba[:, classes.index(1)]


def published_proba(proba: np.ndarray) -> np.ndarray:
    """Probabilities as they are published and compared: rounded to PROBA_DECIMALS."""
    import numpy as np

    return np.round(proba, PROBA_DECIMALS)


def labels_at(proba: np.ndarray, threshold: float) -> np.ndarray:
    """Label 1 where the published probability reaches the threshold (ties are positive)."""
    import numpy as np

    return (published_proba(proba) >= threshold).astype(np.int64)


def dump_model(estimator: Any) -> tuple[bytes, str]:
    """Serialised model and its SHA-256, which the database records to check it on load."""
    import joblib

    buffer = io.BytesIO()
    joblib.dump(estimator, buffer, compress=3)
    data = buffer.getvalue()
    return data, hashlib.sha256(data).hexdigest()


class IntegrityError(RuntimeError):
    """A stored model's bytes are not the ones the database recorded."""


def verify_sha256(data: bytes, expected_sha256: str | None, uri: str) -> None:
    """Raise `IntegrityError` unless the bytes are the ones the database recorded."""
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected_sha256:
        raise IntegrityError(
            f"{uri}: SHA-256 {actual} does not match the recorded {expected_sha256}; "
            "refusing to load it"
        )


def load_model(data: bytes, expected_sha256: str, uri: str = "model") -> Any:
    """Deserialise only after the bytes match the recorded SHA-256.

    joblib (pickle) runs code while loading, so a model file is trusted only because
    its hash matches what the training run recorded in the database.
    """
    verify_sha256(data, expected_sha256, uri)
    import joblib

    return joblib.load(io.BytesIO(data))
