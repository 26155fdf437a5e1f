"""Image preprocessing: one `Preprocess` (travels with the weights) and its one evaluation transform.

`Preprocess.transform()` is the only place an evaluation transform is built: training's val/test pass,
`evaluate`, `predict`, `index`, `search`, `serve`, the report's grid and the ONNX parity check all call it on
the `Preprocess` stored in model.json / index.json. Training augmentation (`train_transform`) starts from the
same object.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from PIL import Image
from torchvision.transforms import v2 as T

from carspotter.config import AugConfig, DataConfig

DEFAULT_CROP_PCT = (
    0.875  # timm/torchvision: resize the shorter side to img_size / 0.875, centre-crop img_size
)
CROP_MODES = ("center", "squash")
INTERPOLATIONS = {
    "bilinear": T.InterpolationMode.BILINEAR,
    "bicubic": T.InterpolationMode.BICUBIC,
    "nearest": T.InterpolationMode.NEAREST,
}


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run per-image transforms on one intra-op thread, then restore the previous count.

    They are tiny tensor ops: splitting each over OpenMP threads gains little on idle cores, and when other
    processes keep a core busy every op waits for a descheduled thread — measured 10-40x slower on a shared
    2-core machine (BENCHMARKS.md). Callers that own the process (the loaders, the embedding loop, the
    serving thread) wrap their loops in it; a Dataset never changes the global thread count by itself.
    Not for use while another Python thread runs torch ops.
    """
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@dataclass
class Preprocess:
    """Everything that turns a photo into the model's input; saved whole in model.json, index.json, ONNX.

    crop_mode "center": shorter side → `resize_size` (default round(img_size / crop_pct)), centre-crop
    img_size; "squash": the whole photo → img_size × img_size, aspect ignored. `interpolation` is the
    backbone's own (timm pretrained_cfg: bicubic for tf_efficientnet_lite0) and is applied.
    """

    img_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"
    resize_size: int | None = None
    crop_pct: float = DEFAULT_CROP_PCT
    crop_mode: str = "center"

    def __post_init__(self) -> None:
        self.img_size = int(self.img_size)
        self.mean = tuple(float(v) for v in self.mean)  # type: ignore[assignment]
        self.std = tuple(float(v) for v in self.std)  # type: ignore[assignment]
        if self.crop_mode not in CROP_MODES:
            raise ValueError(f"data.crop_mode must be one of {CROP_MODES}, got {self.crop_mode!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"preprocess.interpolation must be one of {sorted(INTERPOLATIONS)}, got {self.interpolation!r}"
            )
        if not 0 < self.crop_pct <= 1:
            raise ValueError(f"preprocess.crop_pct must be in (0, 1], got {self.crop_pct!r}")

    @property
    def resize_side(self) -> int:
        """The shorter side before a centre crop."""
        return int(self.resize_size or round(self.img_size / self.crop_pct))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocess:
        """From model.json / index.json (older files are completed by `rundir.complete_preprocess`)."""
        from carspotter.rundir import complete_preprocess

        d = complete_preprocess(d)
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})

    def with_data(self, data: DataConfig) -> Preprocess:
        """This preprocessing with a run's own size/resize/crop settings (data.* of the config)."""
        return Preprocess(
            data.img_size,
            self.mean,
            self.std,
            self.interpolation,
            data.resize_size,
            self.crop_pct,
            data.crop_mode,
        )

    def _resize(self, side: int, square: bool) -> T.Resize:
        size = (side, side) if square else side
        return T.Resize(size, interpolation=INTERPOLATIONS[self.interpolation], antialias=True)

    def _finish(self) -> list:
        return [T.ToDtype(torch.float32, scale=True), T.Normalize(list(self.mean), list(self.std))]

    def transform(self) -> Callable[[Image.Image], torch.Tensor]:
        """THE evaluation transform: PIL RGB photo → normalised float tensor (3, img_size, img_size)."""
        if self.crop_mode == "squash":  # the whole photo, nothing cropped away
            ops: list = [T.PILToTensor(), self._resize(self.img_size, square=True)]
        else:
            ops = [T.PILToTensor(), self._resize(self.resize_side, square=False), T.CenterCrop(self.img_size)]
        return T.Compose(ops + self._finish())

    def train_transform(self, aug: AugConfig) -> Callable[[Image.Image], torch.Tensor]:
        """Training augmentation around the same resize/normalisation."""
        size = self.img_size
        ops: list = [T.PILToTensor()]
        if aug.random_resized_crop:
            interp = INTERPOLATIONS[self.interpolation]
            ops.append(
                T.RandomResizedCrop(
                    size, scale=(aug.rrc_scale_min, 1.0), interpolation=interp, antialias=True
                )
            )
        elif aug.random_crop:
            ops += [self._resize(self.resize_side, square=self.crop_mode == "squash"), T.RandomCrop(size)]
        elif self.crop_mode == "squash":
            ops.append(self._resize(size, square=True))
        else:
            ops += [self._resize(self.resize_side, square=False), T.CenterCrop(size)]
        if aug.hflip:
            ops.append(T.RandomHorizontalFlip())
        if aug.rotation:
            ops.append(T.RandomRotation(aug.rotation))
        if aug.color_jitter:
            c = aug.color_jitter
            ops.append(T.ColorJitter(brightness=c, contrast=c, saturation=c))
        ops += self._finish()
        if aug.random_erasing:
            ops.append(T.RandomErasing(p=aug.random_erasing))
        return T.Compose(ops)


def resize_size_for(data: DataConfig) -> int:
    """The shorter side before a centre crop for a DataConfig (Preprocess.resize_side's rule)."""
    return data.resize_size or round(data.img_size / DEFAULT_CROP_PCT)


def check_crop_mode(data: DataConfig) -> None:
    if data.crop_mode not in CROP_MODES:
        raise ValueError(f"data.crop_mode must be one of {CROP_MODES}, got {data.crop_mode!r}")


def build_transform(
    data: DataConfig,
    mean: Sequence[float],
    std: Sequence[float],
    train: bool,
    interpolation: str = "bilinear",
) -> Callable[[Image.Image], torch.Tensor]:
    """Shorthand kept for callers that hold a DataConfig: `Preprocess(...).transform()` or `.train_transform()`."""
    pre = Preprocess(
        data.img_size, tuple(mean), tuple(std), interpolation, data.resize_size, crop_mode=data.crop_mode
    )  # type: ignore[arg-type]
    return pre.train_transform(data.aug) if train else pre.transform()
