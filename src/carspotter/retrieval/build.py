"""Build an index from a run (or a bare pretrained backbone) over a prepared split, and score an index."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from carspotter.data.dataset import splits_dataset
from carspotter.models.factory import CarModel
from carspotter.models.loading import backbone_model, load_run, save_weights
from carspotter.retrieval.index import GalleryIndex
from carspotter.rundir import EMBEDDER, INDEX_JSON, INDEX_METRICS, EvalResult
from carspotter.utils import prepare_out_dir, resolve_device

__all__ = ["backbone_model", "build_index_from_run", "evaluate_index"]


def build_index_from_run(
    run_or_model: str | Path | CarModel,
    data_dir: str | Path,
    split: str = "train",
    metric: str = "euclidean",
    index_type: str = "Flat",
    out_dir: str | Path | None = None,
    *,
    batch_size: int = 64,
    device: str = "auto",
    num_workers: int = 0,
    source: str = "auto",
    nprobe: int = 16,
    ef_search: int = 64,
    overwrite: bool = False,
    model_info: dict[str, Any] | None = None,
    crop_mode: str | None = None,
    dist: Any = None,
    tta: str = "none",
) -> GalleryIndex | None:
    """Embed `split` of a prepared dir with a run's best weights (or a given model) and index it.

    `model_info` describes a bare backbone (backbone, weights) so `serve`/`search` can rebuild the embedder;
    when its weights were downloaded (no local file) they are saved beside the index, so loading never downloads.
    The model's `Preprocess` (a run's own, from model.json) is recorded whole in index.json; `crop_mode`
    (center | squash) overrides its crop mode.
    Under torchrun pass `dist` (engine.distributed.DistInfo): each rank embeds its shard, rank 0 builds and
    writes the index; other ranks return None.
    """
    import dataclasses

    from torch.utils.data import Subset

    from carspotter.retrieval.embed import embed_dataset
    from carspotter.retrieval.sharded import SINGLE, embed_sharded

    dist = dist or SINGLE
    if out_dir is not None and dist.is_main:
        prepare_out_dir(Path(out_dir), overwrite=overwrite, marker=INDEX_JSON)  # fail before the slow part
    dev = resolve_device(device)
    info: dict[str, Any] = dict(model_info or {})
    amp = "auto"  # a bare backbone: fp32 on CPU
    if isinstance(run_or_model, CarModel):
        model = run_or_model
    else:
        model, minfo = load_run(run_or_model, dev)
        info["run_dir"] = str(Path(run_or_model).resolve())
        info["class_names_model"] = minfo.class_names
        amp = minfo.amp
    pre = model.preprocess
    if crop_mode is not None:
        pre = dataclasses.replace(pre, crop_mode=crop_mode)
    ds = splits_dataset(data_dir, split, pre.transform())  # "train+val" too
    if len(ds) == 0:
        raise ValueError(f"{data_dir}: split {split!r} has no photos")
    t0 = time.perf_counter()
    emb = embed_sharded(  # (N, D); one shard per torchrun rank
        lambda ids: embed_dataset(
            model, Subset(ds, ids.tolist()), batch_size, dev, num_workers, source, amp=amp, tta=tta
        ),
        len(ds),
        dist,
    )
    seconds = time.perf_counter() - t0
    meta = [
        {"path": r.path, "label": r.label, "class_name": r.class_name, "split": r.split} for r in ds.records
    ]
    bare_downloaded = bool(info.get("backbone")) and not info.get("weights")
    info.update(
        data_root=str(Path(data_dir).resolve()),
        split=split,
        preprocess=pre.to_dict(),
        class_names=ds.class_names,
        embed_source=source,
        amp=amp,  # queries (search, serve) run the same precision and flip averaging as the gallery
        embed_tta=tta,
        embed_time_s=seconds,
        embed_images_per_s=len(ds) / seconds if seconds > 0 else None,
    )
    if bare_downloaded:
        info["embedder_weights"] = EMBEDDER
    if not dist.is_main:
        return None
    index = GalleryIndex.build(
        emb, meta, metric=metric, index_type=index_type, info=info, nprobe=nprobe, ef_search=ef_search
    )
    if out_dir is not None:
        index.save(out_dir, overwrite=True)
        if bare_downloaded:
            save_weights(model, Path(out_dir) / EMBEDDER)
    return index


def evaluate_index(index_dir: str | Path, ks: tuple[int, ...] = (1, 2, 4, 8)) -> EvalResult:
    """Score the indexed photos against each other (each query excluded); saved as INDEX_DIR/metrics.json."""
    from carspotter.retrieval.metrics import retrieval_metrics

    index_dir = Path(index_dir)
    index = GalleryIndex.load(index_dir)
    vecs = _stored_vectors(index)

    def search_with_index(_g: Any, queries: Any, k: int, _metric: str) -> Any:
        return index.search(queries, k)  # the index's own (possibly approximate) search

    t0 = time.perf_counter()
    m = retrieval_metrics(vecs, index.labels(), index.metric, ks, search=search_with_index)
    m.update(
        search_time_s=time.perf_counter() - t0,
        dim=index.info["dim"],
        index_type=index.info["index_type"],
        split=index.info.get("split"),
    )
    return EvalResult(m, index_dir, {INDEX_METRICS: None})


def _stored_vectors(index: GalleryIndex) -> Any:
    import faiss

    ivf = faiss.try_extract_index_ivf(index.index)
    if ivf is not None:
        ivf.make_direct_map()
    return index.vectors()
