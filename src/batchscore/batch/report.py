"""The batch report: what was scored, how it compares with training and the live version.

Built in `ingest_redis` from the shards' merged counts, so it costs a few bin counts per
shard and nothing at the end that grows with the table. It becomes the batch flow's card,
a row in `batch_runs`, and a field of the version's manifest (the next batch's "live").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from batchscore.batch.drift import SCORE_BINS, BatchProfile, ReferenceProfile
from batchscore.batch.gate import GateResult

TOP_FEATURES = 15  # drifted features listed on the card


@dataclass
class BatchReport:
    version: str
    model: str
    threshold: float
    training_run_id: str
    classes: tuple[str, str]
    rows_read: int
    rows_scored: int
    keys_written: int  # distinct keys the version holds
    duplicates: int  # rows whose key repeated an earlier row's: the first in input order kept
    rows_rejected: int
    label_counts: list[int]
    score_counts: list[int]
    training_score_counts: list[int]
    live_score_counts: list[int] | None
    live_version: str | None
    drift: dict[str, float]
    gate: GateResult
    seconds: dict[str, float] = field(default_factory=dict)
    rejected_uri: str | None = None
    noise: float = 0.0  # PSI that sampling alone gives at this size, allowed on top
    # False: the champion recorded no reference profile (trained before profiles existed),
    # so drift and the score histogram are not measured; the bad-row limit still applied.
    drift_measured: bool = True

    @property
    def max_drift(self) -> float | None:
        """The largest feature PSI; None when drift was not measured."""
        if not self.drift_measured:
            return None
        return max(self.drift.values(), default=0.0)

    @property
    def label_shares(self) -> dict[str, float]:
        if not self.label_counts:  # not counted: drift was not measured
            return {}
        total = sum(self.label_counts) or 1
        return {c: n / total for c, n in zip(self.classes, self.label_counts, strict=True)}

    def summary(self) -> dict[str, Any]:
        """The columns `batch_runs` records beside the run (and `history` shows)."""
        worst = next(iter(self.drift.items()), ("", 0.0))
        return {
            "rows_read": self.rows_read,
            "rows_rejected": self.rows_rejected,
            "duplicates": self.duplicates,
            "max_drift": None if self.max_drift is None else round(self.max_drift, 6),
            "max_drift_feature": worst[0] or None,
            "gate": self.gate.summary,
            "report": self.to_dict(),
        }

    def summary_lines(self) -> dict[str, str]:
        """The card's headline figures, for the flow's last step to print."""
        worst = next(iter(self.drift), "-")
        lines = {"rows read / rejected": f"{self.rows_read:,} / {self.rows_rejected:,}"}
        if not self.drift_measured:
            return {**lines, "largest drift (PSI)": "not measured (no reference profile)"}
        return {
            **lines,
            "labels": ", ".join(f"{c} {s:.1%}" for c, s in self.label_shares.items()),
            "largest drift (PSI)": f"{self.max_drift:.3f} ({worst})",
        }

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["gate"] = {"passed": self.gate.passed, "reasons": self.gate.reasons}
        data["classes"] = list(self.classes)
        return data


def build_report(
    *,
    version: str,
    model: str,
    threshold: float,
    training_run_id: str,
    classes: tuple[str, str],
    reference: ReferenceProfile | None,
    profile: BatchProfile | None,
    drift: dict[str, float] | None,
    noise: float,
    rows_read: int,
    rows_scored: int,
    keys_written: int,
    duplicates: int,
    rows_rejected: int,
    gate: GateResult,
    live_version: str | None = None,
    live_score_counts: Sequence[int] | None = None,
    seconds: Mapping[str, float] | None = None,
    rejected_uri: str | None = None,
) -> BatchReport:
    """`reference`, `profile` or `drift` None: drift was not measured (no reference profile);
    the report then holds the counts and the gate's verdict on them."""
    measured = reference is not None and profile is not None and drift is not None
    return BatchReport(
        version=version,
        model=model,
        threshold=threshold,
        training_run_id=training_run_id,
        classes=classes,
        rows_read=rows_read,
        rows_scored=rows_scored,
        keys_written=keys_written,
        duplicates=duplicates,
        rows_rejected=rows_rejected,
        label_counts=list(profile.label_counts) if measured else [],
        score_counts=list(profile.score_counts) if measured else [],
        training_score_counts=list(reference.score_counts) if measured else [],
        live_score_counts=list(live_score_counts) if live_score_counts else None,
        live_version=live_version,
        drift=drift if measured else {},
        drift_measured=measured,
        gate=gate,
        noise=noise,
        seconds=dict(seconds or {}),
        rejected_uri=rejected_uri,
    )


