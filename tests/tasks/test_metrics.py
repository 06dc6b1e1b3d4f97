import math

import pytest

from peftkit.tasks.metrics import baseline_metrics, glue_metrics


def test_accuracy_f1_and_mcc_by_hand():
    preds, refs = [1, 0, 1, 1], [1, 0, 0, 1]
    m = glue_metrics("mrpc", preds, refs)
    assert m["accuracy"] == pytest.approx(0.75)
    # tp=2, fp=1, fn=0 -> precision 2/3, recall 1, f1 0.8
    assert m["f1"] == pytest.approx(0.8)
    mcc = glue_metrics("cola", preds, refs)["matthews_correlation"]
    tp, tn, fp, fn = 2, 1, 1, 0
    expected = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert mcc == pytest.approx(expected)


def test_correlations():
    m = glue_metrics("stsb", [1.0, 2.0, 3.0, 5.0], [2.0, 4.0, 6.0, 7.0])
    assert m["spearman"] == pytest.approx(1.0)
    assert 0.9 < m["pearson"] < 1.0
    assert glue_metrics("stsb", [1.0, 1.0], [0.0, 3.0]) == {"pearson": 0.0, "spearman": 0.0}


def test_majority_baseline():
    assert baseline_metrics("sst2", [1, 1, 0], [1, 0, 0, 0])["accuracy"] == pytest.approx(0.25)
    b = baseline_metrics("mrpc", [1, 1, 0], [1, 1, 0, 1])
    assert b["accuracy"] == pytest.approx(0.75) and b["f1"] == pytest.approx(2 * 0.75 / 1.75)
