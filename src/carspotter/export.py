"""ONNX export of a run: one graph with two outputs (`logits`, `embedding`), dynamic batch, and the
preprocessing + class names written into the file's metadata, so a deployment needs nothing else.

The exported file is checked against onnxruntime before we call it done: `check_parity` runs the same
inputs through PyTorch and onnxruntime and reports the max abs difference of both outputs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from carspotter.data.transforms import Preprocess
from carspotter.models.factory import CarModel
from carspotter.models.loading import load_run
from carspotter.rundir import ModelInfo
from carspotter.utils import OutputExistsError, atomic_path

log = logging.getLogger(__name__)

INPUT = "input"
OUTPUTS = ("logits", "embedding")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


class ExportHead(nn.Module):
    """`x (B,3,H,W) -> (logits (B,C), embedding (B,D))` from one backbone pass.

    The embedding is what retrieval indexes ("auto" source): the embedding head if the model has one,
    else the pooled backbone features.
    """

    def __init__(self, model: CarModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.model
        f = m.forward_features(x)  # (B, F)
        emb = m.embedding(f) if m.embedding is not None else f  # (B, D)
        logits = m.classifier(m.dropout(emb))  # (B, C); dropout is identity in eval
        return logits, emb


def export_metadata(model: CarModel, info: ModelInfo, pre: Preprocess | None = None) -> dict[str, str]:
    """Key/values for ONNX `metadata_props`: everything needed to feed the graph and read its outputs.

    `preprocess` is the whole `Preprocess` (as in model.json) plus layout/colour and a recipe in words.
    """
    pre = pre or model.preprocess
    preprocess = {
        **pre.to_dict(),
        "resize_size": pre.resize_side,
        "layout": "NCHW",
        "color": "RGB",
        "recipe": (
            f"whole photo to img_size x img_size ({pre.interpolation}, aspect ignored)"
            if pre.crop_mode == "squash"
            else f"shorter side to resize_size ({pre.interpolation}), centre-crop img_size"
        )
        + ", scale to [0,1], (x - mean) / std",
    }
    img_size, resize_size = pre.img_size, pre.resize_side
    return {
        "carspotter.format": "1",
        "preprocess": json.dumps(preprocess),
        "img_size": str(img_size),
        "resize_size": str(resize_size),
        "crop_mode": pre.crop_mode,
        "interpolation": pre.interpolation,
        "mean": json.dumps(list(pre.mean)),
        "std": json.dumps(list(pre.std)),
        "class_names": json.dumps(list(info.class_names)),
        "num_classes": str(info.num_classes),
        "embed_dim": str(model.embed_dim),
        "arch": str(info.model.get("arch", "")),
        "outputs": json.dumps(
            {
                "logits": "(batch, num_classes) raw class scores; softmax gives probabilities",
                "embedding": "(batch, embed_dim) retrieval embedding (embedding head, else pooled features)",
            }
        ),
    }


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporters log progress and an expected opset-conversion notice; keep the output to our report."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "onnxscript")]
    levels = [lg.level for lg in loggers]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for lg in loggers:
                lg.setLevel(logging.ERROR)
            yield
    finally:
        for lg, lvl in zip(loggers, levels, strict=True):
            lg.setLevel(lvl)


def _dynamo_export(head: nn.Module, example: torch.Tensor, opset: int) -> Any:
    with _quiet():
        prog = torch.onnx.export(
            head,
            (example,),
            dynamo=True,
            verbose=False,
            input_names=[INPUT],
            output_names=list(OUTPUTS),
            opset_version=opset,
            dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
        )
    return prog.model_proto


def _torchscript_export(head: nn.Module, example: torch.Tensor, opset: int) -> Any:
    import io

    import onnx

    buf = io.BytesIO()
    axes = {n: {0: "batch"} for n in (INPUT, *OUTPUTS)}
    with _quiet():
        torch.onnx.export(
            head, (example,), buf, dynamo=False, input_names=[INPUT], output_names=list(OUTPUTS),
            opset_version=opset, dynamic_axes=axes,
        )  # fmt: skip
    return onnx.load_from_string(buf.getvalue())


def _opset(proto: Any) -> int:
    return max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def _valid(proto: Any, opset: int) -> str:
    """'' if the graph passes the ONNX checker at the requested opset, else why not."""
    import onnx

    if _opset(proto) != opset:
        return f"got opset {_opset(proto)}"
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as e:
        return str(e).splitlines()[0]
    return ""


def _export_proto(head: nn.Module, example: torch.Tensor, opset: int) -> tuple[Any, str]:
    """The torch.export-based exporter (default since torch 2.9) first; it writes opset >= 18 and converting
    down can fail (or yield an invalid graph), so the TorchScript exporter, which writes any opset natively,
    is the fallback. The first graph valid at the requested opset wins."""
    problems, first = [], None
    for name, fn in (("torch.export", _dynamo_export), ("torchscript", _torchscript_export)):
        try:
            proto = fn(head, example, opset)
        except Exception as e:  # an op this exporter cannot handle: try the other one
            problems.append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            continue
        why = _valid(proto, opset)
        if not why:
            return proto, name
        problems.append(f"{name}: {why}")
        first = first if first is not None else (proto, name)
    if first is None:
        raise RuntimeError("ONNX export failed: " + "; ".join(problems))
    log.warning(
        "no exporter made a valid opset-%d graph (%s); keeping opset %d", opset, problems, _opset(first[0])
    )
    import onnx

    onnx.checker.check_model(first[0])
    return first


def export_preprocess(model: CarModel, img_size: int | None) -> Preprocess:
    """The run's Preprocess, at another input size if asked (resize side scaled in proportion)."""
    pre = model.preprocess
    size = int(img_size or pre.img_size)
    if size < 8:
        raise ValueError(f"--img-size {size}: too small (need at least 8 pixels)")
    if size == pre.img_size:
        return pre
    resize = round(pre.resize_size * size / pre.img_size) if pre.resize_size else None
    return dataclasses.replace(pre, img_size=size, resize_size=resize)


