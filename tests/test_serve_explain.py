"""/api/explain and the page's "why" panel: real uvicorn on 127.0.0.1, real FAISS index, real Chromium."""

from __future__ import annotations

import base64
import io
import threading
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from carspotter.serve.app import create_app
from test_serve import CHROMIUM, chromium_page, photo, running, serve_data, serve_run, upload  # noqa: F401 — fixtures


@pytest.fixture(scope="module")
def app_and_url(serve_data: dict[str, Path]):  # noqa: F811
    app = create_app(serve_data["run"], serve_data["index"], max_upload_mb=10)
    with running(app) as url:
        yield app, url


def test_explain_returns_overlay_and_grouped_evidence(app_and_url, serve_data: dict[str, Path]) -> None:  # noqa: F811
    _, url = app_and_url
    with httpx.Client(base_url=url, timeout=60) as c:
        data = photo(serve_data, "c2_001.jpg")
        r = c.post("/api/explain?k=2", files=upload(data))
        assert r.status_code == 200, r.text
        ex = r.json()
        cls = c.post("/api/classify", files=upload(data)).json()["predictions"]
        assert ex["prediction"]["class_id"] == cls[0]["class_id"]  # the same answer as classify
        assert abs(ex["prediction"]["probability"] - cls[0]["probability"]) < 1e-3
        assert ex["runner_up"]["class_id"] == cls[1]["class_id"]
        assert ex["target_layer"] == "backbone.blocks.1" and ex["method"] == "gradcam++" and ex["k"] == 2
        head, b64 = ex["overlay"].split(",", 1)
        assert head == "data:image/png;base64"
        img = Image.open(io.BytesIO(base64.b64decode(b64)))
        assert img.format == "PNG" and img.size == Image.open(io.BytesIO(data)).size
        box = ex["box"]  # where the car is: the CAM box, as /api/classify gives it
        assert isinstance(box, list) and len(box) == 4 and all(0.0 <= v <= 1.0 for v in box), box
        assert box[0] < box[2] and box[1] < box[3], box
        classify_box = c.post("/api/classify", files=upload(data)).json()["box"]
        assert all(abs(a - b) <= 0.05 for a, b in zip(box, classify_box, strict=True)), (box, classify_box)
        top1, runner = ex["evidence"]
        assert (top1["role"], top1["class_id"], len(top1["hits"])) == ("top1", cls[0]["class_id"], 2)
        assert (runner["role"], runner["class_id"], len(runner["hits"])) == (
            "runner-up",
            cls[1]["class_id"],
            1,
        )
        for g in (top1, runner):
            assert all(h["class_id"] == g["class_id"] for h in g["hits"])
        assert top1["hits"][0]["distance"] <= top1["hits"][1]["distance"]
        thumb = c.get(top1["hits"][0]["thumbnail_url"])
        assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
        assert "path" not in top1["hits"][0]  # no server paths leave the service
        bad = c.post("/api/explain", files=upload(b"not a photo", "x.txt", "text/plain"))
        assert bad.status_code == 415 and "image" in bad.json()["detail"]


def test_classify_answers_while_an_explanation_is_running(app_and_url, serve_data: dict[str, Path]) -> None:  # noqa: F811
    """Hold the explainer busy (its lock, as a long explanation would) and classify must still answer."""
    app, url = app_and_url
    service = app.state.service.explainer
    q = service.batcher._queue
    sent = q.unfinished_tasks
    result: dict[str, httpx.Response] = {}
    service.lock.acquire()
    try:
        t = threading.Thread(
            target=lambda: result.setdefault(
                "r", httpx.post(url + "/api/explain", files=upload(photo(serve_data)), timeout=60)
            ),
            daemon=True,
        )
        t.start()
        deadline = time.time() + 30
        while not (q.unfinished_tasks > sent and q.qsize() == 0):  # taken by the explain worker, now stuck
            assert time.time() < deadline, "the explanation never reached its worker"
            time.sleep(0.01)
        t0 = time.perf_counter()
        r = httpx.post(url + "/api/classify", files=upload(photo(serve_data)), timeout=20)
        assert r.status_code == 200 and len(r.json()["predictions"]) == 5
        assert time.perf_counter() - t0 < 15
        assert t.is_alive() and "r" not in result  # the explanation is still running
    finally:
        service.lock.release()
    t.join(timeout=60)
    assert result["r"].status_code == 200 and result["r"].json()["overlay"].startswith("data:image/png")


@pytest.mark.browser
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"Debian chromium not installed at {CHROMIUM}")
def test_page_shows_overlay_toggle_and_grouped_evidence(app_and_url, serve_data: dict[str, Path]) -> None:  # noqa: F811
    _, url = app_and_url
    with chromium_page(url) as (page, errors):
        assert not page.locator("#overlay-label").is_visible()
        page.set_input_files("#file", str(serve_data["data"] / "images" / "c3_001.jpg"))
        page.wait_for_selector("body[data-result='ok']", timeout=30000)
        page.wait_for_selector("body[data-explain='ok']", timeout=60000)
        top1 = page.locator("#top5 .row").first.get_attribute("data-class-id")
        second = page.locator("#top5 .row").nth(1).get_attribute("data-class-id")
        toggle = page.locator("#overlay-toggle")
        assert page.locator("#overlay-label").is_visible()
        preview = page.locator("#preview")
        assert preview.get_attribute("src").startswith("blob:")
        toggle.check()
        assert (
            preview.get_attribute("src").startswith("data:image/png")
            and preview.get_attribute("data-showing") == "overlay"
        )
        toggle.uncheck()
        assert preview.get_attribute("src").startswith("blob:")
        groups = page.locator("#evidence .evidence-group")
        assert groups.count() == 2
        assert groups.nth(0).get_attribute("data-role") == "top1"
        assert groups.nth(0).get_attribute("data-class-id") == top1
        assert groups.nth(1).get_attribute("data-role") == "runner-up"
        assert groups.nth(1).get_attribute("data-class-id") == second
        assert groups.nth(0).locator(".card").count() == 3 and groups.nth(1).locator(".card").count() == 1
        imgs = page.locator("#evidence img")
        deadline = time.time() + 20
        while not imgs.evaluate_all("els => els.every(i => i.complete && i.naturalWidth > 0)"):
            assert time.time() < deadline, "evidence thumbnails did not load"
            time.sleep(0.05)
        assert errors == []