def score_histogram_spec(report: BatchReport) -> dict[str, Any]:
    """The positive-class probability of this batch beside the live version's and
    training's, as a Vega-Lite spec: the card's bundled Vega draws it, so the step
    imports no plotting library (matplotlib cost ~1 s of `ingest_redis`)."""
    series = [("this batch", report.score_counts), ("training split", report.training_score_counts)]
    if report.live_score_counts:
        series.insert(1, (f"live ({report.live_version})", report.live_score_counts))
    rows = [
        {"from": round(i / SCORE_BINS, 4), "series": name, "share": n / (sum(counts) or 1)}
        for name, counts in series
        for i, n in enumerate(counts)
    ]
    order = [name for name, _ in series]
    return {
        "$schema": "https://vega.github.io/schema/vega-lite/v5.json",
        "height": 220,
        "layer": [
            {
                "data": {"values": rows},
                "mark": "bar",
                "encoding": {
                    "x": {
                        "field": "from",
                        "type": "ordinal",
                        "title": f"probability of {report.classes[1]!r} (bin start; "
                        f"rule: threshold {report.threshold:.3f})",
                    },
                    "xOffset": {"field": "series", "sort": order},
                    "y": {"field": "share", "type": "quantitative", "title": "share of rows"},
                    "color": {
                        "field": "series",
                        "sort": order,
                        "title": None,
                        "scale": {"scheme": "category10"},
                    },
                    "tooltip": [
                        {"field": "series"},
                        {"field": "from", "title": "bin start"},
                        {"field": "share", "format": ".2%"},
                    ],
                },
            },
            {
                "data": {"values": [{"from": _bin_start(report.threshold)}]},
                "mark": {"type": "rule", "strokeDash": [4, 3], "color": "black"},
                "encoding": {"x": {"field": "from", "type": "ordinal"}},
            },
        ],
    }


def _bin_start(value: float) -> float:
    """The start of the score bin holding `value` (the x axis is one tick per bin)."""
    return round(min(int(value * SCORE_BINS), SCORE_BINS - 1) / SCORE_BINS, 4)


def card_components(report: BatchReport) -> list[Any]:
    """The batch flow's card: verdict, counts, drift table, score histogram, stage times."""
    from metaflow.cards import Markdown, Table, VegaChart

    verdict = (
        "**passed**" if report.gate.passed else "**BLOCKED**: " + "; ".join(report.gate.reasons)
    )
    if report.gate.notes:
        verdict += " (" + "; ".join(report.gate.notes) + ")"
    shares = ", ".join(f"{c} {s:.1%}" for c, s in report.label_shares.items())
    labels = f" Labels: {shares}." if report.drift_measured else ""
    measured = report.drift_measured
    components: list[Any] = [
        Markdown(
            f"# Batch report: {report.version}\n"
            f"Gate: {verdict}\n\n"
            f"Model **{report.model}** (threshold {report.threshold:.4f}, training run "
            f"`{report.training_run_id}`).{labels}"
        ),
        Table(
            [
                ["rows read", f"{report.rows_read:,}"],
                ["rows scored", f"{report.rows_scored:,}"],
                ["keys written (distinct)", f"{report.keys_written:,}"],
                ["duplicate rows (first in input order kept)", f"{report.duplicates:,}"],
                ["rows rejected", f"{report.rows_rejected:,}"],
                [
                    "largest feature PSI",
                    f"{report.max_drift:.4f}" if measured else "not measured",
                ],
            ]
            + (
                [["PSI from sampling alone at this size", f"{report.noise:.4f}"]]
                if measured
                else []
            )
            + ([["rejected rows file", report.rejected_uri]] if report.rejected_uri else []),
            headers=["", ""],
        ),
    ]
    if not measured:
        components.append(
            Markdown(
                "## Drift: not measured\n"
                "The champion was trained before reference profiles were recorded, so this "
                "batch is not compared with its training rows; the bad-row limit applied. "
                "Train again (`python metaflow/train_models.py run`) to measure drift."
            )
        )
        return components + _stage_times(report)
    components += [
        Markdown("## Drift against the training rows (population stability index)"),
        Table(
            [
                [name, f"{value:.4f}", _psi_reading(value)]
                for name, value in list(report.drift.items())[:TOP_FEATURES]
            ],
            headers=["feature", "PSI", "reading"],
        ),
        Markdown("## Scores"),
        VegaChart(score_histogram_spec(report)),
    ]
    return components + _stage_times(report)


def _stage_times(report: BatchReport) -> list[Any]:
    from metaflow.cards import Markdown, Table

    if not report.seconds:
        return []
    return [
        Markdown("## Time per stage (seconds, summed over shards)"),
        Table([[k, f"{v:.2f}"] for k, v in report.seconds.items()], headers=["stage", "s"]),
    ]


def _psi_reading(value: float) -> str:
    if value < 0.1:
        return "stable"
    return "moderate shift" if value <= 0.25 else "large shift"
