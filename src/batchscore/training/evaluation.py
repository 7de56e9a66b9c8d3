"""Test-set metrics and the pictures that go with them (confusion matrices, ROC curves).

Label 1 is the positive class throughout, so precision and recall mean the same thing
for every model and every dataset. Labels come from each model's recorded threshold,
the same rule the published predictions use, so the test metrics describe them.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import matplotlib

matplotlib.use("Agg")  # steps run headless, on laptops and in pods alike

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from sklearn.metrics import (  # noqa: E402
    ConfusionMatrixDisplay,
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)

from batchscore.training.models import labels_at, positive_proba  # noqa: E402

METRIC_NAMES = ("precision", "recall", "f1", "roc_auc", "accuracy")


def evaluate_model(
    estimator: Any, features: Any, labels: np.ndarray, threshold: float = 0.5
) -> dict[str, Any]:
    """Metrics on held-out rows at the model's threshold, plus the figures' raw material."""
    proba = positive_proba(estimator, features)
    predicted = labels_at(proba, threshold)
    return {
        "precision": float(precision_score(labels, predicted, pos_label=1, zero_division=0)),
        "recall": float(recall_score(labels, predicted, pos_label=1, zero_division=0)),
        "f1": float(f1_score(labels, predicted, pos_label=1, zero_division=0)),
        "roc_auc": float(roc_auc_score(labels, proba)),
        "accuracy": float(accuracy_score(labels, predicted)),
        "confusion": confusion_matrix(labels, predicted, labels=[0, 1]).tolist(),
        "threshold": float(threshold),
        "proba": proba,
    }


def metrics_only(results: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """{model: {metric: value}}: the flow's `metrics` artifact and the database rows."""
    return {name: {m: r[m] for m in METRIC_NAMES} for name, r in results.items()}


GRID_COLUMNS = 3  # confusion matrices per row on the card: five models fit in two rows


def _plot_confusion(ax: Any, name: str, confusion: list[list[int]], classes: tuple[str, str]):
    ConfusionMatrixDisplay(np.asarray(confusion), display_labels=list(classes)).plot(
        ax=ax, colorbar=False
    )
    ax.set_title(name)


def confusion_figure(name: str, confusion: list[list[int]], classes: tuple[str, str]) -> Figure:
    fig, ax = plt.subplots(figsize=(4, 3.5))
    _plot_confusion(ax, name, confusion, classes)
    ax.set_title(f"{name}: confusion matrix")
    fig.tight_layout()
    return fig


def confusion_grid_figure(
    results: Mapping[str, Mapping[str, Any]], classes: tuple[str, str]
) -> Figure:
    """Every model's confusion matrix side by side: one picture for the card, not a
    column of five."""
    rows = -(-len(results) // GRID_COLUMNS)
    columns = min(len(results), GRID_COLUMNS)
    fig, axes = plt.subplots(rows, columns, figsize=(3.4 * columns, 3.1 * rows), squeeze=False)
    for ax, (name, result) in zip(axes.flat, results.items(), strict=False):
        _plot_confusion(ax, name, result["confusion"], classes)
    for ax in list(axes.flat)[len(results) :]:
        ax.set_visible(False)
    fig.suptitle("Confusion matrices on the test split")
    fig.tight_layout()
    return fig


def roc_figure(
    results: Mapping[str, Mapping[str, Any]], labels: np.ndarray, classes: tuple[str, str]
) -> Figure:
    """ROC curves of every model; axes name the positive class, the legend gives each
    model's ROC AUC with the metrics table's four decimals."""
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for name, result in results.items():
        fpr, tpr, _ = roc_curve(labels, result["proba"], pos_label=1)
        ax.plot(fpr, tpr, label=f"{name} (AUC = {result['roc_auc']:.4f})")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=0.8)
    ax.set_xlabel(f"False positive rate (positive class: {classes[1]})")
    ax.set_ylabel(f"True positive rate (positive class: {classes[1]})")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.legend(loc="lower right")
    ax.set_title("ROC curves on the test split")
    fig.tight_layout()
    return fig


def png_bytes(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def figures(
    results: Mapping[str, Mapping[str, Any]], labels: np.ndarray, classes: tuple[str, str]
) -> dict[str, bytes]:
    """PNG bytes by file name: one confusion matrix per model, all of them in one grid
    (`confusion_matrices.png`, for the card), and one ROC chart."""
    pngs = {
        f"confusion_{name}.png": png_bytes(confusion_figure(name, r["confusion"], classes))
        for name, r in results.items()
    }
    pngs["confusion_matrices.png"] = png_bytes(confusion_grid_figure(results, classes))
    pngs["roc.png"] = png_bytes(roc_figure(results, labels, classes))
    return pngs
