"""The run-directory and index-directory contract: every file name and the JSON of model.json / index.json.

Everything that reads or writes a run dir or an index dir takes its names from here, so one module says what
is on disk (docs/ARCHITECTURE.md draws it). This module sits at the bottom layer (config/utils): it knows
files and JSON, not networks; `models.loading.load_run` rebuilds a network from what it reads.

RUN_DIR/
  config.yaml                   the resolved ExperimentConfig
  model.json                    model config, class names, the complete preprocessing (data.transforms.Preprocess)
  best.safetensors              weights chosen on the val split (never on test)
  last.pt                       resumable state (weights_only-loadable)
  metrics.csv, tb/              per-epoch history
  calibration.json              temperature, open-set score + thresholds, trained labels (engine.calibration)
  metrics_<split>[@<data>].json, predictions_<split>[@<data>].csv          `evaluate RUN`
  metrics_<split>_knn<k>_<metric>[_<weighting>][_g<gallery>][@<data>].json `evaluate RUN --knn`
INDEX_DIR/
  index.faiss, meta.csv, index.json (metric, index type, dim, n, the embedder and its preprocessing)
  embedder.safetensors          a bare backbone's weights when they were downloaded (not a local file)
  catalogue.json, enrolled/     `carspotter enrol`: enrolled classes, copies of their photos (retrieval.catalogue)
  metrics.json                  `evaluate INDEX` (the indexed photos against each other)
  metrics_<split>_knn<k>[_<weighting>][@<data>].json                       `evaluate INDEX --knn`

`@<data>` names the prepared dataset when it is not the run's (or the index's) own, so no result overwrites
another. Results written before these names existed (metrics.json, predictions.csv, metrics_knn*.json) are
still read: see `find_test_metrics`, `find_predictions`, `knn_result_files`.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from carspotter.config import ExperimentConfig, load_config, normalize_amp, normalize_tta
from carspotter.utils import atomic_write_json

log = logging.getLogger(__name__)

# ---- run dir ------------------------------------------------------------------------------------------------
CONFIG = "config.yaml"
MODEL_JSON = "model.json"
BEST = "best.safetensors"
LAST = "last.pt"
HISTORY = "metrics.csv"
CALIBRATION = (
    "calibration.json"  # engine.calibration: fitted on val after training or by `carspotter calibrate`
)
TB = "tb"
LEGACY_METRICS = "metrics.json"  # before split-named results: the test split of the run's own data
LEGACY_PREDICTIONS = "predictions.csv"
# ---- index dir ----------------------------------------------------------------------------------------------
INDEX_FAISS = "index.faiss"
INDEX_JSON = "index.json"
META_CSV = "meta.csv"
INDEX_METRICS = "metrics.json"
EMBEDDER = "embedder.safetensors"  # a bare backbone's downloaded weights, so loading never downloads
INDEX_FILES = (INDEX_FAISS, META_CSV, INDEX_JSON)
CATALOGUE_JSON = "catalogue.json"  # enrolled classes (retrieval.catalogue, `carspotter enrol`)
ENROLLED_DIR = "enrolled"  # resized copies of enrolled photos; meta.csv rows with root=index point here

# Preprocessing keys of model.json / index.json written before Preprocess was complete.
_PRE_DEFAULTS: dict[str, Any] = {
    "resize_size": None,
    "crop_pct": 0.875,
    "crop_mode": "center",
    "interpolation": "bilinear",
}


class RunError(ValueError):
    """A run directory is missing pieces or is inconsistent; the message names the file."""


def is_index_dir(path: str | Path) -> bool:
    return (Path(path) / INDEX_FAISS).is_file()


# ---- result file names --------------------------------------------------------------------------------------
def _tag(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "data"


def data_tag(data_dir: str | Path | None, own_root: str | Path | None) -> str:
    """ "" for the run's own prepared dataset, else "@<folder name>" (results on other data never collide)."""
    if data_dir is None or not str(data_dir) or not own_root:  # no record of its own data: nothing to tell
        return ""
    if Path(data_dir).resolve() == Path(own_root).resolve():
        return ""
    return "@" + _tag(Path(data_dir).resolve().name)


def metrics_name(split: str, data: str = "") -> str:
    """`evaluate RUN` → metrics_test.json, metrics_val.json, metrics_test@other-data.json."""
    return f"metrics_{_tag(split.replace('+', '-'))}{data}.json"


