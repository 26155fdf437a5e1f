"""The answer people get for one photo: make → model → year with calibrated probabilities, and "unknown".

Make, make+model and body probabilities are sums of the calibrated class probabilities. The answer is
decoded top-down (the likeliest make, then its likeliest model, then that model's likeliest class and
year), so the make shown is the make the model is surest of even when the single likeliest class
belongs to another make. `predict --json`, `predict --out` and the service's /api/classify all return
`build_answer`'s dict.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from carspotter.data.taxonomy import CarName, describe_all
from carspotter.engine.calibration import Calibration

YEAR_MASS = 0.9  # years of the chosen model that together hold this share of its probability are "likely"
ALT_MIN = 0.05  # show the runner-up class of the make only when it holds at least this much


def _groups(keys: list[Any]) -> tuple[np.ndarray, list[Any]]:
    names = list(dict.fromkeys(keys))
    where = {k: i for i, k in enumerate(names)}
    return np.array([where[k] for k in keys], dtype=np.int64), names


@dataclass
class Hierarchy:
    """Class index → make / make+model / body / year groups, built from the run's class names."""

    parts: list[CarName]
    make_idx: np.ndarray
    makes: list[str]
    model_idx: np.ndarray
    models: list[tuple[str, str]]
    body_idx: np.ndarray
    bodies: list[str]
    years: np.ndarray  # (C,) year or -1

    @classmethod
    def from_names(cls, class_names: list[str]) -> Hierarchy:
        parts = describe_all(class_names)
        make_idx, makes = _groups([p.make for p in parts])
        model_idx, models = _groups([(p.make, p.model) for p in parts])
        body_idx, bodies = _groups([p.body or "?" for p in parts])
        years = np.array([p.year if p.year is not None else -1 for p in parts], dtype=np.int64)
        return cls(parts, make_idx, makes, model_idx, models, body_idx, bodies, years)

    def sums(self, probs: np.ndarray, idx: np.ndarray, n: int) -> np.ndarray:
        """(N, C) class probabilities → (N, n) group probabilities."""
        onehot = np.zeros((len(idx), n), dtype=np.float64)
        onehot[np.arange(len(idx)), idx] = 1.0
        return np.asarray(probs, dtype=np.float64) @ onehot

    def decode(self, probs: np.ndarray) -> dict[str, np.ndarray]:
        """Top-down decisions per photo: make, model, class (within the model), year (within it), body."""
        probs = np.asarray(probs, dtype=np.float64)
        p_make = self.sums(probs, self.make_idx, len(self.makes))
        p_model = self.sums(probs, self.model_idx, len(self.models))
        p_body = self.sums(probs, self.body_idx, len(self.bodies))
        make = p_make.argmax(1)
        model_make = np.array(
            [self.make_idx[np.argmax(self.model_idx == m)] for m in range(len(self.models))]
        )
        masked = np.where(model_make[None, :] == make[:, None], p_model, -1.0)
        model = masked.argmax(1)
        in_model = np.where(self.model_idx[None, :] == model[:, None], probs, -1.0)
        cls = in_model.argmax(1)
        year = np.array([self._year(probs[i], model[i])[0] for i in range(len(probs))], dtype=np.int64)
        return {
            "make": make,
            "model": model,
            "class": cls,
            "year": year,
            "body": p_body.argmax(1),
            "p_make": p_make,
            "p_model": p_model,
            "p_body": p_body,
        }

    def _year(self, probs: np.ndarray, model: int) -> tuple[int, float, list[int], float]:
        """(likeliest year, its share, the likely years, their share) among the classes of one model."""
        members = np.flatnonzero(self.model_idx == model)
        total = float(probs[members].sum())
        by_year: dict[int, float] = {}
        for c in members:
            by_year[int(self.years[c])] = by_year.get(int(self.years[c]), 0.0) + float(probs[c])
        ranked = sorted(by_year.items(), key=lambda kv: -kv[1])
        likely, mass = [], 0.0
        for y, p in ranked:
            likely.append(y)
            mass += p
            if total <= 0 or mass >= YEAR_MASS * total:
                break
        share = ranked[0][1] / total if total > 0 else 1.0
        return ranked[0][0], share, sorted(likely), (mass / total if total > 0 else 1.0)


