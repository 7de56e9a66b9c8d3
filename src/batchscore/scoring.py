"""Score a shard of rows and encode each row's prediction as the JSON value Redis serves.

Value shape (the same for every row and every client):
    {"label": 1, "class": "malignant", "proba": 0.981234, "model": "svc",
     "model_version": "<first 12 hex of the model's SHA-256>",
     "models": {"tree": {"label": .., "proba": .., "model_version": ..}, ...}}  # models=all
The top level is always the champion's prediction.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from batchscore.models import positive_proba


@dataclass(frozen=True)
class LoadedModel:
    """A verified, deserialised model and what identifies it."""

    name: str
    estimator: Any
    sha256: str

    @property
    def version(self) -> str:
        return self.sha256[:12]


def predict(model: LoadedModel, features: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(labels, positive-class probabilities) for every row, in one vectorised call."""
    proba = positive_proba(model.estimator, features)
    # For two classes every zoo model's predict() is "probability of class 1 above 0.5"
    # (ties go to class 0): deriving it here halves the cost of KNN and SVC scoring.
    return (proba > 0.5).astype(np.int64), proba


def encode_predictions(
    models: Sequence[LoadedModel],
    features: pd.DataFrame,
    classes: tuple[str, str],
) -> list[str]:
    """One JSON value per row; `models[0]` is the champion, the rest ride along."""
    outputs = [(m, *predict(m, features)) for m in models]
    class_json = [json.dumps(c) for c in classes]
    champion, labels, proba = outputs[0]
    head = f'"model":{json.dumps(champion.name)},"model_version":"{champion.version}"'
    if len(outputs) == 1:
        return [
            f'{{"label":{lab},"class":{class_json[lab]},"proba":{p:.6f},{head}}}'
            for lab, p in zip(labels.tolist(), proba.tolist(), strict=True)
        ]
    per_model = [
        [
            f'{json.dumps(m.name)}:{{"label":{lab},"proba":{p:.6f},"model_version":"{m.version}"}}'
            for lab, p in zip(mlabels.tolist(), mproba.tolist(), strict=True)
        ]
        for m, mlabels, mproba in outputs
    ]
    return [
        f'{{"label":{lab},"class":{class_json[lab]},"proba":{p:.6f},{head},'
        f'"models":{{{",".join(parts)}}}}}'
        for lab, p, *parts in zip(labels.tolist(), proba.tolist(), *per_model, strict=True)
    ]
