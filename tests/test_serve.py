"""The web service end to end: real uvicorn on 127.0.0.1, a real model and FAISS index, httpx, Chromium."""

from __future__ import annotations

import contextlib
import io
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import uvicorn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from carspotter.config import ExperimentConfig, ModelConfig
from carspotter.data.images import open_rgb
from carspotter.data.manifest import read_manifest, split_records
from carspotter.engine.checkpoint import model_info, save_model_json, save_weights
from carspotter.models.factory import create_model
from carspotter.serve.app import create_app
from carspotter.serve.inference import Busy, MicroBatcher, Predictor
from conftest import make_tiny_prepared

N_CLASSES = 6
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]  # fmt: skip


@contextlib.contextmanager
def chromium_page(url: str) -> Iterator[tuple[Any, list[str]]]:
    """The served page in headless Chromium, loaded and ready; the list collects the page's uncaught errors."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url + "/")
            page.wait_for_selector("body[data-ready='1']")
            yield page, errors
        finally:
            browser.close()


# ---------------------------------------------------------------- fixtures: tiny run, index, real servers
@pytest.fixture(scope="session")
def serve_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A scratch-CNN run dir (random weights are enough here) over a generated prepared dataset."""
    root = tmp_path_factory.mktemp("serve")
    data = make_tiny_prepared(root / "prepared", n_classes=N_CLASSES, per_class=8, size=32)
    names = [n for _, n in sorted({(r.label, r.class_name) for r in read_manifest(data)})]
    cfg = ExperimentConfig()
    cfg.model = ModelConfig(arch="scratch_cnn", channels=[8, 16], hidden_dim=32, pretrained=False)
    cfg.data.img_size = 32
    model = create_model(cfg.model, N_CLASSES, img_size=32).eval()
    run = root / "run"
    run.mkdir()
    save_weights(model, run / "best.safetensors")
    save_model_json(run, model_info(model, cfg, names))
    return {"run": run, "data": data, "root": root}


@pytest.fixture(scope="session")
def serve_data(serve_run: dict[str, Path]) -> dict[str, Path]:
    """`serve_run` plus a FAISS gallery index over its train split, embedded with the run's own model."""
    from carspotter.engine.checkpoint import load_run
    from carspotter.retrieval.embed import embed_images
    from carspotter.retrieval.index import GalleryIndex

    run, data = serve_run["run"], serve_run["data"]
    model, info = load_run(run)
    gallery = split_records(read_manifest(data), "train")
    emb = embed_images(model, [open_rgb(data / r.path) for r in gallery])
    meta = [{"path": r.path, "label": r.label, "class_name": r.class_name, "split": r.split} for r in gallery]
    index_info = {
        "run_dir": str(run.resolve()),
        "data_root": str(data.resolve()),
        "preprocess": info.preprocess,
        "class_names": info.class_names,
        "embed_source": "auto",
    }
    index = GalleryIndex.build(np.asarray(emb, dtype=np.float32), meta, metric="euclidean", info=index_info)
    index.save(serve_run["root"] / "index")
    return {**serve_run, "index": serve_run["root"] / "index"}


@contextlib.contextmanager
def running(app) -> Iterator[str]:
    """Serve `app` with a real uvicorn on a free 127.0.0.1 port in a thread; yield its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_keep_alive=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert thread.is_alive() and time.time() < deadline, "server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()


@pytest.fixture(scope="session")
def base_url(serve_data: dict[str, Path]) -> Iterator[str]:
    app = create_app(serve_data["run"], serve_data["index"], max_upload_mb=10)
    with running(app) as url:
        yield url


@pytest.fixture()
def client(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=60) as c:
        yield c


def photo(serve_data: dict[str, Path], name: str = "c1_000.jpg") -> bytes:
    return (serve_data["data"] / "images" / name).read_bytes()


def upload(data: bytes, name: str = "car.jpg", ctype: str = "image/jpeg") -> dict:
    return {"file": (name, data, ctype)}


def assert_healthy(client: httpx.Client) -> None:
    r = client.get("/api/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"


def png_header_only(w: int, h: int) -> bytes:
    """A tiny PNG whose header claims w×h pixels (a decompression-bomb stand-in, 60-odd bytes)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )


