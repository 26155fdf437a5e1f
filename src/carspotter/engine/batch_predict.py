"""`predict` over many photos: files and folders in, one answer per photo out (JSON or CSV rows).

A file that cannot be read becomes a row with its error and the batch goes on; nothing is skipped
silently, so N photos in always give N rows out.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from carspotter.data.images import ImageError, open_rgb
from carspotter.data.layouts.base import image_files
from carspotter.engine.answer import Hierarchy, build_answers
from carspotter.engine.calibration import load_calibration
from carspotter.models.loading import load_run
from carspotter.rundir import RunError

CSV_COLUMNS = [
    "path",
    "error",
    "unknown",
    "make",
    "make_probability",
    "model",
    "model_probability",
    "body",
    "body_probability",
    "year",
    "year_probability",
    "year_likely",
    "class",
    "class_probability",
    "open_set_score",
    "top5_classes",
    "top5_probabilities",
]


def expand_paths(inputs: Iterable[str | Path]) -> list[Path]:
    """Files as given (whatever their suffix: an unreadable one gets an error row), folders recursively."""
    out: list[Path] = []
    for p in map(Path, inputs):
        out.extend(image_files(p) if p.is_dir() else [p])
    return out


def error_row(path: str | Path, error: str) -> dict[str, Any]:
    return {"path": str(path), "error": error}


def predict_files(
    run_dir: str | Path,
    files: list[Path],
    k: int = 5,
    device: str = "cpu",
    batch_size: int = 32,
    progress: Callable[[int], None] | None = None,
    tta: str | None = None,
    looker: Callable[[Any, Any], Callable[[list[Image.Image]], Any]] | None = None,
    index_dir: str | Path | None = None,
    gallery_weight: float | None = None,
    gallery_temperature: float | None = None,
) -> list[dict[str, Any]]:
    """One answer dict per file, in order (see engine.answer); unreadable files get {"path", "error"}.

    Photos run at the run's precision and test-time augmentation (model.json; `tta` overrides), as
    `evaluate` and `serve` run them. `looker(model, info)` (explain.zoom.Looker, passed in so this layer does
    not import explain) gives the logits and where the car is (`box`, and `zoom` with a second look).
    `index_dir`: a gallery whose classes (enrolled ones too) join the run's (retrieval.open_classify).
    """
    from carspotter.models import inference

    model, info = load_run(run_dir, device)
    has_clf = info.num_classes > 0
    if not has_clf and index_dir is None:
        raise RunError(
            f"{run_dir}: a metric-learning run has no classifier; pass --index INDEX (its gallery answers) "
            "or use `carspotter search`"
        )
    cal = load_calibration(run_dir)
    tf = model.preprocess.transform()
    hier = Hierarchy.from_names(info.class_names) if has_clf else None
    tta = inference.normalize_tta(info.tta if tta is None else tta, where="--tta")
    look = looker(model, info) if looker is not None and has_clf else None
    gallery = None
    if index_dir is not None:
        from carspotter.retrieval.open_classify import gallery_for_run

        gallery = gallery_for_run(
            run_dir, index_dir, model, info, device, gallery_weight, gallery_temperature
        )
    rows: list[dict[str, Any]] = []
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        ok_idx, images, slot = [], [], {}
        for i, f in enumerate(chunk):
            try:
                im = open_rgb(f)
                tf(im)  # a photo the transform cannot take is that photo's error, not the batch's
                images.append(im)
                ok_idx.append(i)
            except ImageError as e:
                slot[i] = error_row(f, f"{e.reason}" + (f": {e}" if e.reason == "unreadable" else ""))
            except Exception as e:  # a decoder failure Pillow did not classify: still a row, never a crash
                slot[i] = error_row(f, f"cannot read ({type(e).__name__})")
        if images:
            looks = look(images) if look is not None else None
            logits = None  # (B, C); none for a metric-learning run, whose gallery answers alone
            if looks is not None:
                logits = looks.logits.float().cpu()
            elif has_clf:
                x = torch.stack([tf(im) for im in images]).to(device)
                logits = inference.run_model(model, x, info.amp, tta).cpu()
            if gallery is None:
                answers = build_answers(logits, info.class_names, cal, k, hier)
            else:
                oc, embed = gallery
                # the mixture's weights were measured on the classifier's softmax
                clf = logits.softmax(dim=1).numpy() if logits is not None else None
                probs = torch.from_numpy(oc.probs(clf, embed(images)))  # (B, U)
                answers = build_answers(None, oc.names, cal, k, probs=probs)
            for j, (i, a) in enumerate(zip(ok_idx, answers, strict=True)):
                if looks is not None:
                    a["box"] = [round(float(v), 4) for v in looks.boxes[j]]  # normalised x1, y1, x2, y2
                    a["zoomed"] = bool(looks.zoomed[j]) if looks.zoomed is not None else False
                slot[i] = {"path": str(chunk[i]), "error": None, **a}
        rows.extend(slot[i] for i in range(len(chunk)))
        if progress:
            progress(len(chunk))
    return rows


def top_lists(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`predict_files` rows in the short library form: [{"path", "top": [{"label", "class_name", "prob"}, …]}]
    (+ "box" and "zoomed" where the rows have them); a photo that could not be read raises ImageError."""
    out = []
    for r in rows:
        if r.get("error"):
            raise ImageError(r["path"], r["error"])
        short = {
            "path": r["path"],
            "top": [
                {"label": t["class_id"], "class_name": t["class_name"], "prob": t["probability"]}
                for t in r["predictions"]
            ],
        }
        out.append(short | {k: r[k] for k in ("box", "zoomed") if k in r})
    return out


