"""Open-catalogue enrolment at scale: FAISS append throughput, search latency before/after +10,000 vectors,
the cost of the atomic commit, and end-to-end `enrol` photos/s (embedding included).

Part 1 (FAISS only, synthetic): a gallery of `--n` 512-d vectors shaped like embeddings (clusters + noise),
indexed as Flat, HNSW32 and IVF256,Flat (cosine, as `carspotter index --metric cosine` builds them). Then
10,000 new vectors are appended with `index.add` in enrolment-sized batches of `--batch` (no retraining, no
rebuild; what retrieval.catalogue does). Reported: append vectors/s, and search latency (ms per query, one
query at a time, k=10, median of `--nq` queries) before and after.

Part 2 (the whole `retrieval.catalogue.enrol` path on an index directory of that gallery, Flat): embedding
with a real network, resized copies, rewriting index.faiss/meta.csv and the atomic directory swap. Network:
tf_efficientnet_lite0 at 128 px from `--weights` when the file exists, else a small scratch CNN (stated in
the output). Reported: photos/s end to end, and the commit's share.

    python benchmarks/enrol_scale.py --weights ../shared/weights/tf_efficientnet_lite0.in1k.safetensors
    python benchmarks/enrol_scale.py --smoke      # seconds: proves the script runs
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchutil import machine_line

DIM = 512


def embeddings_like(n: int, rng: np.random.Generator, n_clusters: int = 500) -> np.ndarray:
    centres = rng.normal(size=(n_clusters, DIM)).astype(np.float32)
    x = centres[rng.integers(0, n_clusters, n)] + 0.6 * rng.normal(size=(n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def latency_ms(index, queries: np.ndarray, k: int = 10) -> tuple[float, float]:
    """(median wall ms, mean CPU ms) per single-query search; CPU time stays meaningful on a loaded machine."""
    times = []
    c0 = time.process_time()
    for q in queries:
        t0 = time.perf_counter()
        index.search(q[None, :], k)
        times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times), 1000 * (time.process_time() - c0) / len(queries)


def part_faiss(n: int, n_new: int, batch: int, nq: int, rng: np.random.Generator) -> list[dict]:
    from carspotter.retrieval.index import GalleryIndex

    base, new, queries = embeddings_like(n, rng), embeddings_like(n_new, rng), embeddings_like(nq, rng)
    rows = []
    for kind in ("Flat", "HNSW32", f"IVF{min(256, n // 40)},Flat"):
        t0 = time.perf_counter()
        g = GalleryIndex.build(base, [{}] * n, metric="cosine", index_type=kind)
        build_s = time.perf_counter() - t0
        before, before_cpu = latency_ms(g, queries)
        t0, c0 = time.perf_counter(), time.process_time()
        for i in range(0, n_new, batch):
            g.index.add(np.ascontiguousarray(new[i : i + batch]))
        add_s, add_cpu = time.perf_counter() - t0, time.process_time() - c0
        g.meta += [{}] * n_new
        g.info["n"] = g.index.ntotal
        after, after_cpu = latency_ms(g, queries)
        rows.append({"index": kind, "n_before": n, "n_after": int(g.index.ntotal), "build_s": build_s,
                     "append_vectors_per_s": n_new / add_s, "append_vectors_per_cpu_s": n_new / max(add_cpu, 1e-9),
                     "search_ms_before": before, "search_ms_after": after,
                     "search_cpu_ms_before": before_cpu, "search_cpu_ms_after": after_cpu})  # fmt: skip
    return rows


def part_enrol(n: int, n_photos: int, weights: str | None, rng: np.random.Generator) -> dict:
    from PIL import Image

    from carspotter.models.factory import create_model
    from carspotter.retrieval import catalogue as cat
    from carspotter.retrieval.index import GalleryIndex

    if weights and Path(weights).is_file():
        from carspotter.retrieval.build import backbone_model

        model, about = backbone_model("tf_efficientnet_lite0", weights, 128), "tf_efficientnet_lite0 @128 px"
        info = {"backbone": "tf_efficientnet_lite0", "weights": str(Path(weights).resolve())}
    else:
        from carspotter.config import ModelConfig

        cfg = ModelConfig(arch="scratch_cnn", channels=[8, 16], hidden_dim=16, pretrained=False)
        model, about, info = create_model(cfg, 0, 64).eval(), "scratch CNN @64 px (no --weights file)", {}
    from carspotter.retrieval.embed import embed_images

    d = embed_images(model, [Image.new("RGB", (32, 32))]).shape[1]  # the network's vector size
    x0 = np.ascontiguousarray(embeddings_like(n, rng)[:, :d]) if d <= DIM else rng.normal(size=(n, d))
    with tempfile.TemporaryDirectory() as tmp:
        meta = [{"path": f"p{i}.jpg", "label": i % 100, "class_name": f"c{i % 100}", "split": "train", "sha256": f"{i:064x}"}
                for i in range(n)]  # fmt: skip
        info = {
            **info,
            "preprocess": model.preprocess.to_dict(),
            "embed_source": "auto",
            "crop_mode": "center",
        }
        g = GalleryIndex.build(x0, meta, metric="cosine", index_type="Flat", info=info)
        g.save(Path(tmp) / "idx")
        photos = []
        for i in range(n_photos):
            arr = rng.integers(0, 256, size=(96, 128, 3), dtype=np.uint8)
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, "JPEG", quality=90)
            photos.append(cat.Photo(f"New {i % 10}", f"new{i}.jpg", buf.getvalue()))
        # time the commit alone with a 1-photo enrolment, then the whole path for n_photos
        t0 = time.perf_counter()
        cat.enrol(Path(tmp) / "idx", photos[:1], model=model)
        one_s = time.perf_counter() - t0
        t0, c0 = time.perf_counter(), time.process_time()
        res, _ = cat.enrol(Path(tmp) / "idx", photos[1:], model=model, add_to_existing=True)
        total, total_cpu = time.perf_counter() - t0, time.process_time() - c0
    m = len(photos) - 1
    return {"network": about, "gallery": n, "photos": m, "photos_per_s": m / total,
            "photos_per_cpu_s": m / total_cpu, "embed_s": res.embed_s,
            "total_s": total, "one_photo_enrol_s": one_s}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=50_000, help="gallery size before enrolment")
    ap.add_argument("--new", type=int, default=10_000, help="vectors appended")
    ap.add_argument("--batch", type=int, default=100, help="vectors per enrolment (append batch)")
    ap.add_argument("--nq", type=int, default=200, help="latency queries")
    ap.add_argument("--photos", type=int, default=200, help="photos through the whole enrol path")
    ap.add_argument("--weights", default=None, help="tf_efficientnet_lite0 weights for part 2")
    ap.add_argument("--json", default=None)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: finishes in a few seconds")
    args = ap.parse_args()
    if args.smoke:
        args.n, args.new, args.batch, args.nq, args.photos, args.weights = 2000, 500, 100, 20, 9, None
    import faiss

    faiss.omp_set_num_threads(1)
    rng = np.random.default_rng(0)
    print(machine_line())
    rows = part_faiss(args.n, args.new, args.batch, args.nq, rng)
    print(f"\nappend {args.new} vectors ({DIM}-d, cosine) to a gallery of {args.n}, {args.batch} per enrolment; "
          "search: 1 query at a time, k=10, median ms, 1 thread")  # fmt: skip
    print(f"{'index':<14}{'append vec/s':>13}{'vec/CPU-s':>11}{'ms before':>11}{'ms after':>10}"
          f"{'CPU-ms before':>15}{'CPU-ms after':>14}{'after/before CPU ratio':>24}")  # fmt: skip
    for r in rows:
        ratio = r["search_cpu_ms_after"] / r["search_cpu_ms_before"]
        print(f"{r['index']:<14}{r['append_vectors_per_s']:>13,.0f}{r['append_vectors_per_cpu_s']:>11,.0f}"
              f"{r['search_ms_before']:>11.3f}{r['search_ms_after']:>10.3f}{r['search_cpu_ms_before']:>15.3f}"
              f"{r['search_cpu_ms_after']:>14.3f}{ratio:>24.2f}")  # fmt: skip
    e = part_enrol(args.n, args.photos, args.weights, rng)
    print(f"\nenrol path ({e['network']}): {e['photos']} photos into a Flat gallery of {e['gallery']}: "
          f"{e['photos_per_s']:.1f} photos/s end to end ({e['photos_per_cpu_s']:.1f} per CPU-s; "
          f"embedding {e['embed_s']:.1f} s of {e['total_s']:.1f} s); "
          f"a 1-photo enrolment (commit-dominated) took {e['one_photo_enrol_s']:.2f} s")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"faiss": rows, "enrol": e, "args": vars(args)}, indent=2))


if __name__ == "__main__":
    main()
