"""The row-key contract: any client, in any language, can recompute a row's key.

    row_key = hex(SHA-256(concat over the model's feature columns, in training order,
                          of each raw value as IEEE-754 float64 little-endian))

-0.0 is keyed as 0.0 (they compare equal, so they must key equal); a row holding NaN or
an infinity is rejected, never keyed. With an id column, the id is the key instead.
"""

from __future__ import annotations

import binascii
import hashlib
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

if TYPE_CHECKING:  # imported where used: the batch flow's light steps import this module
    import pandas as pd

_BLOCK_ROWS = 8_192
_STRING_BYTES = np.iinfo(np.int32).max  # the most text an Arrow `string` array can hold


def feature_bytes(features: np.ndarray) -> np.ndarray:
    """Rows as the exact bytes that get hashed: float64 little-endian, -0.0 made 0.0."""
    matrix = np.asarray(features, dtype="<f8")
    if matrix.ndim == 1:
        matrix = matrix.reshape(1, -1)
    if not np.isfinite(matrix).all():
        from batchscore.rows.errors import InputError

        row, col = (int(i[0]) for i in np.nonzero(~np.isfinite(matrix)))
        raise InputError(f"row {row + 1}, feature {col + 1}: NaN or inf cannot be keyed")
    # One row-major copy (never the caller's array), then adding +0.0 in place turns -0.0
    # into +0.0 and leaves every other value as it is.
    rows = np.array(matrix, dtype="<f8", order="C", copy=True)
    rows += 0.0
    return rows


def feature_digests(features: np.ndarray | pd.DataFrame) -> np.ndarray:
    """Each row's SHA-256 as raw bytes (n x 32 uint8): the row key before it is hexed.
    The batch hands these straight to the writer (Redis stores the 32 bytes), so the hex
    text is made only where a person or a client reads a key.

    The features must already be in training order. Hashing is one hashlib call per row
    (the floor for SHA-256 from Python); everything around it is vectorised.
    """
    matrix = feature_bytes(np.asarray(features))
    if matrix.shape[1] == 0:
        raise ValueError("rows without feature columns cannot be keyed")
    sha256 = hashlib.sha256
    # Each row as one bytes object straight from the contiguous matrix, a block at a time
    # so that the row copies stay small whatever the number of rows.
    rows = matrix.view(np.dtype((np.void, matrix.shape[1] * 8))).ravel()
    digests = np.empty((len(rows), 32), dtype=np.uint8)
    for first in range(0, len(rows), _BLOCK_ROWS):
        block = rows[first : first + _BLOCK_ROWS].tolist()
        joined = b"".join([sha256(row).digest() for row in block])
        digests[first : first + len(block)] = np.frombuffer(joined, np.uint8).reshape(-1, 32)
    return digests


def hex_keys(digests: np.ndarray) -> pa.StringArray | pa.LargeStringArray:
    """Row keys as text from `feature_digests`, as an Arrow array (never a str per key)."""
    hexed = binascii.hexlify(np.ascontiguousarray(digests))  # one C pass
    rows = len(digests)
    # Arrow's `string` addresses its text with int32 offsets: 64 bytes a key wraps them past
    # ~33.5M keys, so a larger call gets `large_string` (int64 offsets), same values.
    if 64 * rows <= _STRING_BYTES:
        offsets, kind = np.arange(0, 64 * rows + 1, 64, dtype=np.int32), pa.StringArray
    else:
        offsets, kind = np.arange(0, 64 * rows + 1, 64, dtype=np.int64), pa.LargeStringArray
    return kind.from_buffers(rows, pa.py_buffer(offsets), pa.py_buffer(hexed))


def hash_rows(features: np.ndarray | pd.DataFrame) -> pa.StringArray | pa.LargeStringArray:
    """One hex key per row, as an Arrow array; the features in training order."""
    return hex_keys(feature_digests(features))


def row_keys(features: np.ndarray | pd.DataFrame) -> list[str]:
    """One hex key per row; the features must already be in training order."""
    return hash_rows(features).to_pylist()


def row_key(values: Sequence[float]) -> str:
    """The key of one row of raw feature values, in training order."""
    return row_keys(np.asarray([values], dtype="float64"))[0]


# The id rule, in one place: an id is a part of a Redis key (and of a SCAN pattern), so it
# may not be empty nor hold whitespace (exactly Python's `\s`), ':' or a glob character.
# Spelled twice, side by side: for Arrow's RE2 (whole columns, the batch) and for Python's
# `re` (one id at a time, the HTTP service); tests/test_keys.py checks that they agree on
# every code point.
_BAD_ID = r"[\s\x{0b}\x{1c}-\x{1f}\x{85}\p{Z}:*?\[\]]"
_BAD_ID_CHAR = re.compile(r"[\s:*?\[\]]")
BAD_ID_REASON = "id is empty or holds whitespace, ':' or a glob character"


def bad_ids(ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Per row, True where the id cannot be a key part (missing, or breaking the id rule).
    Used by `id_keys` and by quarantine."""
    text = pc.cast(ids, pa.string())
    bad = pc.or_(pc.equal(pc.utf8_length(text), 0), pc.match_substring_regex(text, _BAD_ID))
    return np.asarray(pc.fill_null(bad, True))


def is_usable_id(text: str) -> bool:
    """The id rule for one id already in hand (a request's key): what `bad_ids` accepts."""
    return bool(text) and _BAD_ID_CHAR.search(text) is None


def id_keys(
    ids: pd.Series, source: str = "input", column: str = "id", first_row: int = 1
) -> list[str]:
    """Keys from an id column: its values as text, each obeying the id rule."""
    from batchscore.rows.errors import InputError

    text = ids.astype("string")
    bad = bad_ids(pa.array(text, pa.string()))
    if bad.any():
        at = int(np.flatnonzero(bad)[0])
        raise InputError(
            f"{source}: column {column!r}, row {first_row + at}: {ids.iloc[at]!r}: "
            f"{BAD_ID_REASON}, so it cannot be a Redis key part"
        )
    return text.tolist()
