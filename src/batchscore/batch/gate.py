"""The publish gate: what a batch must satisfy before readers are switched to it.

The new version is fully written but invisible until the pointer moves, so the check is
cheap and its failure harmless: a blocked batch stays staged, to be looked at and, if a
person agrees, published with `python -m batchscore promote VERSION`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Why drift can be unmeasured: the model was trained before reference profiles existed.
DRIFT_NOT_MEASURED = "drift not measured: the champion recorded no reference profile"


@dataclass(frozen=True)
class GateResult:
    passed: bool
    reasons: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what the gate could not check

    @property
    def summary(self) -> str:
        verdict = "passed" if self.passed else "blocked: " + "; ".join(self.reasons)
        return f"{verdict} ({'; '.join(self.notes)})" if self.notes else verdict


def check(
    drift: dict[str, float] | None,
    rows_read: int,
    rows_rejected: int,
    max_drift: float,
    max_bad_rows: float,
    noise: dict[str, float] | None = None,
) -> GateResult:
    """Pass when every feature's PSI is at most `max_drift` (plus the PSI that sampling
    alone gives at this batch's size, `noise`) and the share of rejected rows at most
    `max_bad_rows`; otherwise say which limit broke, naming the worst features.

    `drift` None: not measured (no reference profile); the bad-row limit applies all the same.
    """
    if max_drift < 0:
        raise ValueError(f"max_drift must be 0 or more, not {max_drift}")
    if not 0 <= max_bad_rows <= 1:
        raise ValueError(f"max_bad_rows is a share between 0 and 1, not {max_bad_rows}")
    reasons = []
    noise = noise or {}
    drifted = {
        name: value
        for name, value in (drift or {}).items()
        if value > max_drift + noise.get(name, 0.0)
    }
    if drifted:
        worst = sorted(drifted.items(), key=lambda item: -item[1])[:3]
        named = ", ".join(f"{name!r} {value:.2f}" for name, value in worst)
        more = f" and {len(drifted) - len(worst)} more" if len(drifted) > len(worst) else ""
        reasons.append(f"{len(drifted)} feature(s) drifted beyond PSI {max_drift:g}: {named}{more}")
    share = rows_rejected / rows_read if rows_read else 0.0
    if share > max_bad_rows:
        reasons.append(
            f"{rows_rejected} of {rows_read} rows rejected ({share:.2%}), "
            f"more than --max_bad_rows {max_bad_rows:g}"
        )
    return GateResult(not reasons, reasons, [DRIFT_NOT_MEASURED] if drift is None else [])


class GateBlocked(ValueError):
    """The batch failed the gate: it stays staged, and the run ends non-zero.

    A ValueError, so `@fail_fast` reports it in one line and Metaflow does not retry it.
    """
