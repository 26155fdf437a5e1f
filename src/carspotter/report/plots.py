"""Report figures as PNG bytes: training curves, a confusion heat map, a retrieval grid.

Figures are made with matplotlib's object API on an Agg canvas created inside each function, so importing
this module touches no global backend state and the report works on a headless machine.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np

GOOD, BAD = "#1a9e3a", "#d62728"


def _figure(w: float, h: float, dpi: int = 90) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Any, palette: bool = False) -> bytes:
    """PNG bytes; `palette` stores photo grids with 256 adaptive colours (≈3× smaller, looks the same)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    if not palette:
        return buf.getvalue()
    from PIL import Image

    img = Image.open(io.BytesIO(buf.getvalue())).convert("RGB").quantize(256)
    out = io.BytesIO()
    img.save(out, format="PNG", optimize=True)
    return out.getvalue()


def _series(history: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for i, row in enumerate(history, start=1):
        v = row.get(key)
        if isinstance(v, int | float) and v == v:
            e = row.get("epoch", i)
            xs.append(float(e) if isinstance(e, int | float) else float(i))
            ys.append(float(v))
    return xs, ys


def training_curves(history: list[dict[str, Any]], title: str) -> bytes | None:
    """Loss and accuracy per epoch, train vs val; None when metrics.csv has nothing to plot."""
    panels = [
        (
            "Loss",
            [("train_loss", "train"), ("train_eval_loss", "train (eval mode)"), ("val_loss", "val")],
            False,
        ),
        (
            "Accuracy",
            [
                ("train_accuracy", "train"),
                ("train_eval_accuracy", "train (eval mode)"),
                ("val_accuracy", "val"),
                ("val_recall_at_1", "val Recall@1"),
                ("val_f1_macro", "val F1 (macro)"),
            ],
            True,
        ),
    ]
    if not any(_series(history, k)[0] for _, keys, _ in panels for k, _ in keys):
        return None
    from matplotlib.ticker import MaxNLocator

    fig = _figure(6.6, 2.5)
    for i, (ylabel, keys, is_pct) in enumerate(panels):
        ax = fig.add_subplot(1, 2, i + 1)
        for key, label in keys:
            xs, ys = _series(history, key)
            if xs:
                ys_plot = [100 * y if is_pct and y <= 1 else y for y in ys]
                ax.plot(
                    xs,
                    ys_plot,
                    marker="o",
                    ms=3,
                    label=label,
                    ls="--" if "f1" in key else ":" if "eval" in key else "-",
                )
        epochs = sorted({x for key, _ in keys for x in _series(history, key)[0]})
        if epochs and len(epochs) <= 12:
            ax.set_xticks(epochs)
            ax.set_xlim(epochs[0] - 0.5, epochs[-1] + 0.5)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        if is_pct and not any(_series(history, k)[0] for k in ("train_accuracy", "val_accuracy")):
            ylabel = "Recall@1"  # metric learning: no class accuracy, val Recall@1 instead
        ax.set_ylabel(ylabel + (" (%)" if is_pct else ""))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    return _png(fig)


def confusion(y_true: list[int], y_pred: list[int], n_classes: int) -> np.ndarray:
    """(C, C) counts, rows = true class."""
    from sklearn.metrics import confusion_matrix

    return confusion_matrix(y_true, y_pred, labels=list(range(n_classes)))


def most_confused_pairs(cm: np.ndarray, names: list[str], n: int = 10) -> list[tuple[str, str, int, float]]:
    """The n largest off-diagonal cells as (true name, predicted name, count, share of the true class)."""
    off = cm.copy()
    np.fill_diagonal(off, 0)
    order = np.argsort(off, axis=None)[::-1][:n]
    support = cm.sum(axis=1)
    out = []
    for flat in order:
        t, p = np.unravel_index(flat, cm.shape)
        if off[t, p] == 0:
            break
        out.append((names[t], names[p], int(off[t, p]), float(off[t, p] / max(support[t], 1))))
    return out


def confusion_heatmap(cm: np.ndarray, names: list[str], title: str, top_n: int = 20) -> bytes:
    """Row-normalised heat map; with many classes only the `top_n` most-confused ones are shown."""
    c = cm.shape[0]
    idx = np.arange(c)
    if c > top_n:
        off = cm - np.diag(np.diag(cm))
        score = off.sum(axis=0) + off.sum(axis=1)  # errors a class takes part in, as truth or prediction
        idx = np.sort(np.argsort(score, kind="stable")[::-1][:top_n])
        title += f" — {top_n} most-confused of {c} classes"
    sub = cm[np.ix_(idx, idx)].astype(float)
    norm = sub / np.maximum(cm[idx].sum(axis=1, keepdims=True), 1)  # share of each true class's images
    labels = [names[i][:28] for i in idx]
    size = 2.5 + 0.32 * len(idx)
    fig = _figure(size + 1.5, size)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(idx)), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(len(idx)), labels, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if len(idx) <= 25:
        for i in range(len(idx)):
            for j in range(len(idx)):
                if sub[i, j]:
                    ax.text(
                        j,
                        i,
                        int(sub[i, j]),
                        ha="center",
                        va="center",
                        fontsize=6,
                        color="white" if norm[i, j] > 0.5 else "black",
                    )
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of true class")
    ax.set_title(title, fontsize=10)
    return _png(fig)


@dataclass
class GridCell:
    image: Any  # PIL image (or None when it could not be read)
    label: str
    correct: bool | None = None  # None: the query column
    distance: float | None = None


def retrieval_grid(rows: list[list[GridCell]], title: str) -> bytes:
    """One row per query: the query photo, then its top-k gallery photos framed green (same class) or red."""
    import textwrap

    n_rows = len(rows)
    n_cols = max(len(r) for r in rows)
    fig = _figure(1.6 * n_cols, 1.95 * n_rows + 0.3, dpi=80)
    for i, row in enumerate(rows):
        for j, cell in enumerate(row):
            ax = fig.add_subplot(n_rows, n_cols, i * n_cols + j + 1)
            if cell.image is not None:
                ax.imshow(np.asarray(cell.image.convert("RGB")))
            ax.set_xticks([])
            ax.set_yticks([])
            if cell.correct is None:
                color, width, mark = "#333333", 2, "query: "
            else:
                color, width, mark = (GOOD, 5, "✓ ") if cell.correct else (BAD, 5, "✗ ")
            for s in ax.spines.values():
                s.set_edgecolor(color)
                s.set_linewidth(width)
            text = "\n".join(textwrap.wrap(mark + cell.label, 20, max_lines=2, placeholder="…"))
            if cell.distance is not None:
                text += f"  d={cell.distance:.3g}"
            ax.set_title(text, fontsize=7, color=color if cell.correct is not None else "black")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return _png(fig, palette=True)
