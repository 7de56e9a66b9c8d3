"""Test-set metrics (label 1 positive) and the figures, checked on a hand-made example."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from batchscore.training.evaluation import METRIC_NAMES, evaluate_model, figures, metrics_only

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _threshold_model(bias: float = 0.0) -> LogisticRegression:
    """A real logistic regression with hand-set weights: predicts 1 exactly when x > -bias."""
    model = LogisticRegression()
    model.classes_ = np.array([0, 1])
    model.coef_ = np.array([[1.0]])
    model.intercept_ = np.array([bias])
    return model


# x:          -3  -2  -1   1   2   3
# predicted:   0   0   0   1   1   1
# true:        0   1   1   1   1   0
# TP = 2 (x=1, 2), FP = 1 (x=3), FN = 2 (x=-2, -1), TN = 1 (x=-3)
X = np.array([[-3.0], [-2.0], [-1.0], [1.0], [2.0], [3.0]])
Y = np.array([0, 1, 1, 1, 1, 0])


def test_metrics_by_hand():
    result = evaluate_model(_threshold_model(), X, Y)
    assert result["precision"] == pytest.approx(2 / 3)  # TP / (TP + FP)
    assert result["recall"] == pytest.approx(2 / 4)  # TP / (TP + FN)
    assert result["f1"] == pytest.approx(2 * (2 / 3) * (1 / 2) / (2 / 3 + 1 / 2))  # 4/7
    assert result["accuracy"] == pytest.approx(3 / 6)
    # Scores rise with x. Positives at -2, -1, 1, 2; negatives at -3 and 3: every positive
    # beats -3 and none beats 3, so 4 of the 8 pairs are ordered right.
    assert result["roc_auc"] == pytest.approx(4 / 8)
    # Rows: true 0, 1; columns: predicted 0, 1.
    assert result["confusion"] == [[1, 1], [2, 2]]
    assert result["proba"].shape == (6,)
    assert np.all(np.diff(result["proba"]) > 0)


def test_label_one_is_positive_not_the_majority_or_first_class():
    # Above, label 0 as positive would give precision TN / (TN + FN) = 1/3, not 2/3.
    # Shift the threshold: predicts 1 for x > -1.5.
    result = evaluate_model(_threshold_model(bias=1.5), X, Y)
    # predicted: 0 0 1 1 1 1 -> TP = 3, FP = 1, FN = 1, TN = 1
    # (label 0 as positive would give precision 1/2 and recall 1/2)
    assert result["precision"] == pytest.approx(3 / 4)
    assert result["recall"] == pytest.approx(3 / 4)
    assert result["confusion"] == [[1, 1], [1, 3]]


def test_zero_division_is_zero_not_an_error():
    # Predicts 0 everywhere: no positive predictions, precision defined as 0.
    result = evaluate_model(_threshold_model(bias=-100.0), X, Y)
    assert result["precision"] == 0.0
    assert result["recall"] == 0.0
    assert result["f1"] == 0.0


def test_metrics_only_keeps_the_five_metrics():
    results = {"a": evaluate_model(_threshold_model(), X, Y)}
    only = metrics_only(results)
    assert (
        set(only["a"])
        == set(METRIC_NAMES)
        == {
            "precision",
            "recall",
            "f1",
            "roc_auc",
            "accuracy",
        }
    )
    assert all(isinstance(v, float) for v in only["a"].values())


def test_figures_are_pngs_for_every_model_and_roc():
    results = {
        "tree": evaluate_model(_threshold_model(), X, Y),
        "svc": evaluate_model(_threshold_model(bias=1.5), X, Y),
    }
    pngs = figures(results, Y, ("benign", "malignant"))
    assert set(pngs) == {
        "confusion_tree.png",
        "confusion_svc.png",
        "confusion_matrices.png",
        "roc.png",
    }
    for name, data in pngs.items():
        assert data.startswith(PNG_SIGNATURE), name
        assert len(data) > 1000, name


def test_roc_chart_names_the_positive_class_and_gives_the_tables_precision():
    from batchscore.training.evaluation import roc_figure

    results = {
        "tree": evaluate_model(_threshold_model(), X, Y),
        "svc": evaluate_model(_threshold_model(bias=1.5), X, Y),
    }
    ax = roc_figure(results, Y, ("benign", "malignant")).axes[0]
    assert ax.get_xlabel() == "False positive rate (positive class: malignant)"
    assert ax.get_ylabel() == "True positive rate (positive class: malignant)"
    legend = [text.get_text() for text in ax.get_legend().get_texts()]
    assert legend == [f"{n} (AUC = {results[n]['roc_auc']:.4f})" for n in ("tree", "svc")]
    assert legend[0] == "tree (AUC = 0.5000)"


def test_confusion_matrices_share_one_grid():
    from batchscore.training.evaluation import confusion_grid_figure

    results = {f"m{i}": evaluate_model(_threshold_model(), X, Y) for i in range(5)}
    fig = confusion_grid_figure(results, ("benign", "malignant"))
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in visible] == list(results)
    # Two rows of three, not a column of five: at most twice one matrix's height.
    width, height = fig.get_size_inches()
    assert width > height and height <= 2 * 3.1


def test_metrics_are_at_the_models_threshold():
    # Probabilities are sigmoid(x). A threshold between sigmoid(-2) and sigmoid(-1)
    # predicts 1 for x >= -1: the same rows as the shifted model above, so the same counts.
    threshold = round(float(1 / (1 + np.exp(1.5))), 6)
    result = evaluate_model(_threshold_model(), X, Y, threshold)
    assert result["threshold"] == threshold
    assert result["precision"] == pytest.approx(3 / 4)
    assert result["recall"] == pytest.approx(3 / 4)
    assert result["confusion"] == [[1, 1], [1, 3]]
    # ROC AUC does not depend on any threshold.
    assert result["roc_auc"] == evaluate_model(_threshold_model(), X, Y)["roc_auc"]


def test_a_probability_at_the_threshold_counts_as_positive():
    # The x = -1 row's probability, as published (6 decimals), is the threshold itself.
    at_minus_one = round(float(1 / (1 + np.exp(1.0))), 6)
    result = evaluate_model(_threshold_model(), X, Y, at_minus_one)
    assert result["confusion"] == [[1, 1], [1, 3]]  # x = -1 predicted 1, x = -2 not
