"""How a version's rows sit in Redis, and the one place that turns them into predictions.

The compact layout (`compact-1`, every version written since it exists):

    digest  = the row key's 32 bytes: bytes.fromhex(row_key) for a feature-hash version,
              SHA-256(id as UTF-8) for an id-keyed one
    bucket  = big-endian uint32 of digest[0:4] modulo `buckets`
    HGET {rows}{bucket} <digest>  ->  3 bytes per model, champion first: big-endian
              round(proba * 1e6), the published probability in millionths

`rows` (e.g. `predictions:r42:`), `buckets`, the models (name, version, threshold, champion
first), the classes and the key scheme are the version's constants, once in its manifest.
The label is derived: 1 exactly when proba >= the model's threshold. Buckets hold ~64 rows:
small hashes that Redis keeps as listpacks (~40 bytes a row instead of ~340 as JSON strings).

While an id-keyed version is staged, each bucket has a companion `{<bucket name>}:owner`
(field: digest, value: the number of the shard that wrote the row), in the bucket's own
cluster slot: across shards the first row in input order wins (`scripts/first_wins.lua`).
Readers never read it; the join deletes it (`OnlineStore.drop_owners`).

The first layout (`json`: `{prefix}:{version}:{row_key}` -> the JSON prediction) is still
read, until its versions are retired.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

COMPACT = "compact-1"
LEGACY = "json"
ROWS_PER_BUCKET = 64  # Redis keeps a hash of up to 128 entries as a listpack
PROBA_BYTES = 3  # round(proba * 1e6) <= 1,000,000 < 2**24
_HEX_KEY = re.compile(r"[0-9a-f]{64}")

# The manifest fields a reader needs (one HMGET per version; a version never changes).
FIELDS = (
    "layout", "row_models", "classes", "key_scheme", "id_column", "feature_columns", "status",
)  # fmt: skip


def buckets_for(rows: int) -> int:
    """Hashes for about `rows` rows, ~ROWS_PER_BUCKET each."""
    return max(1, -(-rows // ROWS_PER_BUCKET))


def owner_name(bucket: str) -> str:
    """The staging-only owner hash of a bucket: its hash tag is the whole bucket name, so it
    lives in the bucket's cluster slot (a script may touch both)."""
    return f"{{{bucket}}}:owner"


@dataclass(frozen=True)
class RowModel:
    """A model's per-version constants, as readers need them."""

    name: str
    version: str
    threshold: float