# ---------------------------------------------------------------- happy paths
def test_health_and_classes(client: httpx.Client) -> None:
    h = client.get("/api/health").json()
    assert h["status"] == "ok" and h["num_classes"] == N_CLASSES and h["index"]["size"] == N_CLASSES * 4
    classes = client.get("/api/classes").json()["classes"]
    assert [c["id"] for c in classes] == list(range(N_CLASSES))
    assert classes[2]["name"] == "Class 2" and all(c["gallery_count"] == 4 for c in classes)
    assert client.get("/openapi.json").json()["paths"].keys() >= {
        "/api/classify",
        "/api/search",
        "/api/health",
    }


def test_page_is_self_contained(client: httpx.Client) -> None:
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in r.headers["content-security-policy"]
    html = r.text
    assert 'id="file"' in html and "<script src" not in html and '<link rel="stylesheet"' not in html
    assert "http://" not in html and "https://" not in html  # no CDN, nothing fetched from elsewhere


def test_classify_top5(client: httpx.Client, serve_data: dict[str, Path]) -> None:
    r = client.post("/api/classify", files=upload(photo(serve_data)))
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    probs = [p["probability"] for p in preds]
    assert len(preds) == 5 and probs == sorted(probs, reverse=True)
    assert 0 < sum(probs) <= 1 + 1e-6 and len({p["class_id"] for p in preds}) == 5
    assert all(p["class_name"] == f"Class {p['class_id']}" for p in preds)
    # k as a query parameter and as a form field; capped at the number of classes
    assert len(client.post("/api/classify?k=2", files=upload(photo(serve_data))).json()["predictions"]) == 2
    r3 = client.post("/api/classify", files=upload(photo(serve_data)), data={"k": "3"})
    assert len(r3.json()["predictions"]) == 3
    assert (
        len(client.post("/api/classify?k=50", files=upload(photo(serve_data))).json()["predictions"])
        == N_CLASSES
    )


def test_classify_png_and_webp(client: httpx.Client, serve_data: dict[str, Path]) -> None:
    img = Image.open(io.BytesIO(photo(serve_data))).convert("RGBA")
    for fmt in ("PNG", "WEBP"):
        buf = io.BytesIO()
        img.save(buf, fmt)
        r = client.post(
            "/api/classify", files=upload(buf.getvalue(), f"x.{fmt.lower()}", f"image/{fmt.lower()}")
        )
        assert r.status_code == 200, (fmt, r.text)


def test_search_finds_the_photo_itself(client: httpx.Client, serve_data: dict[str, Path]) -> None:
    gallery = [r for r in read_manifest(serve_data["data"]) if r.split == "train"]
    target = gallery[9]
    r = client.post("/api/search?k=3", files=upload((serve_data["data"] / target.path).read_bytes()))
    assert r.status_code == 200, r.text
    hits = r.json()["results"]
    assert len(hits) == 3
    assert hits[0]["id"] == 9 and hits[0]["distance"] < 1e-3 and hits[0]["class_name"] == target.class_name
    dists = [h["distance"] for h in hits]
    assert dists == sorted(dists)
    assert (
        len(client.post("/api/search", files=upload(photo(serve_data)), data={"k": "7"}).json()["results"])
        == 7
    )
    big = client.post("/api/search?k=50", files=upload(photo(serve_data))).json()["results"]
    assert len(big) == len(gallery) and len({h["id"] for h in big}) == len(gallery)


def test_gallery_thumbnails_by_id_only(client: httpx.Client) -> None:
    r = client.get("/api/gallery/0")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(r.content)).size == (32, 32)
    for bad in ("/api/gallery/24", "/api/gallery/-1", "/api/gallery/99999999999999999999"):
        resp = client.get(bad)
        assert resp.status_code in (404, 422) and "detail" in resp.json(), bad
    assert client.get("/api/gallery/abc").status_code == 422
    for probe in (
        "/api/gallery/..%2F..%2Fetc%2Fpasswd",
        "/api/gallery/0/../../../etc/passwd",
        "/api/gallery/%2e%2e",
    ):
        resp = client.get(probe)
        assert resp.status_code in (404, 422) and b"root:" not in resp.content, probe


