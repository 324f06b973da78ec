"""The fixed held-out split of the training set, and the metrics the model card reports.

Shared by ``models/train.py`` (which writes the card) and the unit tests (which
re-evaluate the shipped weights), so both use exactly the same split and formulas.
Only numpy; no sklearn.
"""

from __future__ import annotations

import hashlib

import numpy as np

#: Percentage of isic_ids held out for evaluation.
HELD_OUT_PERCENT = 20

SPLIT_DESCRIPTION = (
    f"held out: int(sha256(isic_id utf-8).hexdigest()[:8], 16) % 100 < {HELD_OUT_PERCENT} "
    f"(~{HELD_OUT_PERCENT}% of isic_ids, fixed, independent of the data order)"
)


def is_held_out(isic_id: str) -> bool:
    """True when ``isic_id`` belongs to the fixed held-out split."""
    h = int(hashlib.sha256(isic_id.encode("utf-8")).hexdigest()[:8], 16)
    return h % 100 < HELD_OUT_PERCENT


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """ROC AUC by the rank (Mann-Whitney U) formula, ties get average ranks.

    Returns NaN when only one class is present.
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(positive, dtype=bool).ravel()
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(s.size, dtype=np.float64)
    sorted_s = s[order]
    i = 0
    while i < s.size:  # average ranks over ties
        j = i
        while j + 1 < s.size and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def per_class_recall(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Recall of each class (NaN for a class absent from ``y_true``)."""
    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    out = np.full(n_classes, np.nan)
    for c in range(n_classes):
        m = y_true == c
        if m.any():
            out[c] = float((y_pred[m] == c).mean())
    return out


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> float:
    """Mean recall over the classes present in ``y_true``."""
    return float(np.nanmean(per_class_recall(y_true, y_pred, n_classes)))


def summarise(probs: np.ndarray, y_true: np.ndarray, codes: list[str]) -> dict:
    """Card figures for predictions ``probs`` (N x C) against labels ``y_true`` (indices)."""
    probs = np.asarray(probs, dtype=np.float64)
    y_true = np.asarray(y_true)
    pred = probs.argmax(axis=1)
    rec = per_class_recall(y_true, pred, len(codes))
    out = {
        "n": int(y_true.size),
        "accuracy": float((pred == y_true).mean()),
        "balanced_accuracy": balanced_accuracy(y_true, pred, len(codes)),
        "recall": {c: round(float(r), 4) for c, r in zip(codes, rec) if not np.isnan(r)},
    }
    if "mel" in codes:
        k = codes.index("mel")
        out["melanoma_auc"] = roc_auc(probs[:, k], y_true == k)
    return out
