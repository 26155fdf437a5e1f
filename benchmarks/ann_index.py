"""Approximate gallery indexes: recall@10 and speed of FAISS HNSW / IVF / IVF-PQ against exact Flat search.

Which `--index-type` should `carspotter index` use for a big gallery? This builds each candidate on the same
synthetic gallery and reports, for every search setting: recall@10 against the exact (Flat) top 10, queries/s
(all queries in one batched call, best of `--reps`) by the wall clock and per CPU-second, speed-up over Flat,
build time (train + add, wall and CPU) and bytes per vector (the serialised index / n, ids included).
With one thread the speed-up compares CPU time, which stays meaningful on a shared machine whose load
changes between the Flat measurement and the others; with more threads it compares wall-clock time.

Data: `--n` (default 1,000,000) 128-d float32 vectors shaped like embeddings: 2,000 clusters, each point =
its cluster centre + a 24-d latent offset mapped through a shared random projection + small isotropic noise
(so neighbourhoods have low intrinsic dimension, as real embeddings do); `--nq` (1,000) queries drawn the
same way (not in the gallery). Training samples follow GalleryIndex.build: max(50,000, 39 × nlist) vectors.

Indexes (the same faiss index_factory strings `carspotter index --index-type` takes):
  Flat                       exact; the reference
  HNSW32                     efSearch 16 / 32 / 64 / 128 (efConstruction 40, FAISS's default)
  IVF1024,Flat  IVF4096,Flat nprobe 4 / 8 / 16 / 32 / 64
  IVF1024,PQ16               nprobe 4 .. 64; 16-byte codes
  IVF1024,PQ16 + RFlat       the same, top k × 4 or × 16 re-ranked with the exact vectors (IndexRefineFlat)
  IVF1024,PQ16 + SQ8         re-ranked with 8-bit scalar-quantised vectors (128 bytes each; IndexRefine)
Goal: some setting reaches recall@10 >= 0.95 at >= 10x the speed of Flat.

Threads: `--threads auto` (default) uses the cores that are idle now (at least 1): on an oversubscribed
machine FAISS's OpenMP threads spin-wait on each other and 2 threads ran 2-8x slower than 1 here.

Memory: the gallery (n × 512 B) + Flat or the index being measured (+ its serialised copy): ~2.5 GB at 1 M.

    python benchmarks/ann_index.py                         # 1 M vectors (~6 min on 2 busy cores)
    python benchmarks/ann_index.py --n 200000 --json ann.json
    python benchmarks/ann_index.py --smoke                 # seconds: proves the script runs
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

RECALL_GOAL, SPEEDUP_GOAL = 0.95, 10.0


@dataclass
class Span:
    wall: float
    cpu: float  # process CPU time: with one thread, the work done whatever else the machine runs

    def __add__(self, other: Span) -> Span:
        return Span(self.wall + other.wall, self.cpu + other.cpu)


@dataclass
class Row:
    index: str
    setting: str
    build_wall_s: float
    build_cpu_s: float
    bytes_per_vector: float
    recall_at_10: float
    queries_per_s: float  # wall clock, best of reps
    queries_per_cpu_s: float  # per CPU-second, best of reps
    speedup: float  # vs Flat: per CPU-second with one thread, wall clock otherwise


def load1() -> float:
    return os.getloadavg()[0]


def load_str() -> str:
    a, b, c = os.getloadavg()
    return f"load {a:.2f}/{b:.2f}/{c:.2f} (1/5/15 min) on {os.cpu_count()} CPUs"


def auto_threads() -> int:
    cpus = os.cpu_count() or 1
    return max(1, min(cpus, cpus - round(load1())))


def synthetic(n: int, nq: int, d: int, clusters: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, d) gallery and (nq, d) queries, float32, clustered with low-dimensional structure."""
    rng = np.random.default_rng(seed)
    latent = min(24, d)
    centres = rng.standard_normal((clusters, d), dtype=np.float32)
    proj = rng.standard_normal((latent, d), dtype=np.float32) * (0.6 / np.sqrt(latent))

    def draw(m: int) -> np.ndarray:
        out = np.empty((m, d), dtype=np.float32)
        for s in range(0, m, 100_000):  # chunks keep the temporaries small
            e = min(m, s + 100_000)
            c = rng.integers(0, clusters, e - s)
            z = rng.standard_normal((e - s, latent), dtype=np.float32)
            out[s:e] = centres[c] + z @ proj + 0.1 * rng.standard_normal((e - s, d), dtype=np.float32)
        return out

    return draw(n), draw(nq)


