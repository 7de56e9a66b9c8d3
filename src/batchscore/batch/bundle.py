"""The models a batch scores with: found in the database, fetched and verified, loaded."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from batchscore.config import Settings

if TYPE_CHECKING:
    from batchscore.batch.drift import ReferenceProfile
    from batchscore.batch.predictions import LoadedModel
    from batchscore.storage.model_record import ChampionRun, ModelRecord

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelBundle:
    """The models to score with (champion first) and the schema they were trained on."""

    training_run_id: str
    models: list[LoadedModel]
    feature_columns: list[str]
    classes: tuple[str, str]
    reference: ReferenceProfile | None = None  # the training rows' profile, for drift

    @property
    def champion(self) -> str:
        return self.models[0].name

    @property
    def threshold(self) -> float:
        return self.models[0].threshold

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.models]


@dataclass(frozen=True)
class ModelFiles:
    """The recorded models' bytes, each already checked against its SHA-256, champion first.

    What the flow hands its scoring tasks: they deserialise it (`load`), so scikit-learn
    and xgboost are imported only where a model predicts, never in the steps around them.
    """

    records: list[ModelRecord]
    blobs: list[bytes]
    profile: bytes | None = None  # the training run's reference profile, checked likewise

    @property
    def training_run_id(self) -> str:
        return self.records[0].training_run_id

    @property
    def feature_columns(self) -> list[str]:
        return self.records[0].feature_columns

    @property
    def classes(self) -> tuple[str, str]:
        return self.records[0].classes

    @property
    def champion(self) -> str:
        return self.records[0].model

    @property
    def names(self) -> list[str]:
        return [r.model for r in self.records]

    @property
    def threshold(self) -> float:
        return self.records[0].threshold

    @property
    def reference(self) -> ReferenceProfile | None:
        from batchscore.batch.drift import ReferenceProfile

        return ReferenceProfile.from_json(self.profile) if self.profile else None

    def load(self) -> ModelBundle:
        """Deserialise each model (its SHA-256 checked again: the bytes passed through a
        datastore since `fetch_models`)."""
        from batchscore.batch.predictions import LoadedModel
        from batchscore.training.models import load_model

        models = [
            LoadedModel(
                r.model,
                load_model(blob, r.model_sha256, r.model_uri),
                r.model_sha256,
                threshold=r.threshold,
            )
            for r, blob in zip(self.records, self.blobs, strict=True)
        ]
        return ModelBundle(
            self.training_run_id, models, self.feature_columns, self.classes, self.reference
        )


def find_champion(which: str, settings: Settings) -> ChampionRun:
    """The latest training run's champion (or every model), champion first, and its test
    split (the default batch input), in one read: no model loaded."""
    from batchscore.storage.tracking import Tracker

    with Tracker(settings.resolved_database_url) as tracker:
        return tracker.latest_champion(which)


def find_models(which: str, settings: Settings) -> list[ModelRecord]:
    """Where the recorded champion (or every model) lives, champion first: no model loaded."""
    return find_champion(which, settings).records


def fetch_models(which: str | Sequence[ModelRecord], settings: Settings) -> ModelFiles:
    """The recorded champion (or all models) read from the store by their recorded URIs,
    each refused unless its SHA-256 matches the record; nothing deserialised."""
    from batchscore.storage.object_store import ObjectStore
    from batchscore.training.models import verify_sha256

    records = find_models(which, settings) if isinstance(which, str) else list(which)
    blobs = [ObjectStore.read_uri(r.model_uri, settings) for r in records]
    for record, blob in zip(records, blobs, strict=True):
        verify_sha256(blob, record.model_sha256, record.model_uri)
    return ModelFiles(records, blobs, _fetch_profile(records[0], settings))


def _fetch_profile(record: ModelRecord, settings: Settings) -> bytes | None:
    """The champion's training profile, refused unless its SHA-256 matches the record."""
    from batchscore.storage.object_store import ObjectStore
    from batchscore.training.models import verify_sha256

    if not record.profile_uri:
        log.warning(
            "%s recorded no reference profile: drift is not measured (the bad-row limit "
            "still applies)",
            record.model,
        )
        return None
    data = ObjectStore.read_uri(record.profile_uri, settings)
    verify_sha256(data, record.profile_sha256, record.profile_uri)
    return data


def load_models(which: str | Sequence[ModelRecord], settings: Settings) -> ModelBundle:
    """The recorded champion (or all models), each checked against its SHA-256 first."""
    return fetch_models(which, settings).load()
