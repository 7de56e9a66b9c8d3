"""The rows a version published, read back from its input for readers (CLI, notebook).

A batch run with `--bad_rows quarantine` publishes the input's good rows only: reading
that input again with the strict checks fails on the first row it set aside. Readers
use the quarantine's own row check instead, so they get exactly the rows the run scored.
A version published with `--bad_rows reject` had no bad row, so the same read serves it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from batchscore.config import Settings
from batchscore.rows.errors import InputError

if TYPE_CHECKING:
    import pandas as pd


def read_published_rows(
    source: str,
    feature_columns: Sequence[str],
    settings: Settings | None = None,
    id_column: str | None = None,
    limit: int | None = None,
) -> pd.DataFrame:
    """The input's rows a batch run scores: its feature columns as float64 (training
    order) and, for an id-keyed version, the id column as text; the first `limit` only.

    The index is each row's 0-based position among the input's data rows, so anything
    kept beside the input row for row (the test split's labels) lines up with
    `.iloc[rows.index]`. Structural problems (a missing column) still raise `InputError`.
    """
    import numpy as np
    import pandas as pd

    from batchscore.rows.validation import partition_rows
    from batchscore.storage.tables import iter_tables

    keep = [id_column] if id_column else []
    frames: list[pd.DataFrame] = []
    read = kept = 0
    # Features read as text, as the quarantine reads them: a bad cell is a row set aside.
    for table in iter_tables(source, settings, text_columns=[*keep, *feature_columns]):
        if id_column and id_column not in table.column_names:
            raise InputError(f"{source}: no id column {id_column!r}; this version is keyed by it")
        part = partition_rows(table, feature_columns, source, read + 1, keep, id_column)
        set_aside = np.asarray(part.rejected.column("row"), dtype=np.int64) - 1
        positions = np.setdiff1d(np.arange(read, read + table.num_rows), set_aside)
        frame = part.good.select([*feature_columns, *keep]).to_pandas()
        frame.index = pd.Index(positions)
        frames.append(frame)
        read += table.num_rows
        kept += len(frame)
        if limit and kept >= limit:
            break
    if not read:
        raise InputError(f"{source}: the table has a header but no rows")
    rows = pd.concat(frames) if len(frames) > 1 else frames[0]
    return rows.iloc[:limit] if limit else rows
