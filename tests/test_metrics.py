"""The training loop's accuracy and macro-F1 equal scikit-learn's (computed with numpy to keep it out of training processes)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score

from peftkit.loop import classification_metrics


@pytest.mark.parametrize("classes, rows, seed", [(2, 50, 0), (5, 37, 1), (7, 12, 2), (3, 1, 3)])
def test_metrics_equal_scikit_learn(classes: int, rows: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(rows, classes))
    labels = rng.integers(0, max(classes - 2, 1), size=rows)  # the top classes never occur: they count as F1 0
    got = classification_metrics(logits, labels)
    preds = logits.argmax(-1)
    assert got["accuracy"] == pytest.approx(accuracy_score(labels, preds))
    assert got["f1_macro"] == pytest.approx(f1_score(labels, preds, labels=list(range(classes)), average="macro", zero_division=0))


def test_perfect_and_empty_predictions() -> None:
    logits = np.eye(3)[[0, 1, 2, 1]]
    assert classification_metrics(logits, np.array([0, 1, 2, 1])) == {"accuracy": 1.0, "f1_macro": 1.0}
    assert classification_metrics(logits, np.array([1, 2, 0, 0]))["f1_macro"] == 0.0
