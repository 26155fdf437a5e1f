"""Typed experiment configuration.

A preset YAML file is just a saved `ExperimentConfig`; every run writes the resolved one to
`RUN_DIR/config.yaml`, so any run can be repeated from its directory alone.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

AMP_CHOICES = ("auto", "none", "bf16", "fp16")  # precision names (models/inference.py)
TTA_CHOICES = ("none", "flip")  # test-time augmentation
_LEGACY_AMP = {
    "true": "auto",
    "1": "auto",
    "yes": "auto",
    "on": "auto",
    "false": "none",
    "0": "none",
    "no": "none",
}


def normalize_amp(value: Any, where: str = "train.amp") -> str:
    """A precision name from a config value (old boolean configs: true → auto, false → none)."""
    v = str(value).strip().lower()
    v = _LEGACY_AMP.get(v, v)
    if v not in AMP_CHOICES:
        raise ValueError(f"{where}: expected one of {', '.join(AMP_CHOICES)} (or true/false), got {value!r}")
    return v


def normalize_tta(value: Any, where: str = "eval.tta") -> str:
    v = "none" if value is None else str(value).strip().lower()
    if v not in TTA_CHOICES:
        raise ValueError(f"{where}: expected one of {', '.join(TTA_CHOICES)}, got {value!r}")
    return v


log = logging.getLogger(__name__)


@dataclass
class AugConfig:
    """Training-time augmentation. Evaluation always uses resize + centre crop."""

    random_crop: bool = False  # resize to `resize_size` (or img_size * 1.14) then RandomCrop(img_size)
    random_resized_crop: bool = (
        False  # timm/torchvision RandomResizedCrop(img_size, scale=(rrc_scale_min, 1))
    )
    rrc_scale_min: float = 0.25
    hflip: bool = False
    rotation: float = 0.0  # degrees, RandomRotation(±rotation)
    color_jitter: float = 0.0  # brightness = contrast = saturation = this value
    random_erasing: float = 0.0  # probability


@dataclass
class DataConfig:
    root: str = ""  # a prepared dataset directory (manifest.csv + images/)
    img_size: int = 224
    # shorter side before cropping; None → round(img_size / 0.875)
    resize_size: int | None = field(
        default=None, metadata={"help": "Shorter side before the crop (none = img_size / 0.875)."}
    )
    # How a photo becomes a square: "center" = shorter side to resize_size, centre crop (timm/torchvision default);
    # "squash" = the whole photo resized to img_size × img_size, aspect ratio ignored (nothing of the car cut off).
    crop_mode: Literal["center", "squash"] = field(
        default="center",
        metadata={"help": "center (shorter side, centre crop) | squash (whole photo to a square)."},
    )
    batch_size: int = field(default=32, metadata={"help": "Images per step per process."})
    num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes (0 = in process)."})
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    crop_bbox: bool = False  # use the manifest's x1,y1,x2,y2 when present
    # Progressive resizing: epoch (0-based) -> training input size from that epoch on. img_size stays the size
    # the model is evaluated and used at, so training below it and testing at it is FixRes's train/test
    # resolution trade (small early epochs cost less CPU). {} = train at img_size throughout.
    progressive: dict[int, int] = field(default_factory=dict)
    aug: AugConfig = field(default_factory=AugConfig)


@dataclass
class ModelConfig:
    arch: str = field(default="resnet50", metadata={"help": "Any timm model name, or scratch_cnn."})
    pretrained: bool = field(
        default=True, metadata={"help": "Start from ImageNet weights (downloaded, or --weights)."}
    )
    # local weights file: .safetensors, or a state dict (.pt/.pth, loaded weights_only); a CLI path is made absolute
    weights: str | None = field(
        default=None, metadata={"help": "Local backbone weights (.safetensors / .pt).", "path": True}
    )
    dropout: float = 0.0  # dropout before the classifier
    embed_dim: int | None = None  # add a linear embedding head of this size (metric learning)
    freeze: Literal["none", "backbone"] = "none"  # fine-tune all | head only
    # Progressive unfreezing: epoch → number of trailing backbone stages trainable (-1 = all).
    unfreeze_schedule: dict[int, int] = field(default_factory=dict)
    backbone_lr_mult: float = 1.0  # lr multiplier for backbone parameters (head keeps 1.0)
    freeze_bn: bool = False  # keep BatchNorm layers in eval mode (metric-learning recipes)
    # From-scratch CNN family (arch == "scratch_cnn").
    channels: list[int] = field(default_factory=lambda: [32, 64, 128])
    batchnorm: bool = False
    hidden_dim: int = 256  # width of the fully connected layer before the classifier (0 = none)
    # BatchNorm1d in that hidden layer. The BatchNorm presets (S2, S3, strong-cnn-scratch) set it: without it
    # their hidden units die in epoch 1 and the network predicts the class prior (models/scratch.py).
    # Default false so runs saved before it existed load with the layout they were trained with.
    hidden_bn: bool = False
    # Preprocessing; None = the backbone's own pretrained config (timm data config).
    mean: list[float] | None = None
    std: list[float] | None = None


@dataclass
class OptimConfig:
    name: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    nesterov: bool = False
    grad_accum: int = 1
    clip_grad_norm: float | None = None
    # Layer-wise lr decay: backbone stage i of n (0 = the stem side) trains at lr x layer_decay^(n - i), so the
    # generic early layers move least. None = one backbone lr (x model.backbone_lr_mult either way).
    layer_decay: float | None = None


@dataclass
class ScheduleConfig:
    name: Literal["step", "cosine", "none"] = "step"
    step_size: int = 7
    gamma: float = 0.1
    warmup_epochs: int = 0
    min_lr: float = 0.0


@dataclass
class TrainConfig:
    epochs: int = 10
    loss: Literal["cross_entropy", "proxy_anchor", "multi_similarity", "arcface"] = "cross_entropy"
    label_smoothing: float = 0.0
    # Mixup / CutMix (timm.data.Mixup): Beta(alpha) mixing of photo pairs and their labels; 0 = off. With both
    # set, each batch uses one of them (mix_switch_prob = CutMix's share); mix_prob = share of mixed batches.
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mix_prob: float = 1.0
    mix_switch_prob: float = 0.5
    ema_decay: float | None = None
    early_stop_patience: int | None = None
    # val metric used to pick the best checkpoint; "auto" = accuracy (classification) or recall_at_1 (metric)
    select_metric: Literal[
        "auto",
        "loss",
        "accuracy",
        "top5_accuracy",
        "f1_macro",
        "precision_macro",
        "recall_macro",
        "recall_at_1",
        "recall_at_2",
        "recall_at_4",
        "recall_at_8",
        "map_at_r",
    ] = "auto"
    # Precision (models/inference.py): auto = bf16 autocast on CUDA, fp32 on CPU | none = fp32 | bf16 | fp16
    # (explicit opt-in on any device). Recorded in model.json: evaluate/predict/serve/index use the same.
    amp: str = field(
        default="auto",
        metadata={"help": "Precision: auto (bf16 on CUDA, fp32 on CPU; default) | none | bf16 | fp16."},
    )
    channels_last: bool = True
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N"})
    seed: int = 0
    deterministic: bool = False
    m_per_class: int = 4  # metric learning: samples per class in a batch
    warmup_head_epochs: int = 0  # metric learning: train only head + proxies first
    proxy_lr_mult: float = 100.0  # metric learning: proxies learn faster than the network
    sync_bn: bool = False  # DDP: convert BatchNorm to SyncBatchNorm
    log_every: int = 20  # steps between progress/TensorBoard updates
    # Training photos (a fixed, evenly spaced subset; 0 = off) scored in eval mode after every epoch, so a
    # network that cannot fit its training set shows in metrics.csv (train_eval_*) whatever dropout hides.
    eval_train_max: int = 1024
    # Metric-learning loss hyperparameters (task: metric); None = the method's published value
    # (retrieval.losses.LOSS_DEFAULTS: proxy_anchor margin 0.1 alpha 32; multi_similarity alpha 2 beta 50
    # base 0.5 miner_epsilon 0.1; arcface margin 28.6 scale 64).
    margin: float | None = None
    alpha: float | None = None
    beta: float | None = None
    base: float | None = None
    scale: float | None = None
    miner_epsilon: float | None = None

    def __post_init__(self) -> None:
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", str(self.device)):
            raise ConfigError(f"train.device: {self.device!r} is not one of auto | cpu | mps | cuda | cuda:N")
        try:
            self.amp = normalize_amp(self.amp)  # old configs: true → auto, false → none
        except ValueError as e:
            raise ConfigError(str(e)) from None


@dataclass
class EvalConfig:
    """Defaults for evaluate/predict/serve, recorded with the run (model.json); each command can override."""

    # none | flip (mean of the logits of the photo and its mirror image)
    tta: str = field(
        default="none",
        metadata={"help": "Default test-time augmentation of evaluate/predict/serve: none | flip."},
    )

    def __post_init__(self) -> None:
        try:
            self.tta = normalize_tta(self.tta)
        except ValueError as e:
            raise ConfigError(str(e)) from None


@dataclass
class RetrievalConfig:
    k: int = field(default=5, metadata={"help": "kNN neighbours (evaluate --knn)."})
    metric: Literal["euclidean", "cosine"] = field(
        default="euclidean", metadata={"help": "kNN distance: euclidean | cosine."}
    )
    weighting: Literal["majority", "distance"] = "majority"
    gallery_split: str = "train"
    query_split: str = "test"
    batch_size: int = 64


@dataclass
class ExperimentConfig:
    name: str = "custom"
    description: str = ""
    task: Literal["classification", "knn", "metric"] = "classification"
    reference: dict[str, float] = field(default_factory=dict)  # published numbers this preset reproduces
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> None:
        """Checks across sections (run when a config is loaded or overridden; each field is checked alone by
        its type)."""
        sel, metric_task = self.train.select_metric, self.task == "metric"
        if metric_task and sel == "accuracy":  # the old default, which a metric run silently replaced
            log.warning("train.select_metric: 'accuracy' does not exist for task: metric; using recall_at_1")
            self.train.select_metric = sel = "auto"
        if metric_task and sel not in METRIC_SELECT:
            raise ConfigError(
                f"train.select_metric: {sel!r} is not a val metric of task: metric; choose one of {METRIC_SELECT}"
            )
        if not metric_task and sel not in CLS_SELECT:
            raise ConfigError(
                f"train.select_metric: {sel!r} is not a val metric of task: {self.task}; choose one of {CLS_SELECT}"
            )
        if metric_task and self.train.loss == "cross_entropy":
            raise ConfigError(
                "train.loss: task: metric needs a metric-learning loss: proxy_anchor | multi_similarity | arcface"
            )
        t = self.train
        if (
            t.mixup_alpha < 0
            or t.cutmix_alpha < 0
            or not 0 <= t.mix_prob <= 1
            or not 0 <= t.mix_switch_prob <= 1
        ):
            raise ConfigError(
                "train.mixup_alpha / cutmix_alpha must be >= 0 and train.mix_prob / mix_switch_prob in [0, 1]"
            )
        if metric_task and (t.mixup_alpha or t.cutmix_alpha):
            raise ConfigError("train.mixup_alpha / cutmix_alpha: mixing labels needs task: classification")
        d = self.optim.layer_decay
        if d is not None and not 0 < d <= 1:
            raise ConfigError(f"optim.layer_decay: expected a factor in (0, 1], got {d!r}")
        bad = {e: s for e, s in self.data.progressive.items() if int(e) < 0 or int(s) < 16}
        if bad:
            raise ConfigError(
                f"data.progressive: expected epoch (>= 0) -> training size (>= 16 px), got {bad}"
            )
        if not metric_task and self.train.loss != "cross_entropy":
            raise ConfigError(
                f"train.loss: {self.train.loss!r} is only used with task: metric (task is {self.task!r}); "
                "set task: metric or train.loss: cross_entropy"
            )


CLS_SELECT = ("auto", "loss", "accuracy", "top5_accuracy", "f1_macro", "precision_macro", "recall_macro")
METRIC_SELECT = ("auto", "recall_at_1", "recall_at_2", "recall_at_4", "recall_at_8", "map_at_r")
# Fields that no longer exist; old config.yaml files that set them still load (with a warning).
REMOVED_FIELDS: dict[str, tuple[str, ...]] = {
    "RetrievalConfig": ("embed_source", "index_type", "nprobe", "ef_search"),
}


# Short names for the fields people override most: `carspotter train --epochs 2` == `--set train.epochs=2` ==
# `--set epochs=2`. The one table of them: the CLI makes one option per entry, typed and documented from the field
# (its type, and `metadata["help"]` when the field has one; `metadata["path"]`: a path, made absolute).
ALIASES: dict[str, str] = {
    "epochs": "train.epochs",
    "img_size": "data.img_size",
    "resize_size": "data.resize_size",
    "crop_mode": "data.crop_mode",
    "batch_size": "data.batch_size",
    "num_workers": "data.num_workers",
    "backbone": "model.arch",
    "arch": "model.arch",
    "weights": "model.weights",
    "pretrained": "model.pretrained",
    "lr": "optim.lr",
    "device": "train.device",
    "seed": "train.seed",
    "k": "retrieval.k",
    "metric": "retrieval.metric",
    "amp": "train.amp",
    "tta": "eval.tta",
}


class ConfigError(ValueError):
    """A config file or override names an unknown field or a value of the wrong type."""


def config_field(dotted: str) -> tuple[dataclasses.Field, Any]:
    """The dataclass field at a dotted path (`train.epochs`) and its resolved type, for tools built on the config."""
    cls: Any = ExperimentConfig
    *sections, name = dotted.split(".")
    for s in sections:
        cls = typing.get_type_hints(cls)[s]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if name not in fields:
        raise ConfigError(f"{dotted!r}: unknown field; known: {sorted(fields)}")
    return fields[name], typing.get_type_hints(cls)[name]


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Turn YAML/CLI values into the annotated type, with an error that names the field."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {' | '.join(map(str, args))}")
        return value
    if origin in (typing.Union, types.UnionType):
        is_none = value is None or (isinstance(value, str) and value.lower() in ("none", "null"))
        if is_none and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        return _coerce(value, non_none[0], where)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if origin is list:
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else value.split(",")
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        kt, vt = args
        return {_coerce(k, kt, where): _coerce(v, vt, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp in (int, float):
        try:
            out = tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}") from None
        if tp is int and isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return out
    if tp is str:
        if value is None:
            raise ConfigError(f"{where}: expected a string, got null")
        return str(value)
    return value


def from_dict(cls: type, data: dict[str, Any], where: str = "config") -> Any:
    """Build a (nested) dataclass from a mapping; unknown keys are an error, missing keys take defaults."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    removed = set(data) & set(REMOVED_FIELDS.get(cls.__name__, ()))
    if removed:
        log.warning("%s: ignoring removed field(s) %s (no longer used)", where, sorted(removed))
        data = {k: v for k, v in data.items() if k not in removed}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {sorted(unknown)}; known: {sorted(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    try:
        out = cls(**kwargs)
        if isinstance(out, ExperimentConfig):
            out.validate()
        return out
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def load_config(path: str | Path) -> ExperimentConfig:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return from_dict(ExperimentConfig, data, where=str(path))


def dump_config(cfg: ExperimentConfig, path: str | Path | None = None) -> str:
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    if path is not None:
        from carspotter.utils import atomic_write_text

        atomic_write_text(Path(path), text)
    return text


def apply_overrides(cfg: ExperimentConfig, overrides: dict[str, Any]) -> ExperimentConfig:
    """Return a copy with dotted-key overrides (`train.epochs`, or an alias like `epochs`) applied."""
    data = to_dict(cfg)
    for key, value in overrides.items():
        dotted = ALIASES.get(key.replace("-", "_"), key.replace("-", "_"))
        parts = dotted.split(".")
        node = data
        for p in parts[:-1]:
            if p not in node or not isinstance(node[p], dict):
                raise ConfigError(f"override {key!r}: no section {p!r}")
            node = node[p]
        if parts[-1] not in node:
            raise ConfigError(f"override {key!r}: unknown field {dotted!r}")
        if isinstance(value, str) and value.strip().startswith(("[", "{")):
            value = yaml.safe_load(value)
        node[parts[-1]] = value
    return from_dict(ExperimentConfig, data)


def parse_set_args(items: list[str]) -> dict[str, Any]:
    """`["train.epochs=3", "model.dropout=0.5"]` → a dict of overrides."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.epochs=3")
        k, v = item.split("=", 1)
        out[k.strip()] = yaml.safe_load(v) if v.strip() else v
    return out
