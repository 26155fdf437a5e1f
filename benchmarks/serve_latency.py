"""Latency and throughput of the web service, with 1 and with 8 concurrent clients.

Starts `carspotter serve` in a subprocess on 127.0.0.1 (so the client does not share the server's GIL),
sends a bounded number of photo uploads to /api/classify and /api/search, and prints p50/p99 latency,
requests/s, and the 8-client / 1-client throughput ratio. `--compare-batching` runs the server twice,
with request batching off (--max-batch 1) and on, and prints that ratio too.

    python benchmarks/serve_latency.py --synthetic
    python benchmarks/serve_latency.py RUN_DIR --index INDEX_DIR --image photo.jpg --requests 200
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]


def build_synthetic(root: Path) -> tuple[Path, Path, Path]:
    """A scratch-CNN run and a gallery index over the generated test dataset (as the tests build them)."""
    sys.path.insert(0, str(REPO / "tests"))
    from carspotter.config import ExperimentConfig, ModelConfig
    from carspotter.data.images import open_rgb
    from carspotter.data.manifest import read_manifest, split_records
    from carspotter.engine.checkpoint import model_info, save_model_json, save_weights
    from carspotter.models.factory import create_model
    from carspotter.retrieval.embed import embed_images
    from carspotter.retrieval.index import GalleryIndex
    from conftest import make_tiny_prepared

    data = make_tiny_prepared(root / "prepared", n_classes=8, per_class=16, size=64)
    records = read_manifest(data)
    names = [n for _, n in sorted({(r.label, r.class_name) for r in records})]
    cfg = ExperimentConfig()
    cfg.model = ModelConfig(arch="scratch_cnn", channels=[16, 32], hidden_dim=64, pretrained=False)
    cfg.data.img_size = 64
    model = create_model(cfg.model, len(names), img_size=64).eval()
    run = root / "run"
    run.mkdir()
    save_weights(model, run / "best.safetensors")
    save_model_json(run, model_info(model, cfg, names))
    gallery = split_records(records, "train")
    emb = embed_images(model, [open_rgb(data / r.path) for r in gallery])
    meta = [{"path": r.path, "label": r.label, "class_name": r.class_name, "split": r.split} for r in gallery]
    info = {"run_dir": str(run), "data_root": str(data.resolve()), "preprocess": model.preprocess.to_dict()}
    GalleryIndex.build(np.asarray(emb, np.float32), meta, info=info).save(root / "index")
    return run, root / "index", data / records[-1].path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(run: Path, index: Path | None, max_batch: int, device: str, threads: int) -> Iterator[str]:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "carspotter",
        "serve",
        str(run),
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    cmd += ["--max-batch", str(max_batch), "--device", device, "--threads", str(threads)]
    cmd += ["--index", str(index)] if index else []
    proc = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"server exited with {proc.returncode}")
            try:
                httpx.get(url + "/api/health", timeout=2).raise_for_status()
                break
            except httpx.TransportError:
                if time.time() > deadline:
                    raise SystemExit("server did not start in 120 s") from None
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


async def load(url: str, endpoint: str, photo: bytes, clients: int, n: int) -> dict[str, float]:
    """`n` requests spread over `clients` concurrent connections; latency per request, throughput overall."""
    latencies: list[float] = []
    errors = 0
    per = [n // clients + (i < n % clients) for i in range(clients)]

    async def worker(count: int) -> None:
        nonlocal errors
        async with httpx.AsyncClient(base_url=url, timeout=120) as c:
            for _ in range(count):
                t0 = time.perf_counter()
                r = await c.post(endpoint, files={"file": ("photo.jpg", photo, "image/jpeg")})
                latencies.append(time.perf_counter() - t0)
                errors += r.status_code != 200

    async with httpx.AsyncClient(base_url=url, timeout=120) as c:  # warm-up
        for _ in range(3):
            await c.post(endpoint, files={"file": ("photo.jpg", photo, "image/jpeg")})
    t0 = time.perf_counter()
    await asyncio.gather(*(worker(k) for k in per))
    wall = time.perf_counter() - t0
    ms = np.array(latencies) * 1000
    return {
        "p50": float(np.percentile(ms, 50)),
        "p99": float(np.percentile(ms, 99)),
        "rps": n / wall,
        "errors": errors,
    }


def run_suite(url: str, photo: bytes, endpoints: list[str], levels: list[int], n: int) -> dict:
    health = httpx.get(url + "/api/health").json()
    out = {}
    for ep in endpoints:
        for c in levels:
            out[(ep, c)] = asyncio.run(load(url, ep, photo, c, n))
    after = httpx.get(url + "/api/health").json()
    out["batching"] = (
        after["images_inferred"] - health["images_inferred"],
        after["batches_run"] - health["batches_run"],
    )
    return out


def print_table(title: str, res: dict, endpoints: list[str], levels: list[int]) -> None:
    print(f"\n{title}")
    print(f"{'endpoint':<15} {'clients':>7} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>8} {'errors':>6}")
    for ep in endpoints:
        for c in levels:
            r = res[(ep, c)]
            print(f"{ep:<15} {c:>7} {r['p50']:>8.1f} {r['p99']:>8.1f} {r['rps']:>8.1f} {r['errors']:>6}")
    if len(levels) > 1:
        lo, hi = min(levels), max(levels)
        for ep in endpoints:
            ratio = res[(ep, hi)]["rps"] / res[(ep, lo)]["rps"]
            print(f"throughput {hi} clients / {lo} client, {ep}: {ratio:.2f}x")
    imgs, batches = res["batching"]
    print(f"forward passes: {batches} for {imgs} images (mean batch {imgs / max(batches, 1):.2f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", nargs="?", type=Path)
    ap.add_argument("--index", type=Path)
    ap.add_argument(
        "--image", type=Path, help="the photo to upload (default: a generated one with --synthetic)"
    )
    ap.add_argument("--synthetic", action="store_true", help="build a tiny run + index in a temp dir")
    ap.add_argument("--requests", type=int, default=160, help="requests per (endpoint, clients) cell")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--compare-batching", action="store_true", help="also run with --max-batch 1")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="the server's torch threads (0 = torch default)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        if args.synthetic:
            run, index, image = build_synthetic(Path(tmp))
        elif args.run_dir is None:
            ap.error("give RUN_DIR (and --index) or --synthetic")
        else:
            run, index, image = args.run_dir, args.index, args.image
        if image is None:
            ap.error("--image PHOTO is needed with a real run")
        photo = Path(image).read_bytes()
        endpoints = ["/api/classify"] + (["/api/search"] if index else [])
        print(
            f"run {run}, index {index}, photo {image} ({len(photo)} bytes), {args.requests} requests per cell"
        )
        configs = [args.max_batch] + ([1] if args.compare_batching and args.max_batch != 1 else [])
        results = {}
        for mb in configs:
            with server(run, index, mb, args.device, args.threads) as url:
                results[mb] = run_suite(url, photo, endpoints, args.clients, args.requests)
            print_table(f"--max-batch {mb} --threads {args.threads}", results[mb], endpoints, args.clients)
        if len(configs) == 2:
            hi = max(args.clients)
            for ep in endpoints:
                ratio = results[args.max_batch][(ep, hi)]["rps"] / results[1][(ep, hi)]["rps"]
                print(f"batching on/off throughput at {hi} clients, {ep}: {ratio:.2f}x")


if __name__ == "__main__":
    main()
