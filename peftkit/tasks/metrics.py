"""GLUE metrics computed with scikit-learn and scipy (``evaluate.load`` needs the network)."""

from __future__ import annotations


def glue_metrics(task_name: str, predictions, references) -> dict[str, float]:
    """Metrics as GLUE defines them, in percent-free floats (accuracy 0..1, correlations -1..1)."""
    import numpy as np
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    preds, refs = np.asarray(predictions), np.asarray(references)
    if task_name == "stsb":
        if np.std(preds) == 0 or np.std(refs) == 0:  # correlation undefined for a constant
            return {"pearson": 0.0, "spearman": 0.0}
        return {"pearson": float(pearsonr(preds, refs)[0]), "spearman": float(spearmanr(preds, refs)[0])}
    if task_name == "cola":
        return {"matthews_correlation": float(matthews_corrcoef(refs, preds))}
    if task_name in ("mrpc", "qqp"):
        return {"f1": float(f1_score(refs, preds)), "accuracy": float(accuracy_score(refs, preds))}
    return {"accuracy": float(accuracy_score(refs, preds))}


def baseline_metrics(task_name: str, train_labels, eval_labels) -> dict[str, float]:
    """The trivial predictor's score: the majority training class, or the mean training score for stsb."""
    import numpy as np

    eval_labels = np.asarray(eval_labels)
    if task_name == "stsb":
        return {"pearson": 0.0, "spearman": 0.0, "mse": float(np.mean((eval_labels - np.mean(train_labels)) ** 2))}
    values, counts = np.unique(np.asarray(train_labels), return_counts=True)
    majority = values[np.argmax(counts)]
    return glue_metrics(task_name, np.full_like(eval_labels, majority), eval_labels)
