"""Calibrated confidence and the open-set threshold of a run: fitted on its val split, kept in calibration.json.

Temperature scaling (Guo et al. 2017): one scalar T divides the logits; fitted by minimising the val NLL
with L-BFGS on log T (checked against netcal's TemperatureScaling in the tests). ECE uses 15 equal-width
bins on the top-1 confidence, as netcal's `ECE(15)` does. The same step takes the open-set threshold: the
score below which a photo is answered "unknown", set so that `accept` (95 %) of known val photos pass.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from carspotter.rundir import CALIBRATION, RunError
from carspotter.utils import atomic_write_json

N_BINS = 15
SCORES = ("msp", "energy")
DEFAULT_SCORE = "msp"
DEFAULT_ACCEPT = 0.95


@dataclass
class Calibration:
    """What a run needs to turn logits into calibrated probabilities and a known/unknown decision."""

    temperature: float = 1.0
    open_set_score: str = DEFAULT_SCORE
    thresholds: dict[str, float] = field(default_factory=dict)  # per score kind; {} = never "unknown"
    accept: float = DEFAULT_ACCEPT
    fitted_on: str = ""
    n_fit: int = 0
    fit_metrics: dict[str, float] = field(default_factory=dict)
    # Labels the run had training photos of; None = all. A retrieval-protocol run (classes 1–98 in train,
    # 99–196 only in test) has 196 outputs, but the untrained half must never be named: it is masked out.
    known_labels: list[int] | None = None

    @property
    def threshold(self) -> float | None:
        return self.thresholds.get(self.open_set_score)

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits with the classes the run never trained on pushed to -1e4 (their probability becomes 0)."""
        logits = logits.float()
        if self.known_labels is None or len(self.known_labels) == logits.shape[-1]:
            return logits
        keep = torch.zeros(logits.shape[-1], dtype=torch.bool)
        keep[torch.as_tensor(self.known_labels, dtype=torch.long)] = True
        return logits.masked_fill(~keep, -1e4)  # finite: exp() is 0 but gradients w.r.t. T stay finite

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.mask(logits) / self.temperature, dim=-1)

    def scores(self, logits: torch.Tensor, kind: str | None = None) -> torch.Tensor:
        return open_set_score(self.mask(logits), self.temperature, kind or self.open_set_score)

    def unknown(self, logits: torch.Tensor) -> torch.Tensor:
        """True where the open-set score falls below the stored threshold (all False without one)."""
        t = self.threshold
        s = self.scores(logits)
        return s < t if t is not None else torch.zeros_like(s, dtype=torch.bool)


def open_set_score(logits: torch.Tensor, temperature: float, kind: str) -> torch.Tensor:
    """Higher = more like a known class. msp: max calibrated probability; energy: T·logsumexp(logits/T)."""
    z = logits.float() / temperature
    if kind == "msp":
        return torch.softmax(z, dim=-1).amax(dim=-1)
    if kind == "energy":
        return temperature * torch.logsumexp(z, dim=-1)
    raise ValueError(f"open-set score {kind!r}: choose one of {SCORES}")


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, max_iter: int = 100) -> float:
    """The T > 0 minimising the NLL of softmax(logits / T); 1.0 when there is nothing to fit."""
    if len(labels) == 0:
        return 1.0
    z = logits.detach().double()
    y = torch.as_tensor(labels, dtype=torch.long)
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    t = float(log_t.detach().exp())
    return t if math.isfinite(t) and t > 0 else 1.0


def nll(logits: torch.Tensor, labels: Any, temperature: float = 1.0) -> float:
    y = torch.as_tensor(labels, dtype=torch.long)
    return float(torch.nn.functional.cross_entropy(logits.double() / temperature, y))


