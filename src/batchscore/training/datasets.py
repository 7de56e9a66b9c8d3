"""Training datasets: the built-in one, or a labelled CSV/Parquet table, with binary labels."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import numpy as np

from batchscore.config import Settings
from batchscore.rows.errors import InputError
from batchscore.rows.validation import to_feature_frame
from batchscore.storage.tables import read_frame

if TYPE_CHECKING:  # imported where used: the batch flow's `load_data` needs no pandas
    import pandas as pd

log = logging.getLogger(__name__)

BUILTIN_DATASETS = ("breast_cancer",)


@dataclass(frozen=True)
class Dataset:
    """Features (numeric, in training order) and binary labels, 1 = the positive class."""

    name: str
    features: pd.DataFrame
    labels: np.ndarray
    classes: tuple[str, str]  # (negative, positive), as named in the source

    @property
    def positive_class(self) -> str:
        return self.classes[1]


def load_dataset(
    source: str,
    target: str | None = None,
    positive_class: str | None = None,
    settings: Settings | None = None,
) -> Dataset:
    """The built-in breast-cancer data, or any numeric CSV/Parquet table with a binary label."""
    if source == "breast_cancer":
        return _breast_cancer()
    if not target:
        raise InputError(f"{source}: a file dataset needs --target, the name of its label column")
    frame = read_frame(source, settings)
    if target not in frame.columns:
        raise InputError(f"{source}: no label column {target!r}; columns: {list(frame.columns)}")
    labels, classes = _binary_labels(frame[target], source, target, positive_class)
    features = frame.drop(columns=[target])
    if features.shape[1] == 0:
        raise InputError(f"{source}: no feature columns besides the label {target!r}")
    return Dataset(
        name=dataset_name(source),
        features=to_feature_frame(features, list(features.columns), source),
        labels=labels,
        classes=classes,
    )


def dataset_name(source: str) -> str:
    """A short, path-safe name for a dataset: `breast_cancer`, or the file's stem."""
    if source in BUILTIN_DATASETS:
        return source
    stem = Path(urlparse(source).path).name.split(".")[0]
    return re.sub(r"[^A-Za-z0-9_-]+", "_", stem) or "dataset"


def _breast_cancer() -> Dataset:
    from sklearn.datasets import load_breast_cancer

    bunch = load_breast_cancer(as_frame=True)
    # scikit-learn codes malignant as 0; the positive class here is malignant (the finding).
    labels = (bunch.target.to_numpy() == 0).astype(np.int8)
    return Dataset(
        name="breast_cancer",
        features=bunch.data.astype("float64"),
        labels=labels,
        classes=("benign", "malignant"),
    )


# Recognised text pairs, (negative, positive), compared case-insensitively.
YES_NO_PAIRS = (
    ("no", "yes"),
    ("n", "y"),
    ("false", "true"),
    ("f", "t"),
    ("negative", "positive"),
    ("neg", "pos"),
)


def _binary_labels(
    column: pd.Series, source: str, target: str, positive_class: str | None
) -> tuple[np.ndarray, tuple[str, str]]:
    """Labels as 0/1 with 1 = the positive class: `positive_class` if given; else 1 (or the
    larger number) for numeric labels, True for booleans, the yes-like label of a recognised
    yes/no pair. Any other pair of text labels is ambiguous: `fraud`/`legit` sorted would
    make `legit` positive, so it needs `--positive_class`."""
    # An empty cell is a missing label too (Arrow reads it as "" in a text column).
    missing = (column.isna() | (column.astype(str).str.strip() == "")).to_numpy()
    if missing.any():
        row = int(np.flatnonzero(missing)[0]) + 1
        raise InputError(f"{source}: column {target!r}, row {row}: the label is missing")
    values = column.astype(str)
    classes = sorted(values.unique(), key=_natural_key)
    if len(classes) != 2:
        shown = classes[:10]
        raise InputError(
            f"{source}: column {target!r} must hold exactly two classes, found {len(classes)}: "
            f"{shown}"
        )
    if positive_class:
        if positive_class not in classes:
            raise InputError(f"{source}: positive class {positive_class!r} not in {classes}")
        negative = classes[0] if classes[1] == positive_class else classes[1]
        classes = [negative, positive_class]
    else:
        classes = _default_classes(classes, source, target)
    labels = (values == classes[1]).to_numpy().astype(np.int8)
    return labels, (classes[0], classes[1])


def _default_classes(classes: list[str], source: str, target: str) -> list[str]:
    """(negative, positive) when no `--positive_class` is given; `classes` is sorted."""
    numbers = [_natural_key(c) for c in classes]
    if all(kind == 0 for kind, _ in numbers):  # numeric; booleans arrive as True/False
        if numbers[0][1] == 1:  # 1 is positive whatever the other label (-1, 2, ...)
            return [classes[1], classes[0]]
        return classes  # no 1: the larger number
    lowered = tuple(c.lower() for c in classes)
    for negative, positive in YES_NO_PAIRS:
        if set(lowered) == {negative, positive}:
            return sorted(classes, key=lambda c: c.lower() == positive)
    raise InputError(
        f"{source}: column {target!r} holds the text labels {classes[0]!r} and {classes[1]!r}: "
        f"say which one is positive with --positive_class (e.g. --positive_class {classes[1]})"
    )


def _natural_key(value: str) -> tuple[int, float | str]:
    """Numbers sort numerically (so 0/1 puts 1 positive), everything else as text."""
    try:
        return (0, float(value))
    except ValueError:
        return (1, value)
