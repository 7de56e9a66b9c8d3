"""The model zoo: each name maps to a scikit-learn Pipeline (scaler inside) and its grid.

The scaler lives in the pipeline so that the saved model takes raw features: the same
raw values the row key is computed from.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field
from typing import Any

import joblib
import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator
from sklearn.calibration import CalibratedClassifierCV
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC
from sklearn.tree import DecisionTreeClassifier
from xgboost import XGBClassifier

# Threshold-free, so the champion does not depend on a cut-off chosen later.
CV_SCORING = "roc_auc"


def _pipeline(estimator: BaseEstimator) -> Pipeline:
    return Pipeline([("scale", StandardScaler()), ("model", estimator)])


def model_zoo(random_state: int = 42) -> dict[str, tuple[Pipeline, dict[str, list[Any]]]]:
    """Name -> (pipeline, parameter grid). Order is the branch order in the flow."""
    return {
        "tree": (
            _pipeline(DecisionTreeClassifier(random_state=random_state)),
            {"model__max_depth": [3, 5, None], "model__min_samples_leaf": [1, 5]},
        ),
        "svc": (
            # Platt-scaled probabilities, the way scikit-learn now recommends (SVC's own
            # `probability=True` is deprecated); predict() then agrees with the probability.
            _pipeline(CalibratedClassifierCV(SVC(random_state=random_state), ensemble=False)),
            {
                "model__estimator__C": [0.1, 1.0, 10.0],
                "model__estimator__kernel": ["rbf", "linear"],
            },
        ),
        "knn": (
            _pipeline(KNeighborsClassifier()),
            {"model__n_neighbors": [5, 11, 21], "model__weights": ["uniform", "distance"]},
        ),
        "logreg": (
            _pipeline(LogisticRegression(max_iter=5000)),
            {"model__C": [0.1, 1.0, 10.0]},
        ),
        "xgboost": (
            _pipeline(
                XGBClassifier(
                    n_estimators=200, random_state=random_state, n_jobs=1, eval_metric="logloss"
                )
            ),
            {"model__max_depth": [2, 4], "model__learning_rate": [0.05, 0.2]},
        ),
    }


MODEL_NAMES: tuple[str, ...] = tuple(model_zoo())


@dataclass
class TrainedModel:
    """A tuned pipeline and what its cross-validation said about it."""

    name: str
    estimator: Pipeline
    cv_score: float
    best_params: dict[str, Any] = field(default_factory=dict)
    feature_columns: list[str] = field(default_factory=list)


def train_model(
    name: str,
    features: pd.DataFrame,
    labels: np.ndarray,
    cv_folds: int = 5,
    random_state: int = 42,
) -> TrainedModel:
    """Grid-search one zoo model with stratified folds, refit on all training rows."""
    zoo = model_zoo(random_state)
    if name not in zoo:
        raise KeyError(f"unknown model {name!r}; the zoo has {list(zoo)}")
    pipeline, grid = zoo[name]
    search = GridSearchCV(
        pipeline,
        grid,
        scoring=CV_SCORING,
        cv=StratifiedKFold(n_splits=cv_folds, shuffle=True, random_state=random_state),
        n_jobs=1,
        refit=True,
    )
    search.fit(features, labels)
    return TrainedModel(
        name=name,
        estimator=search.best_estimator_,
        cv_score=float(search.best_score_),
        best_params={
            k.removeprefix("model__").removeprefix("estimator__"): v
            for k, v in search.best_params_.items()
        },
        feature_columns=list(features.columns),
    )


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


def dump_model(estimator: Any) -> tuple[bytes, str]:
    """Serialised model and its SHA-256, which the database records to check it on load."""
    buffer = io.BytesIO()
    joblib.dump(estimator, buffer, compress=3)
    data = buffer.getvalue()
    return data, hashlib.sha256(data).hexdigest()


class IntegrityError(RuntimeError):
    """A stored model's bytes are not the ones the database recorded."""


def load_model(data: bytes, expected_sha256: str, uri: str = "model") -> Any:
    """Deserialise only after the bytes match the recorded SHA-256.

    joblib (pickle) runs code while loading, so a model file is trusted only because
    its hash matches what the training run recorded in the database.
    """
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected_sha256:
        raise IntegrityError(
            f"{uri}: SHA-256 {actual} does not match the recorded {expected_sha256}; "
            "refusing to load it"
        )
    return joblib.load(io.BytesIO(data))
