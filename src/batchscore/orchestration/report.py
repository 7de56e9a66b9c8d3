"""Human-readable output: the metrics table (terminal) and the evaluate step's card."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rich.console import Console
from rich.table import Table


def metrics_rows(
    metrics: Mapping[str, Mapping[str, float]], cv_scores: Mapping[str, float], champion: str
) -> list[list[str]]:
    """Header plus one row per model, best cross-validated score first; the metric columns
    in the order `evaluation.metrics_only` gives them (not imported: it loads matplotlib
    and scikit-learn, which the flows' `end` steps need nothing of)."""
    names = list(next(iter(metrics.values()), {}))
    header = ["model", "cv roc_auc", *names, "champion"]
    order = sorted(metrics, key=lambda m: (-cv_scores.get(m, 0.0), m))
    rows = [
        [
            name,
            f"{cv_scores.get(name, float('nan')):.4f}",
            *(f"{metrics[name][k]:.4f}" for k in names),
            "*" if name == champion else "",
        ]
        for name in order
    ]
    return [header, *rows]


def print_metrics(
    metrics: Mapping[str, Mapping[str, float]],
    cv_scores: Mapping[str, float],
    champion: str,
    title: str = "Test-split metrics (positive class = label 1)",
) -> None:
    header, *rows = metrics_rows(metrics, cv_scores, champion)
    table = Table(title=title)
    for column in header:
        table.add_column(column, justify="left" if column == "model" else "right")
    for row in rows:
        table.add_row(*row)
    Console(width=120).print(table)


def print_mapping(title: str, values: Mapping[str, Any]) -> None:
    table = Table(title=title, show_header=False)
    for key, value in values.items():
        table.add_row(str(key), str(value))
    Console(width=120).print(table)


def card_components(
    metrics: Mapping[str, Mapping[str, float]],
    cv_scores: Mapping[str, float],
    champion: str,
    pngs: Mapping[str, bytes],
    positive_class: str,
) -> list[Any]:
    """Metaflow card components: the table, the ROC chart, one confusion matrix per model."""
    from metaflow.cards import Image, Markdown
    from metaflow.cards import Table as CardTable

    header, *rows = metrics_rows(metrics, cv_scores, champion)
    components: list[Any] = [
        Markdown(
            f"# Model evaluation\nPositive class: **{positive_class}**. "
            f"Champion (best cross-validated ROC AUC): **{champion}**."
        ),
        CardTable(rows, headers=header),
        Markdown("## ROC curves"),
        Image(pngs["roc.png"], label="ROC curves on the test split"),
        Markdown("## Confusion matrices"),
        Image(pngs["confusion_matrices.png"], label="Confusion matrices on the test split"),
    ]
    return components
