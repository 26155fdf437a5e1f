"""The metrics that say whether the answers can be trusted: hierarchy, calibration and open-set figures."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from carspotter.engine.answer import Hierarchy, hierarchy_metrics
from carspotter.engine.calibration import (
    SCORES,
    Calibration,
    calibration_metrics,
    open_set_score,
    threshold_at,
)


def open_set_metrics(
    known_scores: np.ndarray, unknown_scores: np.ndarray, accept: float = 0.95
) -> dict[str, float]:
    """AUROC of known-vs-unknown by score (known = positive), and the FPR where `accept` of known pass."""
    known_scores, unknown_scores = np.asarray(known_scores), np.asarray(unknown_scores)
    y = np.r_[np.ones(len(known_scores)), np.zeros(len(unknown_scores))]
    s = np.r_[known_scores, unknown_scores]
    t = threshold_at(known_scores, accept)
    return {
        "auroc": float(roc_auc_score(y, s)),
        "fpr_at_95tpr": float(np.mean(unknown_scores >= t)),
    }


def trust_metrics(
    logits: torch.Tensor, labels: np.ndarray, class_names: list[str], cal: Calibration
) -> dict[str, Any]:
    """Hierarchy and calibration metrics over known photos (label ≥ 0); open-set metrics when some are not."""
    labels = np.asarray(labels)
    logits = cal.mask(logits)  # untrained classes (if any) never count
    known = labels >= 0
    lk, yk = logits[known], labels[known]
    hier = Hierarchy.from_names(class_names)
    out: dict[str, Any] = {}
    out |= hierarchy_metrics(hier, cal.probs(lk).double().numpy(), yk)
    out |= calibration_metrics(lk, yk, cal.temperature)
    flags = cal.unknown(logits).numpy()
    out["open_set_score"] = cal.open_set_score
    out["open_set_threshold"] = cal.threshold
    out["rejected_known"] = float(flags[known].mean()) if cal.threshold is not None else None
    n_unknown = int((~known).sum())
    out["n_known"] = int(known.sum())
    out["n_unknown"] = n_unknown
    if n_unknown:
        for kind in SCORES:
            s = open_set_score(logits, cal.temperature, kind).numpy()
            m = open_set_metrics(s[known], s[~known], cal.accept)
            tag = "" if kind == cal.open_set_score else f"_{kind}"
            out[f"open_set_auroc{tag}"] = m["auroc"]
            out[f"open_set_fpr_at_95tpr{tag}"] = m["fpr_at_95tpr"]
        out["rejected_unknown"] = float(flags[~known].mean()) if cal.threshold is not None else None
    return out