def export_onnx(
    run_dir: str | Path,
    out_path: str | Path,
    *,
    opset: int = 17,
    img_size: int | None = None,
    overwrite: bool = False,
    check_images: Sequence[str | Path] | None = None,
    max_check_images: int = 16,
) -> dict[str, Any]:
    """Export RUN_DIR's best weights to `out_path` (atomic; refuses an existing file unless `overwrite`).

    Returns a report with the max abs PyTorch-vs-onnxruntime difference of both outputs.
    """
    import onnx

    out_path = Path(out_path)
    if out_path.is_dir():
        raise OutputExistsError(f"{out_path}: is a directory; give a file name such as model.onnx")
    if out_path.exists() and not overwrite:
        raise OutputExistsError(f"{out_path}: already exists; pass --overwrite to replace it")
    if opset < 13:
        raise ValueError(f"--opset {opset}: too old; use 13 or newer (17 recommended)")
    paths = image_files(check_images) if check_images else []  # bad paths fail before any work
    if check_images and not paths:
        raise FileNotFoundError(f"--check-images {', '.join(map(str, check_images))}: no image files found")
    model, info = load_run(run_dir, device="cpu")
    pre = export_preprocess(model, img_size)
    size, resize = pre.img_size, pre.resize_side
    head = ExportHead(model).eval()
    example = torch.randn(2, 3, size, size)  # batch 2, so export cannot specialise the batch size to 1
    proto, exporter = _export_proto(head, example, opset)
    meta = export_metadata(model, info, pre)
    meta["source_run"] = str(Path(run_dir).resolve())
    onnx.helper.set_model_props(proto, meta)
    proto.doc_string = f"carspotter export of {Path(run_dir).name}: {info.model.get('arch', '')}"
    with atomic_path(out_path) as tmp:
        onnx.save_model(proto, str(tmp))

    if paths:
        x = load_check_images(paths[:max_check_images], pre)
        parity = check_parity(head, out_path, [x, x[:1]])
        source = f"{len(x)} images"
    else:
        gen = torch.Generator().manual_seed(0)
        xs = [torch.randn(b, 3, size, size, generator=gen) for b in (1, 3)]
        parity = check_parity(head, out_path, xs)
        source = "random tensors"
    return {
        "onnx": str(out_path),
        "bytes": out_path.stat().st_size,
        "opset": _opset(proto),
        "exporter": exporter,
        "img_size": size,
        "resize_size": resize,
        "num_classes": info.num_classes,
        "embed_dim": model.embed_dim,
        "check_inputs": source,
        **parity,
    }


def image_files(items: Sequence[str | Path]) -> list[Path]:
    """Files given directly, plus the images anywhere under any directory given (sorted)."""
    out: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            out += sorted(q for q in p.rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES and q.is_file())
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or directory")
    return out


def load_check_images(paths: Sequence[Path], pre: Preprocess) -> torch.Tensor:
    """Photos → the evaluation preprocessing the metadata describes → (N, 3, img_size, img_size)."""
    from carspotter.data.images import open_rgb

    tf = pre.transform()
    return torch.stack([tf(open_rgb(p)) for p in paths])


def ort_session(onnx_path: str | Path) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = max(1, min(torch.get_num_threads(), os.cpu_count() or 1))
    so.log_severity_level = 3
    return ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])


@torch.inference_mode()
def check_parity(head: nn.Module, onnx_path: str | Path, inputs: Sequence[torch.Tensor]) -> dict[str, Any]:
    """Run each batch through PyTorch and onnxruntime; max abs difference per output over all batches."""
    sess = ort_session(onnx_path)
    diff = dict.fromkeys(OUTPUTS, 0.0)
    scale = dict.fromkeys(OUTPUTS, 0.0)
    for x in inputs:
        ref = head(x)
        got = sess.run(list(OUTPUTS), {INPUT: x.numpy().astype(np.float32)})
        for name, r, g in zip(OUTPUTS, ref, got, strict=True):
            if g.shape != tuple(r.shape):
                raise RuntimeError(
                    f"{onnx_path}: output {name} has shape {g.shape}, PyTorch gives {tuple(r.shape)}"
                )
            diff[name] = max(diff[name], float(np.abs(g - r.numpy()).max()))
            scale[name] = max(scale[name], float(r.abs().max()))
    return {
        "batch_sizes": [int(x.shape[0]) for x in inputs],
        "max_abs_diff": diff,
        "max_abs_value": scale,
    }


def read_metadata(onnx_path: str | Path) -> dict[str, str]:
    """The metadata_props of an exported file, as onnxruntime sees them."""
    return dict(ort_session(onnx_path).get_modelmeta().custom_metadata_map)
