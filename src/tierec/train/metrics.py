"""Evaluation metrics: exact ROC AUC (ties averaged) and log-loss."""

from __future__ import annotations

import numpy as np


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve via the rank-sum (Mann-Whitney U) form; ties get average ranks.

    Returns nan when only one class is present.
    """
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    s = scores[order]
    # average rank of each tie group (1-based)
    starts = np.r_[0, np.flatnonzero(s[1:] != s[:-1]) + 1]
    ends = np.r_[starts[1:], s.size]
    avg = (starts + ends + 1) / 2.0
    ranks = np.empty(s.size)
    ranks[order] = np.repeat(avg, ends - starts)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def log_loss(labels: np.ndarray, probs: np.ndarray, eps: float = 1e-7) -> float:
    p = np.clip(np.asarray(probs, dtype=np.float64), eps, 1 - eps)
    y = np.asarray(labels, dtype=np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def scores(labels: np.ndarray, probs: np.ndarray, names: list[str]) -> dict:
    """AUC, log-loss and positive rate of predictions ``probs`` for ``labels`` (float [N], or [N, K] for K
    tasks named ``names``): the first task's at the top level (a one-task run's figures), and with several
    tasks each one's under ``tasks``."""
    y, p = np.asarray(labels), np.asarray(probs)
    if p.ndim == 1 and y.ndim == 2:  # a one-task model on a multi-label data set: its first label
        y = y[:, 0]
    if y.ndim == 1:
        return {"rows": int(y.size), "auc": roc_auc(y, p), "logloss": log_loss(y, p), "positive_rate": float(y.mean())}
    tasks = {n: {"auc": roc_auc(y[:, k], p[:, k]), "logloss": log_loss(y[:, k], p[:, k]),
                 "positive_rate": float(y[:, k].mean())} for k, n in enumerate(names)}
    return {"rows": int(y.shape[0]), **tasks[names[0]], "tasks": tasks}