def test_server_without_index(serve_run: dict[str, Path]) -> None:
    serve_data = serve_run
    app = create_app(serve_data["run"], None)
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as c:
        assert c.get("/api/health").json()["index"] is None
        r = c.post("/api/search", files=upload(photo(serve_data)))
        assert r.status_code == 409 and "--index" in r.json()["detail"]
        assert c.get("/api/gallery/0").status_code == 404
        assert c.post("/api/classify", files=upload(photo(serve_data))).status_code == 200


# ---------------------------------------------------------------- bad input: 4xx, never 5xx, server stays up
def _bad_cases(serve_data: dict[str, Path]) -> dict[str, dict]:
    jpeg = photo(serve_data)
    buf = io.BytesIO()
    Image.new("1", (8000, 8000)).save(buf, "PNG")  # a real 64 Mpx PNG of ~8 KB: over our 40 Mpx cap
    gif = io.BytesIO()
    Image.new("RGB", (8, 8)).save(gif, "GIF")
    return {
        "empty body": {"content": b"", "headers": {"content-type": "multipart/form-data; boundary=x"}},
        "no body at all": {},
        "empty file": {"files": upload(b"")},
        "wrong field name": {"files": {"photo": ("a.jpg", jpeg, "image/jpeg")}},
        "text file": {"files": upload(b"hello, I am not a car\n", "a.txt", "text/plain")},
        "text disguised as jpeg": {"files": upload(b"hello" * 100, "a.jpg", "image/jpeg")},
        "truncated jpeg": {"files": upload(jpeg[: len(jpeg) // 2])},
        "gif": {"files": upload(gif.getvalue(), "a.gif", "image/gif")},
        "30000x30000 png header": {"files": upload(png_header_only(30000, 30000), "bomb.png", "image/png")},
        "8000x8000 real png": {"files": upload(buf.getvalue(), "big.png", "image/png")},
        "json body": {"json": {"file": "/etc/passwd"}},
        "path as form field": {"data": {"file": "/etc/passwd"}},
        "k=0": {"files": upload(jpeg), "params": {"k": "0"}},
        "k=51": {"files": upload(jpeg), "params": {"k": "51"}},
        "k=abc": {"files": upload(jpeg), "data": {"k": "abc"}},
    }


@pytest.mark.parametrize("endpoint", ["/api/classify", "/api/search", "/api/explain"])
def test_bad_input_is_a_clear_4xx(client: httpx.Client, serve_data: dict[str, Path], endpoint: str) -> None:
    expected = {
        "empty body": (400, 422), "no body at all": (400,), "empty file": (400,), "wrong field name": (400,),
        "text file": (415,), "text disguised as jpeg": (415,), "truncated jpeg": (400, 422), "gif": (415,),
        "30000x30000 png header": (413, 422), "8000x8000 real png": (413,), "json body": (400,),
        "path as form field": (400, 422), "k=0": (422,), "k=51": (422,), "k=abc": (422,),
    }  # fmt: skip
    for name, kwargs in _bad_cases(serve_data).items():
        r = client.post(endpoint, **kwargs)
        assert r.status_code in expected[name], (name, r.status_code, r.text)
        detail = r.json()["detail"]
        assert isinstance(detail, str) and len(detail) > 5, (name, detail)
    assert_healthy(client)


def test_50mb_body_is_refused_while_streaming(client: httpx.Client, serve_data: dict[str, Path]) -> None:
    big = b"\xff\xd8" + os.urandom(1024) * (50 * 1024)  # 50 MB "JPEG"
    t0 = time.perf_counter()
    r = client.post("/api/classify", files=upload(big))
    with_length = time.perf_counter() - t0
    assert r.status_code == 413 and "10 MB" in r.json()["detail"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: the server must count
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n\r\n'
        for _ in range(50):
            yield big[: 1024 * 1024]
        yield b"\r\n--b--\r\n"

    t0 = time.perf_counter()
    r = client.post(
        "/api/search", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"}
    )
    chunked = time.perf_counter() - t0
    assert r.status_code == 413 and "10 MB" in r.json()["detail"]
    # just under the limit is accepted as far as size goes (then refused as not an image)
    r = client.post("/api/classify", files=upload(b"\0" * (10 * 1024 * 1024 - 10)))
    assert r.status_code == 415, r.text
    assert_healthy(client)
    print(
        f"\n50 MB body → 413 in {1000 * with_length:.0f} ms (Content-Length), "
        f"{1000 * chunked:.0f} ms (chunked)"
    )


def test_small_upload_limit_is_configurable(serve_run: dict[str, Path]) -> None:
    serve_data = serve_run
    app = create_app(serve_data["run"], None, max_upload_mb=0.5)
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as c:
        # just over the photo limit (caught after parsing) and far over it (caught while streaming)
        for size in (int(0.55 * 2**20), 2 * 2**20):
            r = c.post("/api/classify", files=upload(b"\xff\xd8" + b"\0" * size))
            assert r.status_code == 413 and "0.5 MB" in r.json()["detail"], size
        assert c.post("/api/classify", files=upload(photo(serve_data))).status_code == 200
        assert_healthy(c)


# ---------------------------------------------------------------- fuzzing: hypothesis, 4xx only
def _corrupt(data: bytes, ops: list[tuple[int, int, int]]) -> bytes:
    b = bytearray(data)
    for kind, pos, val in ops:
        if not b:
            break
        p = pos % len(b)
        if kind == 0:
            b[p] = val
        elif kind == 1:
            del b[p:]
        elif kind == 2:
            b[p:p] = bytes([val]) * (val % 64)
        else:
            del b[p : p + val]
    return bytes(b)


def _fuzz_images(serve_data: dict[str, Path]) -> list[bytes]:
    img = Image.open(io.BytesIO(photo(serve_data)))
    out = [photo(serve_data)]
    for fmt in ("PNG", "WEBP"):
        buf = io.BytesIO()
        img.save(buf, fmt)
        out.append(buf.getvalue())
    return out


FUZZ_SETTINGS = settings(
    max_examples=130,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
    database=None,
)


@FUZZ_SETTINGS
@given(
    which=st.integers(0, 2),
    ops=st.lists(
        st.tuples(st.integers(0, 3), st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=4
    ),
    endpoint=st.sampled_from(["/api/classify", "/api/search"]),
    ctype=st.sampled_from(["image/jpeg", "image/png", "application/octet-stream", "text/plain", ""]),
)
def _send_corrupted_image(client, images, tally, which, ops, endpoint, ctype) -> None:
    data = _corrupt(images[which], ops)
    r = client.post(endpoint, files={"file": ("f", data, ctype)} if ctype else {"file": ("f", data)})
    tally[r.status_code] += 1
    assert r.status_code < 500, r.text
    assert r.status_code == 200 or isinstance(r.json()["detail"], str)


def test_fuzz_corrupted_images(client: httpx.Client, serve_data: dict[str, Path]) -> None:
    """Valid JPEG/PNG/WebP photos with random byte flips, cuts and insertions: 200 or a 4xx, never a 5xx."""
    tally: Counter[int] = Counter()
    _send_corrupted_image(client, _fuzz_images(serve_data), tally)
    assert sum(tally.values()) >= 100 and max(tally) < 500, tally
    assert_healthy(client)
    print(f"\ncorrupted images: {sum(tally.values())} requests, status counts {dict(sorted(tally.items()))}")


CONTENT_TYPES = [
    "multipart/form-data",
    "multipart/form-data; boundary=",
    "multipart/form-data; boundary=x",
    "application/json",
    "application/x-www-form-urlencoded",
    "image/jpeg",
    "text/plain; charset=utf-8",
]


@settings(FUZZ_SETTINGS, max_examples=240)
@given(
    mode=st.sampled_from(["raw", "files", "envelope"]),
    body=st.binary(max_size=2048),
    ctype=st.one_of(st.sampled_from(CONTENT_TYPES), st.text(max_size=40)),
    field=st.text(max_size=12),
    filename=st.text(max_size=12),
    k=st.one_of(st.none(), st.integers(-(10**6), 10**6).map(str), st.text(max_size=8)),
    endpoint=st.sampled_from(["/api/classify", "/api/search"]),
)
def _send_malformed_request(client, tally, mode, body, ctype, field, filename, k, endpoint) -> None:
    params = {"k": k} if k is not None else {}
    if mode == "files":
        r = client.post(
            endpoint, params=params, files={field or "file": (filename, body, ctype[:40] or "x/y")}
        )
    else:
        if mode == "envelope":  # a well-formed multipart frame around random headers and bytes
            disp = f'form-data; name="{field}"; filename="{filename}"'.encode("utf-8", "replace")
            body = b"--x\r\nContent-Disposition: " + disp + b"\r\n\r\n" + body + b"\r\n--x--\r\n"
            ctype = "multipart/form-data; boundary=x"
        printable = "".join(c for c in ctype if " " <= c <= "~").strip()  # what an HTTP client can send
        r = client.post(endpoint, params=params, content=body, headers={"content-type": printable or "x/y"})
    tally[r.status_code] += 1
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    assert isinstance(r.json()["detail"], str)


def test_fuzz_malformed_requests(client: httpx.Client) -> None:
    """Random bodies, content types, field names, filenames and k values: 200+ requests, every one a 4xx
    with a JSON detail (new random cases every run), and the server is healthy afterwards."""
    tally: Counter[int] = Counter()
    t0 = time.perf_counter()
    _send_malformed_request(client, tally)
    seconds = time.perf_counter() - t0
    n = sum(tally.values())
    assert n >= 200, tally
    assert all(400 <= code < 500 for code in tally), tally
    assert_healthy(client)
    print(f"\nmalformed requests: {n} in {seconds:.1f} s, status counts {dict(sorted(tally.items()))}")


def test_still_healthy_after_fuzzing(client: httpx.Client) -> None:
    assert_healthy(client)


# ---------------------------------------------------------------- concurrency and batching
def test_concurrent_clients_get_correct_answers(base_url: str, serve_data: dict[str, Path]) -> None:
    names = [f"c{c}_00{i}.jpg" for c in range(N_CLASSES) for i in range(2)]
    with httpx.Client(base_url=base_url, timeout=60) as c:
        want_cls = {
            n: c.post("/api/classify", files=upload(photo(serve_data, n))).json()["predictions"]
            for n in names
        }
        want_hits = {
            n: c.post("/api/search", files=upload(photo(serve_data, n))).json()["results"] for n in names
        }
        before = c.get("/api/health").json()

    def worker(w: int) -> list[str]:
        errors = []
        with httpx.Client(base_url=base_url, timeout=60) as c:
            for i in range(50):
                n = names[(w * 7 + i) % len(names)]
                ep = "/api/classify" if (w + i) % 2 else "/api/search"
                r = c.post(ep, files=upload(photo(serve_data, n)))
                if r.status_code != 200:
                    errors.append(f"{ep} {r.status_code} {r.text}")
                    continue
                got, want = (
                    (r.json()["predictions"], want_cls[n])
                    if ep.endswith("classify")
                    else (r.json()["results"], want_hits[n])
                )
                if [g.get("class_id") for g in got] != [x.get("class_id") for x in want] or not np.allclose(
                    [g.get("probability", g.get("distance")) for g in got],
                    [x.get("probability", x.get("distance")) for x in want],
                    atol=1e-4,
                ):
                    errors.append(f"{ep} {n}: batched answer differs from the single one")
        return errors

    t0 = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        errors = [e for errs in pool.map(worker, range(8)) for e in errs]
    seconds = time.perf_counter() - t0
    assert errors == []
    with httpx.Client(base_url=base_url, timeout=60) as c:
        after = c.get("/api/health").json()
    n_images = after["images_inferred"] - before["images_inferred"]
    assert n_images == 400
    print(
        f"\n400 requests from 8 clients in {seconds:.1f} s, {len(errors)} errors, "
        f"{after['batches_run'] - before['batches_run']} forward passes"
    )


def test_batcher_groups_waiting_requests() -> None:
    """While the worker is busy, later requests queue up, then run as one batch, each with its own answer."""
    gate, calls = threading.Event(), []

    def fn(images: list, ks: list[int]) -> list:
        calls.append(len(images))
        gate.wait(10)
        return [(im, k) for im, k in zip(images, ks, strict=True)]

    b = MicroBatcher({"x": fn}, max_batch=8)
    try:
        first = b.submit("x", "img0", 0)
        while not calls:
            time.sleep(0.001)
        futs = [b.submit("x", f"img{i}", i) for i in range(1, 11)]
        gate.set()
        assert first.result(10) == ("img0", 0)
        assert [f.result(10) for f in futs] == [(f"img{i}", i) for i in range(1, 11)]
        assert calls == [1, 8, 2]
    finally:
        b.close()


def test_batcher_survives_errors_and_refuses_overload() -> None:
    gate = threading.Event()

    def fn(images: list, ks: list[int]) -> list:
        gate.wait(10)
        if "boom" in images:
            raise RuntimeError("model failed")
        return list(images)

    b = MicroBatcher({"x": fn}, max_batch=1, max_queue=2)
    try:
        first = b.submit("x", "boom", 1)  # taken by the worker, which then blocks on the gate
        while b._queue.qsize():
            time.sleep(0.001)
        queued = [b.submit("x", "a", 1), b.submit("x", "b", 1)]
        with pytest.raises(Busy, match="busy"):
            b.submit("x", "c", 1)
        gate.set()
        with pytest.raises(RuntimeError, match="model failed"):
            first.result(10)
        assert [f.result(10) for f in queued] == ["a", "b"]  # the thread lived on
    finally:
        b.close()


def test_batched_forward_equals_one_by_one(serve_data: dict[str, Path]) -> None:
    p = Predictor(serve_data["run"], serve_data["index"])
    try:
        imgs = [open_rgb(serve_data["data"] / "images" / f"c{c}_000.jpg") for c in range(N_CLASSES)]
        together = p.classify_batch(imgs, [3] * len(imgs))
        alone = [p.classify_batch([im], [3])[0] for im in imgs]
        for t, a in zip(together, alone, strict=True):
            t, a = t["predictions"], a["predictions"]  # the answer's top-k list
            assert [x["class_id"] for x in t] == [x["class_id"] for x in a]
            assert np.allclose([x["probability"] for x in t], [x["probability"] for x in a], atol=1e-5)
        s_together = p.search_batch(imgs, [2, 4, 1, 3, 2, 5])
        assert [len(s) for s in s_together] == [2, 4, 1, 3, 2, 5]
        assert [s[0]["id"] for s in s_together] == [p.search_batch([im], [1])[0][0]["id"] for im in imgs]
    finally:
        p.close()


# ---------------------------------------------------------------- the command line
def test_cli_serve_starts_and_answers(serve_data: dict[str, Path]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = [
        sys.executable,
        "-m",
        "carspotter",
        "serve",
        str(serve_data["run"]),
        "--index",
        str(serve_data["index"]),
    ]
    proc = subprocess.Popen([*exe, "--port", str(port), "--log-level", "warning"], stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 60
        while True:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            try:
                h = httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2)
                break
            except httpx.TransportError:
                assert time.time() < deadline, "carspotter serve did not come up in 60 s"
                time.sleep(0.2)
        assert h.json()["index"]["size"] == N_CLASSES * 4
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    bad = subprocess.run(
        [sys.executable, "-m", "carspotter", "serve", str(serve_data["root"] / "nope")],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "nope" in bad.stderr and "Traceback" not in bad.stderr


# ---------------------------------------------------------------- a real browser
@pytest.mark.browser
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"Debian chromium not installed at {CHROMIUM}")
def test_page_in_headless_chromium(base_url: str, serve_data: dict[str, Path], tmp_path: Path) -> None:
    with chromium_page(base_url) as (page, errors):
        page.fill("#k", "6")
        page.set_input_files("#file", str(serve_data["data"] / "images" / "c3_001.jpg"))
        page.wait_for_selector("body[data-result='ok']", timeout=30000)
        rows = page.locator("#top5 .row")
        assert rows.count() == 5
        assert page.locator("#lookalikes .card").count() == 6
        top1 = rows.first.get_attribute("data-class-id")
        names = page.locator("#lookalikes .card .cls").all_text_contents()
        n_ticks = page.locator("#lookalikes .card .match").count()
        assert n_ticks == sum(n == f"Class {top1}" for n in names)
        imgs = page.locator("#lookalikes img")  # thumbnails really load (polled here: the CSP forbids eval)
        deadline = time.time() + 20
        while not imgs.evaluate_all("els => els.every(i => i.complete && i.naturalWidth > 0)"):
            assert time.time() < deadline, "gallery thumbnails did not load"
            time.sleep(0.05)
        page.set_input_files("#file", {"name": "x.txt", "mimeType": "text/plain", "buffer": b"not a photo"})
        page.wait_for_selector("body[data-result='error']")
        assert "not an image" in page.locator("#error").inner_text()
        shot = tmp_path / "serve.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 5000 and errors == []


# ---------------------------------------------------------------- where the car is, and the second look
def _box_ok(box: list[float]) -> bool:
    return len(box) == 4 and 0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1


def test_classify_returns_the_car_box(client: httpx.Client, serve_data: dict[str, Path]) -> None:
    body = client.post("/api/classify", files=upload(photo(serve_data))).json()
    assert _box_ok(body["box"]) and body["zoom"] is None
    assert client.get("/api/health").json()["zoom"] is None


def _car_photo(path: Path) -> Path:
    """A drawn car on a street (data synth), 160×120: a photo with somewhere for the box to be."""
    from carspotter.data.synth import class_catalogue, render

    img, _ = render(class_catalogue(2)[1], np.random.default_rng(3), 160)
    img.crop((0, 20, 160, 140)).save(path, quality=92)
    return path


@pytest.mark.browser
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"Debian chromium not installed at {CHROMIUM}")
def test_page_draws_the_box_and_the_zoomed_crop(serve_data: dict[str, Path], tmp_path: Path) -> None:
    from carspotter.explain.zoom import ZoomSettings

    car = _car_photo(tmp_path / "car.jpg")
    app = create_app(serve_data["run"], None, zoom=ZoomSettings("mean"))
    with running(app) as url:
        api = httpx.post(url + "/api/classify", files=upload(car.read_bytes()), timeout=60).json()
        assert _box_ok(api["box"]) and _box_ok(api["zoom"]["crop"]) and api["zoom"]["used"] is True
        with chromium_page(url) as (page, errors):
            page.set_input_files("#file", str(car))
            page.wait_for_selector("body[data-result='ok']", timeout=30000)
            shown = page.locator("#carbox")
            assert shown.is_visible()
            got = [float(v) for v in shown.get_attribute("data-box").split(",")]
            assert np.allclose(got, api["box"], atol=1e-6)  # the same photo gives the same box
            pb, bb = page.locator("#preview").bounding_box(), shown.bounding_box()
            assert pb and bb
            # drawn where the API says, in the displayed photo's pixels (borders: a couple of px)
            assert abs(bb["x"] - (pb["x"] + got[0] * pb["width"])) < 3
            assert abs(bb["width"] - (got[2] - got[0]) * pb["width"]) < 5
            assert abs(bb["y"] - (pb["y"] + got[1] * pb["height"])) < 3
            page.wait_for_selector("#zoomfig[data-drawn='1']")
            cw, ch = page.locator("#zoomcrop").evaluate("c => [c.width, c.height]")
            crop = api["zoom"]["crop"]
            assert cw > 0 and abs(cw / ch - (crop[2] - crop[0]) * 160 / ((crop[3] - crop[1]) * 120)) < 0.1
            assert "second look" in page.locator("#status").inner_text()
            shot = tmp_path / "box.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 5000 and errors == []