def answers_json(rows: list[dict[str, Any]]) -> str:
    return json.dumps(rows, indent=2, ensure_ascii=False) + "\n"


def answers_csv(rows: list[dict[str, Any]]) -> str:
    """One CSV row per photo: the decoded hierarchy with calibrated probabilities, unknown, and the top-5."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for r in rows:
        if r.get("error"):
            w.writerow([r["path"], r["error"], *[""] * (len(CSV_COLUMNS) - 2)])
            continue
        top = r["predictions"][:5]
        y = r["year"]
        w.writerow(
            [
                r["path"],
                "",
                int(r["unknown"]),
                r["make"]["name"],
                f"{r['make']['probability']:.4f}",
                r["model"]["name"],
                f"{r['model']['probability']:.4f}",
                r["body"]["name"],
                f"{r['body']['probability']:.4f}",
                "" if y["value"] is None else y["value"],
                f"{y['probability']:.4f}",
                "-".join(str(v) for v in (y["likely"][:1] + y["likely"][-1:]))
                if len(y["likely"]) > 1
                else "",
                r["class_name"],
                f"{r['probability']:.4f}",
                f"{r['open_set']['score']:.4f}",
                ";".join(t["class_name"] for t in top),
                ";".join(f"{t['probability']:.4f}" for t in top),
            ]
        )
    return buf.getvalue()


def predict_with_index(
    run_dir: str | Path,
    index_dir: str | Path,
    paths: list[str | Path],
    k: int = 5,
    device: str = "cpu",
    gallery_weight: float | None = None,
    temperature: float | None = None,
) -> list[dict[str, Any]]:
    """Top-k over trained + gallery (incl. enrolled) classes: [{"path", "top": [{label, class_name, prob}]}].

    `label` is the position in the union (the run's classes first, then the gallery's other classes). The
    short form of `predict RUN --index` (engine.batch_predict.predict_files): the classifier runs at the
    run's precision and test-time augmentation.
    """
    rows = predict_files(
        run_dir,
        [Path(p) for p in paths],
        k=k,
        device=device,
        index_dir=index_dir,
        gallery_weight=gallery_weight,
        gallery_temperature=temperature,
    )
    return top_lists(rows)