@dataclass(frozen=True)
class Layout:
    """One version's row layout and constants: where a key's row is, and what it says."""

    kind: str
    rows: str  # the prefix of its row names
    buckets: int
    key_scheme: str  # "feature_hash" or "id"
    id_column: str | None
    feature_columns_json: bytes | None  # parsed when a lookup by features needs it
    classes: list[str]
    models: list[RowModel]

    @classmethod
    def from_manifest(
        cls,
        prefix: str,
        version: str,
        values: Sequence[bytes | None],
        settings_id: str | None = None,
    ) -> Layout | None:
        """From the manifest's `FIELDS` (HMGET order); None when the manifest is gone."""
        fields = dict(zip(FIELDS, values, strict=True))
        if all(v is None for v in values):
            return None
        raw_layout = fields["layout"]
        scheme = fields["key_scheme"]
        if scheme is not None:  # recorded by the version: "id" (with its column) or a hash
            id_column = fields["id_column"].decode() if scheme == b"id" else None
        else:  # versions written before the manifest recorded it: the settings say
            id_column = settings_id
        columns = fields["feature_columns"]
        classes = json.loads(fields["classes"]) if fields["classes"] else []
        common = {
            "key_scheme": "id" if id_column else "feature_hash",
            "id_column": id_column,
            "feature_columns_json": columns,
            "classes": [str(c) for c in classes],
        }
        if raw_layout is None:
            return cls(LEGACY, f"{prefix}:{version}:", 0, models=[], **common)
        layout = json.loads(raw_layout)
        models = json.loads(fields["row_models"]) if fields["row_models"] else []
        return cls(
            layout["format"],
            layout["rows"],
            int(layout["buckets"]),
            models=[RowModel(m["name"], m["version"], float(m["threshold"])) for m in models],
            **common,
        )

    @property
    def feature_columns(self) -> list[str] | None:
        """The training-order feature columns a feature-hash key is computed over."""
        raw = self.feature_columns_json
        return json.loads(raw) if raw else None

    @property
    def compact(self) -> bool:
        return self.kind == COMPACT

    def digest(self, key: str) -> bytes | None:
        """The row key's 32 bytes; None for a feature-hash key that is not 64 hex digits."""
        if self.key_scheme == "id":
            return hashlib.sha256(key.encode()).digest()
        return bytes.fromhex(key) if _HEX_KEY.fullmatch(key) else None

    def bucket_name(self, digest: bytes) -> str:
        return f"{self.rows}{int.from_bytes(digest[:4], 'big') % self.buckets}"

    def bucket_names(self) -> list[str]:
        """Every bucket's key name (named from the bucket count: no SCAN)."""
        return [f"{self.rows}{b}" for b in range(self.buckets)]

    @property
    def owned(self) -> bool:
        """Whether its writers keep owner hashes: only an id-keyed version can repeat a key
        with another value (a repeated feature hash has the same features, so the same
        prediction)."""
        return self.compact and self.key_scheme == "id"

    def locate(self, key: str) -> tuple[str, bytes | None] | None:
        """(Redis key, hash field) of a row; the field is None in the JSON layout."""
        if not self.compact:
            return self.rows + key, None
        digest = self.digest(key)
        return None if digest is None else (self.bucket_name(digest), digest)

    def prediction(self, value: bytes) -> dict[str, Any]:
        """The JSON prediction every reader returns, from a stored value."""
        return self.predictions([value])[0]

    def predictions(self, values: Sequence[bytes | None]) -> list[dict[str, Any] | None]:
        """The predictions of stored values, in order (None where a row is absent).

        Compact values are decoded together: numpy turns every row's 3-byte values into
        probabilities and labels at once, then each row's dicts are built from the models'
        constants in one comprehension per model (~5x faster than one value at a time).
        """
        if not self.compact:
            return [json.loads(v) if v is not None else None for v in values]
        present = [v for v in values if v is not None]
        decoded = self._decode(present)
        if len(present) == len(values):
            return decoded  # type: ignore[return-value]
        rows = iter(decoded)
        return [next(rows) if v is not None else None for v in values]

    def _decode(self, values: list[bytes]) -> list[dict[str, Any]]:
        import numpy as np

        models = self.models
        width = PROBA_BYTES * len(models)
        if any(len(v) != width for v in values):
            bad = next(len(v) for v in values if len(v) != width)
            raise ValueError(f"a stored row has {bad} bytes; this version's rows have {width}")
        raw = np.frombuffer(b"".join(values), np.uint8).reshape(len(values), len(models), 3)
        raw = raw.astype(np.uint32)
        micro = (raw[..., 0] << 16) | (raw[..., 1] << 8) | raw[..., 2]
        probas = micro / 1e6  # the same doubles as int / 1e6
        labels = (probas >= np.array([m.threshold for m in models])).astype(np.int8)
        names = [self.classes[i] if len(self.classes) > i else str(i) for i in (0, 1)]
        champion = models[0]
        top_name, threshold, version = champion.name, champion.threshold, champion.version
        top_labels, top_probas = labels[:, 0].tolist(), probas[:, 0].tolist()
        tops = [
            {
                "label": label,
                "class": names[label],
                "proba": proba,
                "threshold": threshold,
                "model": top_name,
                "model_version": version,
            }
            for label, proba in zip(top_labels, top_probas, strict=True)
        ]
        if len(models) == 1:
            return tops
        columns = [
            [
                {
                    "label": label,
                    "class": names[label],
                    "proba": proba,
                    "threshold": m.threshold,
                    "model_version": m.version,
                }
                for label, proba in zip(labels[:, j].tolist(), probas[:, j].tolist(), strict=True)
            ]
            for j, m in enumerate(models)
        ]
        order = [m.name for m in models]
        for top, entries in zip(tops, zip(*columns, strict=True), strict=True):
            top["models"] = dict(zip(order, entries, strict=True))
        return tops

    def json(self, value: bytes) -> bytes:
        """The prediction as JSON text (a JSON-layout value is that already)."""
        return self.jsons([value])[0]

    def jsons(self, values: Sequence[bytes | None]) -> list[bytes | None]:
        """`json` of many stored values (None where a row is absent), decoded together."""
        import orjson

        if not self.compact:
            return list(values)
        return [orjson.dumps(p) if p is not None else None for p in self.predictions(values)]


