"""The report's tables, in the reference study's layout, built from run/index records.

Numbers that are missing render as "—" and the table carries a note that says why.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from carspotter.report.load import IndexRecord, KnnResult, RunRecord

DASH = "—"
RESULT_COLUMNS = [
    "Experiment",
    "Model Description",
    "Loss",
    "Accuracy",
    "F1 Score",
    "Precision",
    "Recall",
    "Predict Time",
    "Reference accuracy",
]
REFERENCE_KEYS = ("accuracy", "top1", "top1_accuracy", "acc")


@dataclass
class Table:
    title: str
    headers: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)
    caption: str = ""


def pct(v: Any) -> str:
    """A fraction (0–1) or a percentage (> 1) → "73.8 %"; anything else → "—"."""
    if not isinstance(v, int | float) or isinstance(v, bool) or v != v:
        return DASH
    return f"{v * 100 if abs(v) <= 1 else v:.1f} %"


def num(v: Any, digits: int = 3) -> str:
    if not isinstance(v, int | float) or isinstance(v, bool) or v != v:
        return DASH
    return f"{v:.{digits}f}"


def seconds(m: dict[str, Any] | None) -> str:
    """Predict time over the test split, with the per-image cost when the image count is known."""
    if not m or not isinstance(m.get("predict_time_s"), int | float):
        return DASH
    t = float(m["predict_time_s"])
    n = m.get("n_images")
    per = f" ({1000 * t / n:.1f} ms/img)" if isinstance(n, int | float) and n else ""
    return f"{t:.2f} s{per}"


def reference_accuracy(ref: dict[str, float]) -> str:
    for k in REFERENCE_KEYS:
        if k in ref:
            return pct(ref[k])
    return DASH


def _metrics_row(name: str, desc: str, m: dict[str, Any] | None, ref: dict[str, float]) -> list[str]:
    m = m or {}
    return [
        name,
        desc or DASH,
        num(m.get("loss")),
        pct(m.get("accuracy")),
        pct(m.get("f1_macro")),
        pct(m.get("precision_macro")),
        pct(m.get("recall_macro")),
        seconds(m),
        reference_accuracy(ref),
    ]


def weights_source(run: RunRecord) -> str:
    """ "ImageNet (download)", "ImageNet (file x)", "random init", or "" for the scratch CNN."""
    if run.cfg is None or run.is_scratch:
        return ""
    m = run.cfg.model
    if m.weights:
        return f"pretrained file {m.weights.rsplit('/', 1)[-1]}"
    return "ImageNet (download)" if m.pretrained else "random init"


def random_weight_runs(runs: list[RunRecord]) -> list[RunRecord]:
    """Transfer/kNN runs that started from random weights: not comparable with the reference numbers."""
    return [r for r in runs if weights_source(r) == "random init"]


def _random_note(runs: list[RunRecord]) -> list[str]:
    bad = [r.name for r in random_weight_runs(runs)]
    if not bad:
        return []
    return [
        f"{', '.join(bad)}: backbone started from RANDOM weights (no ImageNet weights available), "
        "so these numbers are far below what transfer learning reaches and not comparable with the reference."
    ]


def _missing_notes(runs: list[RunRecord]) -> list[str]:
    return [n for r in runs for n in r.notes]


def transfer_runs(runs: list[RunRecord]) -> list[RunRecord]:
    return [r for r in runs if r.task == "classification" and not r.is_scratch]


def scratch_runs(runs: list[RunRecord]) -> list[RunRecord]:
    return [r for r in runs if r.task == "classification" and r.is_scratch]


def metric_runs(runs: list[RunRecord]) -> list[RunRecord]:
    return [r for r in runs if r.task == "metric"]


def _classification_table(title: str, runs: list[RunRecord], empty: str) -> Table:
    rows = [
        _metrics_row(r.name, r.cfg.description if r.cfg else "", r.metrics, r.cfg.reference if r.cfg else {})
        for r in runs
    ]
    notes = _missing_notes(runs) + _random_note(runs)
    if not rows:
        rows = [[DASH] * len(RESULT_COLUMNS)]
        notes.append(empty)
    return Table(title, RESULT_COLUMNS, rows, notes)


def results_tables(runs: list[RunRecord]) -> list[Table]:
    """Transfer learning / Retrieval (kNN) / From scratch (+ Metric learning when present)."""
    tables = [
        _classification_table(
            "Transfer learning", transfer_runs(runs), "No transfer-learning run was given."
        ),
        knn_table(runs),
        _classification_table("From scratch", scratch_runs(runs), "No from-scratch run was given."),
    ]
    for t in tables:
        t.caption = "Test split; Accuracy = top-1; F1/Precision/Recall are macro averages over classes."
    tables[1].caption += " kNN votes have no loss; Predict Time covers embedding the queries + the search."
    return tables


def knn_table(runs: list[RunRecord]) -> Table:
    results: list[tuple[RunRecord, KnnResult]] = [(r, k) for r in runs for k in r.knn]
    rows = [_metrics_row(k.name, k.description, k.metrics, k.reference) for _, k in results]
    knn_runs = [r for r in runs if r.task == "knn"]
    notes = [n for r in knn_runs for n in r.notes] + _random_note(
        list({id(r): r for r, _ in results}.values())
    )
    if not rows:
        rows = [[DASH] * len(RESULT_COLUMNS)]
        notes.append(
            "No kNN evaluation was found (metrics_knn*.json, or metrics.json of a run with task: knn)."
        )
    return Table("Retrieval (kNN)", RESULT_COLUMNS, rows, notes)


METRIC_COLUMNS = [
    "Experiment",
    "Model Description",
    "Recall@1",
    "Recall@2",
    "Recall@4",
    "Recall@8",
    "MAP@R",
    "Reference Recall@1",
]


def _recall_row(name: str, desc: str, m: dict[str, Any] | None, ref: dict[str, float]) -> list[str]:
    m = m or {}
    return (
        [name, desc or DASH]
        + [pct(m.get(f"recall_at_{k}")) for k in (1, 2, 4, 8)]
        + [
            pct(m.get("map_at_r")),
            pct(ref.get("recall_at_1")) if ref else DASH,
        ]
    )


def metric_table(runs: list[RunRecord], indexes: list[IndexRecord]) -> Table | None:
    """Recall@K / MAP@R of metric-learning runs and of any index evaluated with `evaluate_index`."""
    rows, notes = [], []
    for r in runs:
        has = r.metrics is not None and "recall_at_1" in r.metrics
        if r.task == "metric" or has:
            rows.append(
                _recall_row(
                    r.name, r.cfg.description if r.cfg else "", r.metrics, r.cfg.reference if r.cfg else {}
                )
            )
            if r.task == "metric":
                notes += r.notes
    for ix in indexes:
        src = ix.info.get("run_dir") or ix.info.get("backbone") or ""
        src_name = str(src).rstrip("/").rsplit("/", 1)[-1] if src else "?"
        desc = (
            f"gallery index of {src_name} ({ix.info.get('metric', '?')}, {ix.info.get('index_type', '?')}, "
            f"n={ix.info.get('n', len(ix.meta))})"
        )
        rows.append(_recall_row(f"{ix.path.name}/", desc, ix.metrics, {}))
        notes += ix.notes
    if not rows:
        return None
    return Table(
        "Metric learning / retrieval quality",
        METRIC_COLUMNS,
        rows,
        notes,
        caption="Recall@K: a query counts as correct if one of its K nearest neighbours has its class "
        "(the query itself excluded). MAP@R: mean average precision at R = number of same-class items.",
    )


# --- hyperparameters -------------------------------------------------------------------------------------

HP_COLUMNS = [
    "Experiment",
    "Backbone",
    "Img size",
    "Epochs",
    "Batch",
    "Optimizer",
    "LR",
    "Schedule",
    "Aug",
    "Dropout",
    "Freeze policy",
    "k / metric",
]


def _fmt_float(v: float) -> str:
    return f"{v:g}"


def _backbone(r: RunRecord) -> str:
    m = r.cfg.model  # type: ignore[union-attr]
    if r.is_scratch:
        return f"scratch CNN {m.channels}{' +BN' if m.batchnorm else ''}, FC {m.hidden_dim}"
    extra = f", embed {m.embed_dim}" if m.embed_dim else ""
    return f"{m.arch} ({weights_source(r)}{extra})"


def _optimizer(r: RunRecord) -> str:
    o = r.cfg.optim  # type: ignore[union-attr]
    bits = [o.name]
    if o.name == "sgd":
        bits.append(f"m={_fmt_float(o.momentum)}{' nesterov' if o.nesterov else ''}")
    if o.weight_decay:
        bits.append(f"wd={_fmt_float(o.weight_decay)}")
    return " ".join(bits)


def _lr(r: RunRecord) -> str:
    c = r.cfg  # type: ignore[union-attr]
    s = _fmt_float(c.optim.lr)
    if c.model.backbone_lr_mult != 1.0:
        s += f" (backbone ×{_fmt_float(c.model.backbone_lr_mult)})"
    return s


def _schedule(r: RunRecord) -> str:
    s = r.cfg.schedule  # type: ignore[union-attr]
    if s.name == "step":
        out = f"step {s.step_size} ep ×{_fmt_float(s.gamma)}"
    elif s.name == "cosine":
        out = f"cosine → {_fmt_float(s.min_lr)}"
    else:
        out = s.name
    return out + (f", warmup {s.warmup_epochs}" if s.warmup_epochs else "")


def _aug(r: RunRecord) -> str:
    a = r.cfg.data.aug  # type: ignore[union-attr]
    bits = []
    if a.random_resized_crop:
        bits.append(f"RRC({_fmt_float(a.rrc_scale_min)})")
    elif a.random_crop:
        bits.append("crop")
    if a.hflip:
        bits.append("hflip")
    if a.rotation:
        bits.append(f"rot ±{_fmt_float(a.rotation)}°")
    if a.color_jitter:
        bits.append(f"jitter {_fmt_float(a.color_jitter)}")
    if a.random_erasing:
        bits.append(f"erase {_fmt_float(a.random_erasing)}")
    return ", ".join(bits) or "none"


def _freeze(r: RunRecord) -> str:
    m = r.cfg.model  # type: ignore[union-attr]
    if r.is_scratch:
        return "— (all trained)"
    out = "head only" if m.freeze == "backbone" else "fine-tune all"
    if m.unfreeze_schedule:
        steps = ", ".join(f"ep {e}: {'all' if n < 0 else n}" for e, n in sorted(m.unfreeze_schedule.items()))
        out += f"; unfreeze {steps}"
    if m.freeze_bn:
        out += "; BN frozen"
    return out


def _k_metric(r: RunRecord) -> str:
    c = r.cfg  # type: ignore[union-attr]
    if c.task == "knn":
        return f"k={c.retrieval.k}, {c.retrieval.metric}, {c.retrieval.weighting}"
    if c.task == "metric":
        return f"{c.train.loss}, {c.retrieval.metric}"
    return DASH


def hyperparameter_table(runs: list[RunRecord]) -> Table:
    rows, notes = [], []
    for r in runs:
        if r.cfg is None:
            rows.append([r.name] + [DASH] * (len(HP_COLUMNS) - 1))
            notes.append(f"{r.name}: no readable config.yaml")
            continue
        c = r.cfg
        rows.append(
            [
                r.name,
                _backbone(r),
                str(c.data.img_size),
                str(c.train.epochs),
                str(c.data.batch_size),
                _optimizer(r),
                _lr(r),
                _schedule(r),
                _aug(r),
                _fmt_float(c.model.dropout),
                _freeze(r),
                _k_metric(r),
            ]
        )
    return Table("Hyperparameters", HP_COLUMNS, rows, notes)


def confused_pairs_table(pairs: list[tuple[str, str, int, float]], run_name: str) -> Table:
    rows = [[t, p, str(n), pct(f)] for t, p, n, f in pairs] or [[DASH, DASH, DASH, DASH]]
    notes = [] if pairs else ["No misclassified test images."]
    return Table(
        f"Most-confused class pairs ({run_name})",
        ["True class", "Predicted as", "Count", "Share of true class"],
        rows,
        notes,
    )
