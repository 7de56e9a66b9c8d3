"""Score a shard of rows with every model: labels at each model's recorded threshold, and
positive-class probabilities, champion first.

The online writer (`online/writer.py`) stores the probabilities; readers derive the
prediction each client gets from them (`online/layout.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from batchscore.training.models import labels_at, positive_proba


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