def train_sample(x: np.ndarray, nlist: int, seed: int) -> np.ndarray:
    n_train = min(len(x), max(50_000, 39 * nlist))  # as carspotter.retrieval.index.GalleryIndex.build
    idx = np.sort(np.random.default_rng(seed).choice(len(x), n_train, replace=False))
    return x[idx]


def factory(spec: str, x: np.ndarray, seed: int) -> Any:
    import faiss

    index = faiss.index_factory(x.shape[1], spec)
    if not index.is_trained:
        ivf = faiss.extract_index_ivf(index)
        index.train(train_sample(x, ivf.nlist if ivf is not None else 1, seed))
    index.add(x)
    return index


def timed(fn: Callable[[], Any]) -> tuple[Any, Span]:
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, Span(time.perf_counter() - t, time.process_time() - c)


def recall_at(ids: np.ndarray, truth: np.ndarray) -> float:
    """Mean |approximate top-k ∩ exact top-k| / k."""
    k = truth.shape[1]
    hits = sum(len(set(a[a >= 0].tolist()) & set(b.tolist())) for a, b in zip(ids, truth, strict=True))
    return hits / (k * len(truth))


def measure(
    name: str,
    index: Any,
    build: Span,
    settings: list[str],
    xq: np.ndarray,
    truth: np.ndarray,
    flat: Row | None,
    args: argparse.Namespace,
) -> list[Row]:
    import faiss

    nbytes = len(faiss.serialize_index(index)) / index.ntotal
    ps = faiss.ParameterSpace()
    rows = []
    for setting in settings or [""]:
        if setting:
            ps.set_index_parameters(index, setting)  # e.g. "nprobe=16" or "nprobe=16,k_factor_rf=4"
        ids = index.search(xq, args.k)[1]
        spans = [timed(lambda: index.search(xq, args.k))[1] for _ in range(args.reps)]
        qps = len(xq) / min(sp.wall for sp in spans)
        cpu_qps = len(xq) / max(min(sp.cpu for sp in spans), 1e-9)
        if flat is None:
            speedup = 1.0
        elif args.threads_used == 1:
            speedup = cpu_qps / flat.queries_per_cpu_s
        else:
            speedup = qps / flat.queries_per_s
        label = setting.replace("k_factor_rf=", "k×") or "-"
        row = Row(name, label, build.wall, build.cpu, nbytes, recall_at(ids, truth), qps, cpu_qps, speedup)
        rows.append(row)
        ok = row.recall_at_10 >= RECALL_GOAL and row.speedup >= SPEEDUP_GOAL
        print(
            f"  {name:22s} {label:15s} {build.wall:7.1f} {build.cpu:7.1f} {nbytes:6.0f} "
            f"{row.recall_at_10:9.3f} {qps:9.0f} {cpu_qps:9.0f} {speedup:8.1f}x{'  <- goal' if ok else ''}",
            flush=True,
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--nq", type=int, default=1000)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--clusters", type=int, default=2000)
    ap.add_argument("--nlist", type=int, nargs=2, default=[1024, 4096], help="the two IVF sizes")
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions of each search (best counts)")
    ap.add_argument("--threads", default="auto", help="FAISS OpenMP threads, or 'auto' (idle cores)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="also write the rows here")
    ap.add_argument(
        "--only", nargs="+", help="measure only indexes whose name contains one of these (+ Flat)"
    )
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: finishes in a few seconds")
    args = ap.parse_args()
    if args.smoke:
        args.n, args.nq, args.clusters, args.nlist, args.reps = 5000, 100, 50, [16, 64], 1

    import faiss

    threads = auto_threads() if args.threads == "auto" else int(args.threads)
    args.threads_used = threads
    faiss.omp_set_num_threads(threads)
    t_start = time.perf_counter()
    print(f"faiss {faiss.__version__}, {threads} thread(s) ({args.threads}); {load_str()}")
    (xb, xq), gen_s = timed(lambda: synthetic(args.n, args.nq, args.d, args.clusters, args.seed))
    print(f"gallery {args.n:,} x {args.d}-d, {args.nq:,} queries, k={args.k} (gen {gen_s.wall:.1f} s)")
    head = ("index", "setting", "build s", "(CPU)", "B/vec", "recall@10", "q/s", "q/CPU-s", "vs Flat")
    widths = (22, 15, 7, 7, 6, 9, 9, 9, 9)
    print(
        "  "
        + " ".join(
            f"{h:{w}s}" if i < 2 else f"{h:>{w}s}" for i, (h, w) in enumerate(zip(head, widths, strict=True))
        )
    )

    flat, flat_build = timed(lambda: factory("Flat", xb, args.seed))
    truth = flat.search(xq, args.k)[1]
    rows = measure("Flat", flat, flat_build, [], xq, truth, None, args)
    flat_row = rows[0]
    del flat
    gc.collect()

    def wanted(name: str) -> bool:
        return not args.only or any(o in name for o in args.only)

    small, large = args.nlist
    probes = [f"nprobe={p}" for p in (4, 8, 16, 32, 64)]
    for spec, settings in (
        ("HNSW32", [f"efSearch={e}" for e in (16, 32, 64, 128)]),
        (f"IVF{small},Flat", probes),
        (f"IVF{large},Flat", probes),
    ):
        if not wanted(spec):
            continue
        index, build = timed(lambda spec=spec: factory(spec, xb, args.seed))
        rows += measure(spec, index, build, settings, xq, truth, flat_row, args)
        del index
        gc.collect()

    # "np": no polysemous training, which index_factory turns on for PQ and only Hamming-filtered search
    # uses; it took ~60 s of the build here (30x the PQ training itself). --smoke: 4-bit codes, tiny k-means.
    pq_spec = f"IVF{small},PQ16{'x4' if args.smoke else ''}np"
    if wanted(pq_spec):
        rows += pq_rows(pq_spec, xb, xq, truth, flat_row, args)
    report(rows, t_start, threads, args)


def pq_rows(
    pq_spec: str, xb: np.ndarray, xq: np.ndarray, truth: np.ndarray, flat_row: Row, args: argparse.Namespace
) -> list[Row]:
    """IVF-PQ alone, then re-ranking its top k × k_factor with exact (RFlat) or 8-bit (SQ8) vectors."""
    import faiss

    base, pq_build = timed(lambda: factory(pq_spec, xb, args.seed))
    rows = measure(
        pq_spec, base, pq_build, [f"nprobe={p}" for p in (4, 8, 16, 32, 64)], xq, truth, flat_row, args
    )
    refine_settings = [f"nprobe={p},k_factor_rf={kf}" for kf in (4, 16) for p in (8, 16, 32)]
    rflat, extra = timed(lambda: faiss.IndexRefineFlat(base, faiss.swig_ptr(xb)))
    rows += measure(f"{pq_spec} + RFlat", rflat, pq_build + extra, refine_settings, xq, truth, flat_row, args)
    del rflat
    gc.collect()

    def sq8() -> Any:
        sq = faiss.IndexScalarQuantizer(args.d, faiss.ScalarQuantizer.QT_8bit)
        sq.train(train_sample(xb, 1, args.seed))
        sq.add(xb)
        return sq

    sq, extra = timed(sq8)
    rsq = faiss.IndexRefine(base, sq)
    rows += measure(f"{pq_spec} + SQ8", rsq, pq_build + extra, refine_settings, xq, truth, flat_row, args)
    return rows


def report(rows: list[Row], t_start: float, threads: int, args: argparse.Namespace) -> None:
    good = [r for r in rows if r.recall_at_10 >= RECALL_GOAL and r.index != "Flat"]
    best = max(good, key=lambda r: r.speedup) if good else None
    if best is None:
        print(f"RATIO ann: no setting reached recall@10 >= {RECALL_GOAL} (goal NOT met)")
    else:
        verdict = "met" if best.speedup >= SPEEDUP_GOAL else "NOT met"
        print(
            f"RATIO ann: {best.speedup:.1f}x Flat's speed at recall@10 {best.recall_at_10:.3f} "
            f"({best.index} {best.setting}; "
            f"goal recall >= {RECALL_GOAL} at >= {SPEEDUP_GOAL:.0f}x: {verdict})"
        )
    print(
        f"total {time.perf_counter() - t_start:.0f} s wall, {time.process_time():.0f} s CPU (this process); "
        f"{load_str()}"
    )
    if args.json:
        meta = {"n": args.n, "nq": args.nq, "d": args.d, "k": args.k, "threads": threads, "load": load_str()}
        args.json.write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=1))


if __name__ == "__main__":
    main()