@dataclass(frozen=True)
class Reads:
    """The commands that read some rows of one version, and where each answer goes."""

    commands: list[tuple[Any, ...]]
    positions: list[list[int]]  # per command: the requested keys its answer fills (-1: none)
    size: int
    carries_pointer: bool = False  # the first command's first answer is the pointer

    def values(self, replies: Sequence[Any]) -> list[bytes | None]:
        """Stored values in request order (None: absent) from the commands' replies."""
        found: list[bytes | None] = [None] * self.size
        for reply, positions in zip(replies, self.positions, strict=True):
            for position, value in zip(positions, reply, strict=True):
                if position >= 0:
                    found[position] = value
        return found

    def pointer(self, replies: Sequence[Any]) -> bytes | None:
        """The pointer's value, when `plan_reads` was given its name and had a command."""
        if not self.carries_pointer:
            raise ValueError("these reads did not read the pointer")
        return replies[0][0]


# One Redis: a slice of rows read in one short script (HGET each), instead of one command
# per row; keys are built inside, so it cannot run on a cluster (rows span every slot).
# ARGV: pointer (or ''), rows prefix, n, n buckets, n digests. Returns the pointer's value
# (nil without one), then the n rows: a single-key read is one command, not a pipeline.
_READ_SLICE_SCRIPT = """
local n = tonumber(ARGV[3])
local found = {ARGV[1] ~= '' and redis.call('GET', ARGV[1]) or false}
for i = 1, n do
  found[i + 1] = redis.call('HGET', ARGV[2] .. ARGV[3 + i], ARGV[3 + n + i])
end
return found
"""


def plan_reads(
    layout: Layout,
    keys: Sequence[str],
    slice_size: int = 1_000,
    scripted: bool = False,
    pointer: str | None = None,
) -> Reads:
    """How to read `keys` of one version: on one Redis (`scripted`), one short script per
    slice of `slice_size` rows (Redis serves other clients between slices); on a cluster,
    one HMGET per bucket (redis-py splits the pipeline by node). The JSON layout: MGET
    slices (one Redis only). On one Redis, `pointer` (its key name) is read by the first
    command too (`Reads.pointer`): the pointer and the rows in one command."""
    commands: list[tuple[Any, ...]] = []
    positions: list[list[int]] = []
    if not layout.compact:
        for first in range(0, len(keys), slice_size):
            part = keys[first : first + slice_size]
            head = (pointer,) if pointer and not commands else ()
            commands.append(("MGET", *head, *(layout.rows + k for k in part)))
            positions.append([-1] * len(head) + list(range(first, first + len(part))))
        return Reads(commands, positions, len(keys), bool(pointer and commands))
    located = [(i, layout.digest(k)) for i, k in enumerate(keys)]
    located = [(i, d) for i, d in located if d is not None]
    if scripted:
        for first in range(0, len(located), slice_size):
            part = located[first : first + slice_size]
            buckets = [str(int.from_bytes(d[:4], "big") % layout.buckets) for _, d in part]
            head = pointer if pointer and not commands else ""
            commands.append(
                ("EVAL", _READ_SLICE_SCRIPT, 0, head, layout.rows, len(part), *buckets)
                + tuple(d for _, d in part)
            )
            positions.append([-1] + [i for i, _ in part])
        return Reads(commands, positions, len(keys), bool(pointer and commands))
    groups: dict[str, tuple[list[bytes], list[int]]] = {}
    for index, digest in located:
        fields, where = groups.setdefault(layout.bucket_name(digest), ([], []))
        fields.append(digest)
        where.append(index)
    for name, (fields, where) in groups.items():
        commands.append(("HMGET", name, *fields))
        positions.append(where)
    return Reads(commands, positions, len(keys))
