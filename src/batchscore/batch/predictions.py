"""Score a shard of rows and encode each row's prediction as the JSON value Redis serves.

Value shape (the same for every row and every client):
    {"label": 1, "class": "malignant", "proba": 0.981234, "threshold": 0.31,
     "model": "svc", "model_version": "<first 12 hex of the model's SHA-256>",
     "models": {"tree": {"label": .., "class": .., "proba": .., "threshold": ..,
                         "model_version": ..}, ...}}  # models=all
The top level is always the champion's prediction. `label` is 1 exactly when `proba`
(as written, 6 decimals) >= `threshold`, the model's recorded decision threshold.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from batchscore.training.models import labels_at, positive_proba, published_proba


@dataclass(frozen=True)
class LoadedModel:
    """A verified, deserialised model and what identifies it."""

    name: str
    estimator: Any
    sha256: str
    threshold: float = 0.5  # recorded at training: label 1 when proba >= threshold

    @property
    def version(self) -> str:
        return self.sha256[:12]


def predict(model: LoadedModel, features: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(labels, positive-class probabilities) for every row, in one vectorised call.

    Labels come from the probability and the model's own threshold, never `predict()`
    (whose cut-off is 0.5, ties negative): one model call instead of two, too.
    """
    proba = positive_proba(model.estimator, features)
    return labels_at(proba, model.threshold), proba


Scored = tuple[LoadedModel, np.ndarray, np.ndarray]  # (model, labels, probabilities)


def predict_all(models: Sequence[LoadedModel], features: pd.DataFrame) -> list[Scored]:
    """Every model's labels and probabilities for the rows; `models[0]` is the champion."""
    return [(m, *predict(m, features)) for m in models]


def encode_predictions(
    models: Sequence[LoadedModel],
    features: pd.DataFrame,
    classes: tuple[str, str],
) -> pa.StringArray:
    """One JSON value per row; `models[0]` is the champion, the rest ride along."""
    return encode(predict_all(models, features), classes)


def encode(outputs: Sequence[Scored], classes: tuple[str, str]) -> pa.StringArray:
    """The JSON values of already scored rows (`predict_all`), champion first.

    Built column-wise with Arrow compute kernels (numbers cast to text, literal pieces
    joined row by row), about 6x faster than formatting a str per row. Probabilities are
    rounded to 6 decimals and written in their shortest form (`1`, `0.25`, `0.981234`).
    """
    champion, labels, _ = outputs[0]
    # Each model's probabilities as text once: the champion's appear twice in a value.
    numbers = [_number(model_proba, model.name) for model, _, model_proba in outputs]
    # The text before each probability depends only on the label: two strings, picked per
    # row by `take`, so that the label and class need no per-row formatting at all.
    heads = [f'{{"label":{i},"class":{json.dumps(c)},"proba":' for i, c in enumerate(classes)]
    parts: list[Any] = [
        pa.array(heads, pa.string()).take(pa.array(labels)),
        numbers[0],
        f',"threshold":{_threshold(champion)},"model":{json.dumps(champion.name)}'
        f',"model_version":"{champion.version}"',
    ]
    if len(outputs) > 1:
        parts.append(',"models":{')
        for i, (model, model_labels, _) in enumerate(outputs):
            name = ("," if i else "") + json.dumps(model.name)
            heads = [
                f'{name}:{{"label":{label},"class":{json.dumps(c)},"proba":'
                for label, c in enumerate(classes)
            ]
            parts += [
                pa.array(heads, pa.string()).take(pa.array(model_labels)),
                numbers[i],
                f',"threshold":{_threshold(model)},"model_version":"{model.version}"}}',
            ]
        parts.append("}")
    parts.append("}")
    return pc.binary_join_element_wise(*parts, "")


def _number(proba: np.ndarray, model: str) -> pa.Array:
    """Probabilities as JSON numbers: rounded to 6 decimals, never NaN or infinite."""
    if not np.isfinite(proba).all():
        raise ValueError(f"model {model!r} returned a probability that is NaN or infinite")
    return pc.cast(pa.array(published_proba(proba)), pa.string())


def _threshold(model: LoadedModel) -> str:
    """The threshold as a JSON number (a recorded one has at most 6 decimals)."""
    threshold = float(model.threshold)
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"model {model.name!r} has threshold {threshold}, outside [0, 1]")
    return json.dumps(threshold)