def predictions_name(split: str, data: str = "") -> str:
    return f"predictions_{_tag(split.replace('+', '-'))}{data}.csv"


def zoom_metrics_name(split: str, data: str = "") -> str:
    """`evaluate RUN --zoom` → metrics_zoom_test.json: the one-look metrics_test.json is kept beside it."""
    return "metrics_zoom_" + metrics_name(split, data)[len("metrics_") :]


def zoom_predictions_name(split: str, data: str = "") -> str:
    return "predictions_zoom_" + predictions_name(split, data)[len("predictions_") :]


def knn_metrics_name(
    split: str,
    k: int,
    metric: str | None = None,
    weighting: str = "majority",
    gallery_split: str | None = None,
    data: str = "",
    options: tuple[str, ...] = (),
) -> str:
    """`evaluate … --knn` → metrics_test_knn7_cosine.json; a non-default weighting or gallery adds a part,
    and so does each embedding option (layer, flip, l2)."""
    parts = [f"metrics_{_tag(split.replace('+', '-'))}_knn{int(k)}"]
    if metric:
        parts.append(metric)
    if weighting != "majority":
        parts.append(weighting)
    if gallery_split and gallery_split != "train":
        parts.append("g" + _tag(gallery_split.replace("+", "-")))
    parts += [_tag(o) for o in options]
    return "_".join(parts) + f"{data}.json"


def find_test_metrics(run_dir: str | Path) -> Path | None:
    """The test-split result on the run's own data: metrics_test.json, or a pre-contract metrics.json."""
    for name in (metrics_name("test"), LEGACY_METRICS):
        if (Path(run_dir) / name).is_file():
            return Path(run_dir) / name
    return None


def find_predictions(run_dir: str | Path) -> Path | None:
    for name in (predictions_name("test"), LEGACY_PREDICTIONS):
        if (Path(run_dir) / name).is_file():
            return Path(run_dir) / name
    return None


def knn_result_files(run_dir: str | Path) -> list[Path]:
    """kNN results on the test split of the run's own data: metrics_test_knn*.json and legacy metrics_knn*.json."""
    d = Path(run_dir)
    if not d.is_dir():
        return []
    new = [p for p in d.glob("metrics_test_knn*.json") if "@" not in p.name]
    old = list(d.glob("metrics_knn*.json"))
    return sorted(new) + sorted(old)


# ---- preprocessing as stored --------------------------------------------------------------------------------
def complete_preprocess(pre: dict[str, Any], outer: dict[str, Any] | None = None) -> dict[str, Any]:
    """A stored preprocessing dict with every field of `Preprocess`.

    Files written before the complete Preprocess kept `resize_size`/`crop_mode` beside it (in `outer`) and
    recorded an `interpolation` the transforms never applied: such a file is read as what actually ran
    (bilinear), so an old run still evaluates exactly as before.
    """
    outer = outer or {}
    if not isinstance(pre, dict) or not {"img_size", "mean", "std"} <= set(pre):
        raise RunError(f"preprocess {pre!r}: needs img_size, mean and std")
    legacy = "crop_mode" not in pre
    out = dict(pre)
    for key, default in _PRE_DEFAULTS.items():
        if key not in out:
            out[key] = outer.get(key, default) if key in ("resize_size", "crop_mode") else default
    if legacy and pre.get("interpolation", "bilinear") != "bilinear":
        out["interpolation"] = "bilinear"  # what the pre-contract code applied, whatever it recorded
    if out["crop_mode"] is None:
        out["crop_mode"] = "center"
    return out


