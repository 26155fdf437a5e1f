"""Print the RESULTS.md tables (markdown) from the run directories the scripts in this folder wrote.

Usage: .venv/bin/python scripts/results/collect.py [RUNS_DIR]   (default /work/runs/cars-small)
Reads only files: RUN/metrics_test.json (or metrics.json), RUN/metrics_test_knn*.json (or metrics_knn*.json),
RUN/metrics.csv, RUN/config.yaml, INDEX/metrics.json
and the `NAME.time` files (`/usr/bin/time` JSON lines: wall and CPU seconds of each command).
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import yaml

RUNS = Path(sys.argv[1] if len(sys.argv) > 1 else "/work/runs/cars-small")

# row id, run dir, metrics file, script, reference top-1 (full Stanford Cars, 224 px, ResNet-50/DenseNet-121)
# The cheaper variant of strong-efficientnet-lite0-finetune: only the last 4 of 8 stages train, backbone lr x0.3.
LAST4 = "--set 'model.unfreeze_schedule={0: 4}' --set model.backbone_lr_mult=0.3"
TRANSFER = [
    ("T1", "seed-t1", "metrics.json", "t1.sh", 42.4),
    ("T2", "seed-t2", "metrics.json", "t2.sh", 73.8),
    ("T3", "seed-t3", "metrics.json", "t3.sh", 71.7),
    (
        "strong",
        "strong-efficientnet-all",
        "metrics.json",
        "NAME=strong-efficientnet-all strong-efficientnet.sh",
        None,
    ),
    ("strong-resnet50-448 recipe", "strong-448-recipe", "metrics.json", "strong-448-recipe.sh", None),
    ("strong, last 4 stages", "strong-efficientnet", "metrics.json", f"strong-efficientnet.sh {LAST4}", None),
    (
        "strong, last 4 stages, 192 px",
        "strong-efficientnet-192",
        "metrics.json",
        f"NAME=strong-efficientnet-192 IMG=192 strong-efficientnet.sh {LAST4}",
        None,
    ),
]
KNN = [
    ("R1", "seed-t2", "metrics_knn3_euclidean.json", "r1.sh", 74.9),
    ("R2", "seed-t2", "metrics_knn10_euclidean.json", "r2.sh", 76.8),
    ("R3", "seed-t3", "metrics_knn7_cosine.json", "r3.sh", 73.4),
]
SCRATCH = [
    ("S1", "seed-s1", "metrics.json", "IMG=64 s1.sh", 8.9),
    ("S2", "seed-s2", "metrics.json", "IMG=64 s2.sh", 8.2),
    ("S3", "seed-s3", "metrics.json", "IMG=64 s3.sh", 72.3),
    ("strong", "strong-cnn", "metrics.json", "IMG=64 strong-cnn.sh", None),
]
RETRIEVAL = [
    ("frozen", "retrieval-frozen-lite0", "retrieval-frozen.sh"),
    ("Proxy-Anchor, 8 epochs", "strong-proxyanchor/index-test", "EPOCHS=8 retrieval-metric.sh"),
    (
        "Proxy-Anchor, 16 epochs",
        "strong-proxyanchor-16/index-test",
        "NAME=strong-proxyanchor-16 EPOCHS=16 retrieval-metric.sh",
    ),
]
TIME_NAME = {"seed-t1": "seed-t1", "seed-t2": "seed-t2", "seed-t3": "seed-t3"}


def cmd(script: str) -> str:
    """`ENV=… name.sh ARGS` → `ENV=… scripts/results/name.sh ARGS` (the settings the row was run with)."""
    return " ".join(f"scripts/results/{w}" if w.endswith(".sh") else w for w in script.split(" "))


def load(p: Path) -> dict | None:
    """A result file by its pre-contract name, preferring the split-named one (carspotter.rundir)."""
    new = p.with_name(
        p.name.replace("metrics.json", "metrics_test.json").replace("metrics_knn", "metrics_test_knn")
    )
    for q in (new, p):
        if q.is_file():
            return json.loads(q.read_text())
    return None


def times(name: str) -> list[dict]:
    p = RUNS / f"{name}.time"
    if not p.is_file():
        return []
    out = []
    for line in p.read_text().splitlines():
        line = line.strip()
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


def pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.1f} %"


def train_cost(run: str) -> str:
    t = times(run)
    if not t:
        return "—"
    tr = t[0]  # the first command of a script is the training
    return f"{tr['wall_s'] / 60:.0f} min / {(tr['user_s'] + tr['sys_s']) / 60:.0f} min"


def setup(run: str) -> str:
    cfg_p = RUNS / run / "config.yaml"
    if not cfg_p.is_file():
        return "—"
    c = yaml.safe_load(cfg_p.read_text())
    hist = (
        list(csv.DictReader((RUNS / run / "metrics.csv").open()))
        if (RUNS / run / "metrics.csv").is_file()
        else []
    )
    best = ""
    if hist:
        key = "val_accuracy" if "val_accuracy" in hist[0] else "val_recall_at_1"
        vals = [float(r[key]) for r in hist if r.get(key)]
        if vals:
            i = max(range(len(vals)), key=lambda j: vals[j])
            best = f", best ep {i + 1} (val {100 * vals[i]:.1f} %)"
    return f"{c['data']['img_size']} px, {c['train']['epochs']} ep{best}"


def cls_table(rows: list[tuple], title: str, time_col: str = "Train wall / CPU") -> str:
    head = (
        f"**{title}**\n\n| Experiment | Model Description | Loss | Accuracy | F1 Score | Precision | Recall "
        f"| Predict Time | Reference accuracy | Setup | {time_col} | Reproduce |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for rid, run, mfile, script, ref in rows:
        m = load(RUNS / run / mfile)
        cfg_p = RUNS / run / "config.yaml"
        desc = yaml.safe_load(cfg_p.read_text())["description"] if cfg_p.is_file() else "not run"
        if m is None:
            lines.append(
                f"| {rid} | {desc} | — | not run | — | — | — | — | "
                f"{'—' if ref is None else f'{ref:.1f} %'} | — | — | `{cmd(script)}` |"
            )
            continue
        loss = "—" if m.get("loss") is None else f"{m['loss']:.3f}"
        pt = m.get("predict_time_s")
        n = m.get("n_images")
        ptime = "—" if pt is None else f"{pt:.1f} s ({1000 * pt / n:.1f} ms/img)"
        knn = mfile.startswith("metrics_knn")
        cost = train_cost("seed-" + rid.lower()) if knn else train_cost(run)
        lines.append(
            f"| {rid} | {desc} | {loss} | **{pct(m['accuracy'])}** | {pct(m['f1_macro'])} | "
            f"{pct(m['precision_macro'])} | {pct(m['recall_macro'])} | {ptime} | "
            f"{'—' if ref is None else f'{ref:.1f} %'} | {setup(run) if not knn else 'k=' + str(m.get('k')) + ', ' + str(m.get('metric'))} | "
            f"{cost} | `{cmd(script)}` |"
        )
    return head + "\n".join(lines) + "\n"


def retrieval_table() -> str:
    head = (
        "| Embedding | R@1 | R@2 | R@4 | R@8 | MAP@R | queries | Setup | Wall / CPU (all commands) | Reproduce |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for name, d, script in RETRIEVAL:
        m = load(RUNS / d / "metrics.json")
        run = d.split("/")[0]
        t = times(run) or times(next(w for w in script.split() if w.endswith(".sh")).removesuffix(".sh"))
        cost = (
            (
                f"{sum(x['wall_s'] for x in t) / 60:.0f} min / "
                f"{sum(x['user_s'] + x['sys_s'] for x in t) / 60:.0f} min"
            )
            if t
            else "—"
        )
        if m is None:
            lines.append(f"| {name} | not run | | | | | | | | `{cmd(script)}` |")
            continue
        lines.append(
            f"| {name} | **{pct(m['recall_at_1'])}** | {pct(m['recall_at_2'])} | {pct(m['recall_at_4'])} | "
            f"{pct(m['recall_at_8'])} | {pct(m['map_at_r'])} | {m.get('n', '—')} | "
            f"{setup(run) if (RUNS / run / 'config.yaml').is_file() else str(m.get('dim', '')) + '-d'} | {cost} | "
            f"`{cmd(script)}` |"
        )
    return head + "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(cls_table(TRANSFER, "Transfer learning"))
    # the kNN rows train nothing: their time is the `evaluate --knn` command's (embedding gallery + queries, search)
    print(cls_table(KNN, "Retrieval (kNN classification)", "kNN evaluate wall / CPU (no training)"))
    print(cls_table(SCRATCH, "From scratch"))
    print("**Retrieval, Cars196 protocol**\n")
    print(retrieval_table())
