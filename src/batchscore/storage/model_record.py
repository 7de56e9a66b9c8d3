"""What the database records about one trained model, as the batch flow hands it on.

A module of its own, free of SQLAlchemy: the record travels inside Metaflow artifacts, and
unpickling it in a scoring task should not import the database layer.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelRecord:
    """Where a trained model lives and how to check it: what the batch flow loads."""

    training_run_id: str
    model: str
    model_uri: str
    model_sha256: str
    feature_columns: list[str]
    classes: tuple[str, str]  # (negative, positive): label 0 and label 1
    is_champion: bool
    threshold: float = 0.5  # label 1 when the positive-class probability reaches it
    # The training run's reference profile for the drift gate (None: recorded before it).
    profile_uri: str | None = None
    profile_sha256: str | None = None


@dataclass(frozen=True)
class ChampionRun:
    """The latest training run's models and its test split (the default batch input), read
    together: a training run finishing in between cannot pair one run's input with the
    next run's model."""

    training_run_id: str
    batch_input_uri: str
    records: list[ModelRecord]  # champion first
