"""The batch flow's parameters, checked in `start` before any data is read.

A typo such as `--bad_rows quarnatine` or a share given as a percentage (`--max_bad_rows 5`)
would otherwise be refused only after the input was read, or after every row was scored.
Each bad parameter gets one line naming it, the value given and the values allowed.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from batchscore.storage.sources import credentials_in, masked, unset_variables

log = logging.getLogger(__name__)

MODELS = ("champion", "all")
BAD_ROWS = ("reject", "quarantine")


class ParameterError(ValueError):
    """One or more flow parameters are out of range; one line per parameter.

    A ValueError, so `@fail_fast` prints it without a traceback and Metaflow does not retry.
    """

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


@dataclass(frozen=True)
class BatchParameters:
    """The flow's `--models`, `--shard_rows`, `--ttl_days`, `--bad_rows`, `--max_bad_rows`,
    `--max_drift` and `--input_path`, as given on the command line."""

    models: str = "champion"
    shard_rows: int = 0
    ttl_days: float = 0.0
    bad_rows: str = "reject"
    max_bad_rows: float = 0.0
    max_drift: float = 0.25
    input_path: str = ""

    def problems(self) -> list[str]:
        """One line per parameter out of range (empty when all are fine)."""
        found = []
        if self.models not in MODELS:
            found.append(_line("models", self.models, "one of " + _choices(MODELS)))
        if not isinstance(self.shard_rows, int) or self.shard_rows < 0:
            found.append(
                _line(
                    "shard_rows",
                    self.shard_rows,
                    "a whole number of rows, 1 or more (0: sized from the cores)",
                )
            )
        if not _finite(self.ttl_days) or self.ttl_days < 0:
            found.append(
                _line("ttl_days", self.ttl_days, "0 or more days (0: keys live until retired)")
            )
        if self.bad_rows not in BAD_ROWS:
            found.append(_line("bad_rows", self.bad_rows, "one of " + _choices(BAD_ROWS)))
        if not _finite(self.max_bad_rows) or not 0 <= self.max_bad_rows <= 1:
            found.append(
                _line(
                    "max_bad_rows",
                    self.max_bad_rows,
                    "a share of rows between 0 and 1 (0.02 allows 2%)",
                )
            )
        if math.isnan(self.max_drift) or self.max_drift < 0:
            found.append(
                _line("max_drift", self.max_drift, "a PSI of 0 or more (0.25: a large shift)")
            )
        missing = unset_variables(self.input_path)
        if missing:
            found.append(
                _line(
                    "input_path",
                    masked(self.input_path),
                    "resolvable: environment variable "
                    + ", ".join(missing)
                    + (" is" if len(missing) == 1 else " are")
                    + " not set where this step runs",
                )
            )
        return found

    def warnings(self) -> list[str]:
        """What works but should not be done: credentials written out in `--input_path`,
        which Metaflow records (and shows) as the run's parameter value."""
        found = credentials_in(self.input_path)
        if not found:
            return []
        return [
            f"--input_path holds {found}: Metaflow records parameter values, so it is kept in "
            "the run's metadata and shown by its client and UI. Name the secrets as "
            "environment variables instead, in single quotes so that the shell leaves them "
            "to the flow: --input_path 'https://${SRC_USER}:${SRC_PASSWORD}@host/x.csv' or "
            "--input_path '${SIGNED_URL}'"
        ]

    def warn(self) -> None:
        """Log `warnings` (the flow's `start` does, once)."""
        for line in self.warnings():
            log.warning("warning: %s", line)

    def check(self) -> None:
        """Raise ParameterError naming every parameter out of range."""
        if found := self.problems():
            raise ParameterError(found)


def _finite(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _choices(values: tuple[str, ...]) -> str:
    return ", ".join(f"'{v}'" for v in values)


def _line(name: str, value: object, allowed: str) -> str:
    shown = (
        f"'{value}'"
        if isinstance(value, str)
        else f"{value:g}"
        if isinstance(value, float)
        else value
    )
    return f"--{name} {shown}: must be {allowed}"