def hierarchy_metrics(hier: Hierarchy, probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """make_accuracy, model_accuracy (make+model, any year/body), body_accuracy, year_within_1_accuracy.

    Each level is the argmax of its own summed probabilities (so a right make+model counts even when the
    single likeliest class is the wrong year); the year is the likeliest year within that make+model.
    """
    labels = np.asarray(labels)
    probs = np.asarray(probs, dtype=np.float64)
    make = hier.sums(probs, hier.make_idx, len(hier.makes)).argmax(1)
    model = hier.sums(probs, hier.model_idx, len(hier.models)).argmax(1)
    body = hier.sums(probs, hier.body_idx, len(hier.bodies)).argmax(1)
    year = np.array([hier._year(probs[i], model[i])[0] for i in range(len(probs))], dtype=np.int64)
    true_year = hier.years[labels]
    year_ok = (np.abs(year - true_year) <= 1) & (true_year >= 0)
    return {
        "make_accuracy": float(np.mean(make == hier.make_idx[labels])),
        "model_accuracy": float(np.mean(model == hier.model_idx[labels])),
        "body_accuracy": float(np.mean(body == hier.body_idx[labels])),
        "year_within_1_accuracy": float(np.mean(year_ok)),
    }


def _strip_make(name: str, make: str) -> str:
    return name[len(make) :].strip() if name.startswith(make + " ") else name


def build_answers(
    logits: torch.Tensor | None,
    class_names: list[str],
    cal: Calibration,
    k: int = 5,
    hier: Hierarchy | None = None,
    probs: torch.Tensor | None = None,
) -> list[dict[str, Any]]:
    """One answer dict per row of `logits` (see the module docstring).

    `probs` instead of `logits`: probabilities over classes the classifier alone does not cover (a run's
    classes ∪ a gallery's enrolled ones); the open-set decision is then the max-probability score against
    the run's "msp" threshold, the one score that means the same over any set of classes.
    """
    hier = hier or Hierarchy.from_names(class_names)
    kind = cal.open_set_score
    if probs is None:
        assert logits is not None
        probs_t = cal.probs(logits)
        scores = cal.scores(logits).numpy()
        unknown = cal.unknown(logits).numpy()
    else:
        probs_t, kind = probs, "msp"
        scores = probs.max(dim=1).values.double().numpy()
        t_msp = cal.thresholds.get("msp")
        unknown = scores < t_msp if t_msp is not None else np.zeros(len(scores), dtype=bool)
    probs = probs_t.double().numpy()
    d = hier.decode(probs)
    k = min(k, len(class_names))
    top_i = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    out = []
    for i in range(len(probs)):
        make, model, cls = int(d["make"][i]), int(d["model"][i]), int(d["class"][i])
        year, year_share, likely, likely_mass = hier._year(probs[i], model)
        make_name = hier.makes[make]
        same_make = [int(c) for c in np.argsort(-probs[i], kind="stable") if hier.make_idx[c] == make]
        alt = next((c for c in same_make if c != cls), None)
        body = int(d["body"][i])
        out.append(
            {
                "class_id": cls,
                "class_name": class_names[cls],
                "probability": float(probs[i, cls]),
                "make": {"name": make_name, "probability": float(d["p_make"][i, make])},
                "model": {"name": hier.models[model][1], "probability": float(d["p_model"][i, model])},
                "body": {"name": hier.bodies[body], "probability": float(d["p_body"][i, body])},
                "year": {
                    "value": year if year >= 0 else None,
                    "probability": float(year_share),  # share of the model's probability on this year
                    "likely": [y for y in likely if y >= 0],
                    "likely_probability": float(likely_mass),
                },
                "alternative": None
                if alt is None or probs[i, alt] < ALT_MIN
                else {"class_id": alt, "class_name": class_names[alt], "probability": float(probs[i, alt])},
                "unknown": bool(unknown[i]),
                "open_set": {
                    "score": float(scores[i]),
                    "kind": kind,
                    "threshold": cal.thresholds.get(kind),
                },
                "temperature": cal.temperature,
                "predictions": [
                    {
                        "class_id": int(c),
                        "class_name": class_names[int(c)],
                        "probability": float(probs[i, c]),
                        "make": hier.parts[int(c)].make,
                        "model": hier.parts[int(c)].model,
                        "body": hier.parts[int(c)].body,
                        "year": hier.parts[int(c)].year,
                    }
                    for c in top_i[i]
                ],
            }
        )
    return out


def pct(p: float) -> str:
    return f"{100 * p:.0f} %"


def answer_lines(a: dict[str, Any]) -> list[str]:
    """Human lines: 'Audi 97 % → TTS Coupe 2012 74 % (TT RS Coupe 2012 12 %)' and the year range."""
    if a.get("error"):
        return [f"error: {a['error']}"]
    make = a["make"]["name"]
    line = f"{make} {pct(a['make']['probability'])} → {_strip_make(a['class_name'], make)} {pct(a['probability'])}"
    alt = a.get("alternative")
    if alt:
        line += f" ({_strip_make(alt['class_name'], make)} {pct(alt['probability'])})"
    lines = []
    if a["unknown"]:
        lines.append("not sure — this may be a car we don't know; nearest guesses:")
    lines.append(line)
    y = a["year"]
    if y["value"] is not None and len(y["likely"]) > 1:
        lines.append(f"year {y['value']} ({y['likely'][0]}–{y['likely'][-1]} likely)")
    return lines