def reliability(
    probs: np.ndarray, labels: np.ndarray, n_bins: int = N_BINS
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per equal-width confidence bin: mean confidence, accuracy, count (for ECE and the diagram)."""
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    # bin b holds conf in (b/n, (b+1)/n]; conf 0 goes to bin 0 (netcal and Guo et al. use the same edges)
    idx = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(idx, weights=conf, minlength=n_bins) / count
        acc = np.bincount(idx, weights=correct, minlength=n_bins) / count
    return mean_conf, acc, count


def ece(probs: np.ndarray, labels: np.ndarray, n_bins: int = N_BINS) -> float:
    """Expected calibration error of the top-1 confidence: Σ_b |acc_b − conf_b| · n_b / N."""
    mean_conf, acc, count = reliability(probs, labels, n_bins)
    if count.sum() == 0:
        return float("nan")
    ok = count > 0
    return float(np.sum(np.abs(acc[ok] - mean_conf[ok]) * count[ok]) / count.sum())


def threshold_at(scores: np.ndarray, accept: float = DEFAULT_ACCEPT) -> float:
    """The score that `accept` of these (known) photos reach or exceed."""
    return float(np.quantile(np.asarray(scores, dtype=np.float64), 1.0 - accept, method="lower"))


def calibration_metrics(logits: torch.Tensor, labels: np.ndarray, temperature: float) -> dict[str, float]:
    """ece (calibrated), ece_uncalibrated and nll (calibrated) on these logits."""
    raw = torch.softmax(logits.double(), dim=1).numpy()
    cal = torch.softmax(logits.double() / temperature, dim=1).numpy()
    return {
        "ece": ece(cal, labels),
        "ece_uncalibrated": ece(raw, labels),
        "nll": nll(logits, labels, temperature),
        "nll_uncalibrated": nll(logits, labels, 1.0),
        "temperature": float(temperature),
    }


def fit_calibration(
    logits: torch.Tensor,
    labels: np.ndarray,
    score: str = DEFAULT_SCORE,
    accept: float = DEFAULT_ACCEPT,
    fitted_on: str = "val",
    known_labels: list[int] | None = None,
) -> Calibration:
    """Temperature + open-set thresholds (for every score kind) from known photos' logits."""
    if score not in SCORES:
        raise ValueError(f"open-set score {score!r}: choose one of {SCORES}")
    if not 0 < accept < 1:
        raise ValueError(f"accept {accept}: must be in (0, 1)")
    logits = Calibration(known_labels=known_labels).mask(logits)
    t = fit_temperature(logits, torch.as_tensor(labels))
    thresholds = {k: threshold_at(open_set_score(logits, t, k).numpy(), accept) for k in SCORES}
    m = calibration_metrics(logits, labels, t) if len(labels) else {}
    return Calibration(t, score, thresholds, accept, fitted_on, len(labels), m, known_labels)


def save_calibration(run_dir: str | Path, cal: Calibration) -> Path:
    path = Path(run_dir) / CALIBRATION
    atomic_write_json(path, asdict(cal))
    return path


def load_calibration(run_dir: str | Path) -> Calibration:
    """The run's calibration.json, or the identity (T = 1, no open-set threshold) when it has none."""
    path = Path(run_dir) / CALIBRATION
    if not path.is_file():
        return Calibration()
    from carspotter.rundir import RunError

    try:
        d = json.loads(path.read_text())
        cal = Calibration(**d)
    except (json.JSONDecodeError, TypeError) as e:
        raise RunError(f"{path}: malformed ({e})") from None
    if not (isinstance(cal.temperature, int | float) and cal.temperature > 0):
        raise RunError(f"{path}: temperature must be a positive number, got {cal.temperature!r}")
    if cal.open_set_score not in SCORES:
        raise RunError(f"{path}: open_set_score {cal.open_set_score!r} is not one of {SCORES}")
    return cal


def trained_labels(run_dir: str | Path) -> list[int] | None:
    """The run's labels that had training photos (from its training manifest); None = all, or unknown."""
    from carspotter.data.manifest import read_manifest
    from carspotter.rundir import read_model_info, read_run_config

    try:
        cfg = read_run_config(run_dir)
        records = read_manifest(Path(cfg.data.root))
    except Exception:  # the training data moved or the run has no config: assume every class was trained
        return None
    names = read_model_info(run_dir).class_names
    index = {n: i for i, n in enumerate(names)}
    seen = sorted(
        {index[r.class_name] for r in records if r.split == cfg.data.train_split and r.class_name in index}
    )
    return None if len(seen) == len(names) else seen


def calibrate_run(
    run_dir: str | Path,
    data_dir: str | Path | None = None,
    split: str = "val",
    score: str = DEFAULT_SCORE,
    accept: float = DEFAULT_ACCEPT,
    device: str = "cpu",
    batch_size: int | None = None,
) -> Calibration:
    """Fit the run's temperature and open-set threshold on `split` (its val split) and write calibration.json."""
    from carspotter.engine.predict_logits import split_logits

    res = split_logits(run_dir, data_dir, split, device=device, batch_size=batch_size)
    trained = trained_labels(run_dir)
    labels = res.labels if trained is None else np.where(np.isin(res.labels, trained), res.labels, -1)
    known = labels >= 0
    if not known.any():
        raise RunError(f"{res.data_dir}: split {split!r} has no photos of the run's classes to calibrate on")
    where = f"{res.data_dir}:{split}"
    cal = fit_calibration(
        res.logits[known], labels[known], score, accept, fitted_on=where, known_labels=trained
    )
    save_calibration(run_dir, cal)
    return cal