# ---- model.json ---------------------------------------------------------------------------------------------
@dataclass
class ModelInfo:
    """model.json: enough to rebuild the network and feed it."""

    model: dict[str, Any]  # ModelConfig as a dict
    num_classes: int
    class_names: list[str]
    preprocess: dict[str, Any]  # data.transforms.Preprocess as a dict (complete)
    source: str = ""  # where the weights came from (run dir, pretrained file …)
    extra: dict[str, Any] = field(default_factory=dict)  # keys this version does not know, kept on rewrite
    amp: str = "auto"  # train.amp: the precision every command runs this model at (models/inference.py)
    tta: str = "none"  # eval.tta: default test-time augmentation of evaluate/predict/serve

    @property
    def resize_size(self) -> int | None:
        return self.preprocess.get("resize_size")

    @property
    def crop_mode(self) -> str:
        return str(self.preprocess.get("crop_mode", "center"))

    @property
    def img_size(self) -> int:
        return int(self.preprocess["img_size"])

    def to_json(self) -> dict[str, Any]:
        return {
            **self.extra,
            "model": self.model,
            "num_classes": self.num_classes,
            "class_names": self.class_names,
            "preprocess": self.preprocess,
            "source": self.source,
            "amp": self.amp,
            "tta": self.tta,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any], where: str = MODEL_JSON) -> ModelInfo:
        try:
            known = {
                "model",
                "num_classes",
                "class_names",
                "preprocess",
                "source",
                "resize_size",
                "crop_mode",
                "amp",
                "tta",
            }
            return cls(
                model=dict(d["model"]),
                num_classes=int(d["num_classes"]),
                class_names=list(d["class_names"]),
                preprocess=complete_preprocess(d["preprocess"], d),
                source=str(d.get("source") or ""),
                amp=normalize_amp(d.get("amp", "auto"), where=f"{where}: amp"),
                tta=normalize_tta(d.get("tta", "none"), where=f"{where}: tta"),
                extra={k: v for k, v in d.items() if k not in known},
            )
        except (KeyError, TypeError, ValueError) as e:
            raise RunError(f"{where}: malformed ({type(e).__name__}: {e})") from None


def write_model_json(run_dir: str | Path, info: ModelInfo) -> None:
    atomic_write_json(Path(run_dir) / MODEL_JSON, info.to_json())


def read_model_info(run_dir: str | Path) -> ModelInfo:
    p = Path(run_dir) / MODEL_JSON
    if not p.is_file():
        raise RunError(
            f"{run_dir}: not a carspotter run directory (no {MODEL_JSON}); train one with `carspotter train`"
        )
    return ModelInfo.from_json(_read_json_object(p), str(p))


def _read_json_object(p: Path) -> dict[str, Any]:
    """A run/index JSON file as a dict, or a RunError naming the file and what is wrong with it."""
    try:
        d = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise RunError(f"{p}: malformed ({e})") from None
    if not isinstance(d, dict):
        raise RunError(f"{p}: expected a JSON object")
    return d


def read_run_config(run_dir: str | Path) -> ExperimentConfig:
    p = Path(run_dir) / CONFIG
    if not p.is_file():
        raise RunError(f"{run_dir}: no {CONFIG}")
    return load_config(p)


# ---- index.json ---------------------------------------------------------------------------------------------
def write_index_json(index_dir: str | Path, info: dict[str, Any]) -> None:
    atomic_write_json(Path(index_dir) / INDEX_JSON, info)


def read_index_json(index_dir: str | Path) -> dict[str, Any]:
    """index.json with its preprocessing completed (an older index reads as the bilinear transform it used)."""
    p = Path(index_dir) / INDEX_JSON
    info = _read_json_object(p)
    if isinstance(info.get("preprocess"), dict):
        info["preprocess"] = complete_preprocess(info["preprocess"], info)
    for dead in ("resize_size", "crop_mode"):  # now inside preprocess
        info.pop(dead, None)
    return info


# ---- results ------------------------------------------------------------------------------------------------
class EvalResult(dict):
    """The metrics of one evaluation (a plain dict), plus the files it should become under `out_dir`.

    `evaluate_*` functions return one and write nothing; the CLI (or the demo) calls `.save()`. The metrics
    file is `files`' first entry; a CSV (predictions) may follow.
    """

    def __init__(self, metrics: dict[str, Any], out_dir: str | Path, files: dict[str, Any] | None = None):
        super().__init__(metrics)
        self.out_dir = Path(out_dir)
        self.files: dict[str, Any] = dict(files or {})

    @property
    def metrics_path(self) -> Path:
        return self.out_dir / next(iter(self.files))

    def save(self) -> list[Path]:
        """Write every file atomically (metrics as JSON of this dict's current contents)."""
        from carspotter.utils import atomic_write_text

        written = []
        for i, (name, content) in enumerate(self.files.items()):
            path = self.out_dir / name
            if i == 0:
                atomic_write_json(path, dict(self))
            else:
                atomic_write_text(path, content)
            written.append(path)
        return written
