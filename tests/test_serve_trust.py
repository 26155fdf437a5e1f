"""The service's trustworthy answers and hardening, on a real uvicorn on 127.0.0.1 and real Chromium:
make → model → year with calibrated percentages, the "unknown" state, offline /docs, the Host allow-list,
and no exception text in replies."""

from __future__ import annotations

import io
import re
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from carspotter.data.images import open_rgb
from carspotter.data.manifest import read_manifest, split_records
from carspotter.engine.calibration import Calibration, fit_calibration, load_calibration, save_calibration
from carspotter.models.loading import load_run
from carspotter.serve.app import create_app
from carspotter.serve.hosts import allowed_hosts_for, host_name
from test_serve import CHROMIUM, running, serve_run, upload  # noqa: F401  (serve_run is a fixture)


@pytest.fixture(scope="module")
def trust_runs(serve_run: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:  # noqa: F811
    """Two copies of the serve run: one calibrated on its val photos, one whose threshold rejects everything."""
    root = tmp_path_factory.mktemp("serve-trust")
    calibrated, strict = root / "calibrated", root / "strict"
    shutil.copytree(serve_run["run"], calibrated)
    shutil.copytree(serve_run["run"], strict)
    model, _ = load_run(calibrated)
    tf = model.preprocess.transform()
    val = split_records(read_manifest(serve_run["data"]), "val")
    with torch.inference_mode():
        logits = model(torch.stack([tf(open_rgb(serve_run["data"] / r.path)) for r in val])).float()
    save_calibration(calibrated, fit_calibration(logits, np.array([r.label for r in val])))
    save_calibration(strict, Calibration(thresholds={"msp": 1.01, "energy": 1e9}))  # nothing passes
    return {"calibrated": calibrated, "strict": strict, "data": serve_run["data"]}


def jpeg(data: Path, name: str = "c1_005.jpg") -> bytes:
    return (data / "images" / name).read_bytes()


def test_classify_is_the_predict_json_structure(trust_runs: dict[str, Path]) -> None:
    from carspotter.engine.batch_predict import predict_files

    cal = load_calibration(trust_runs["calibrated"])
    with running(create_app(trust_runs["calibrated"])) as url, httpx.Client(base_url=url, timeout=60) as c:
        a = c.post("/api/classify", files=upload(jpeg(trust_runs["data"]))).json()
        health = c.get("/api/health").json()
    [b] = predict_files(trust_runs["calibrated"], [trust_runs["data"] / "images" / "c1_005.jpg"])
    assert set(b) <= set(a) and a["k"] == 5
    for key in ("class_id", "class_name", "make", "model", "body", "year", "unknown", "open_set"):
        assert a[key] == b[key], key
    assert a["probability"] == pytest.approx(b["probability"], abs=1e-5)
    assert health["temperature"] == pytest.approx(cal.temperature) and cal.temperature != 1.0
    assert a["temperature"] == pytest.approx(cal.temperature)
    assert a["make"]["probability"] >= a["model"]["probability"] >= a["probability"] - 1e-9


def test_host_allow_list_and_no_exception_text(trust_runs: dict[str, Path]) -> None:
    app = create_app(trust_runs["calibrated"], allowed_hosts=allowed_hosts_for("127.0.0.1", ["cars.example"]))
    data = jpeg(trust_runs["data"])
    with running(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        port = url.rsplit(":", 1)[1]
        assert c.get("/api/health").status_code == 200
        for host in (f"localhost:{port}", "cars.example", f"CARS.example:{port}"):
            assert c.get("/api/health", headers={"Host": host}).status_code == 200, host
        for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example", ""):
            r = c.post("/api/classify", files=upload(data), headers={"Host": host})
            assert r.status_code == 400 and "host not allowed" in r.json()["detail"], host
        # decoder messages stay on the server: a short fixed reason only
        cut = c.post("/api/classify", files=upload(data[: len(data) // 2]))
        assert cut.status_code in (400, 422) and cut.json()["detail"] in ("truncated image", "corrupt image")
        bad_header = c.post("/api/classify", files=upload(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "x.png"))
        assert bad_header.status_code in (415, 422)
        for r in (cut, bad_header):
            assert not re.search(r"Error|Exception|Traceback|bytes not processed|\(", r.json()["detail"])
        # formats outside JPEG/PNG/WebP never reach a parser: 415 even for perfectly valid files
        for fmt in ("TIFF", "BMP", "GIF", "ICO"):
            buf = io.BytesIO()
            Image.new("RGB", (32, 32), (200, 30, 30)).save(buf, fmt)
            r = c.post("/api/classify", files=upload(buf.getvalue(), f"x.{fmt.lower()}"))
            assert r.status_code == 415, (fmt, r.text)
    assert allowed_hosts_for("0.0.0.0") == ["localhost", "127.0.0.1", "::1"]
    assert host_name("[::1]:8000") == "::1" and host_name("Example.COM:80") == "example.com"


def test_docs_render_offline(trust_runs: dict[str, Path]) -> None:
    with running(create_app(trust_runs["calibrated"])) as url, httpx.Client(base_url=url, timeout=60) as c:
        html = c.get("/docs").text
        assert "cdn.jsdelivr.net" not in html and "unpkg.com" not in html
        assets = re.findall(r'(?:src|href)="(/[^"]+)"', html)
        assert any(a.endswith(".js") for a in assets) and any(a.endswith(".css") for a in assets)
        for a in assets:
            assert c.get(a).status_code == 200, a
        if Path(CHROMIUM).exists():
            _docs_in_chromium(url)


def _launch(pw):
    args = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"]  # fmt: skip
    return pw.chromium.launch(executable_path=CHROMIUM, args=args)


def _docs_in_chromium(url: str) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = _launch(pw)
        try:
            page = browser.new_page()
            outside: list[str] = []

            def only_local(route) -> None:
                if route.request.url.startswith(url):
                    route.continue_()
                else:
                    outside.append(route.request.url)
                    route.abort()

            page.route("**/*", only_local)
            page.goto(url + "/docs")
            page.wait_for_selector(".swagger-ui .info .title", timeout=30000)
            assert "carspotter" in page.locator(".swagger-ui .info .title").inner_text()
            page.wait_for_selector(".opblock-summary-path[data-path='/api/classify']", timeout=30000)
            assert outside == [], outside
        finally:
            browser.close()


@pytest.mark.browser
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"Debian chromium not installed at {CHROMIUM}")
def test_page_shows_hierarchy_and_unknown_state(trust_runs: dict[str, Path], tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    photo = trust_runs["data"] / "images" / "c2_004.jpg"
    with (
        running(create_app(trust_runs["calibrated"])) as ok_url,
        running(create_app(trust_runs["strict"])) as strict_url,
        sync_playwright() as pw,
    ):
        browser = _launch(pw)
        try:
            for url, unknown in ((ok_url, False), (strict_url, True)):
                page = browser.new_page(viewport={"width": 1200, "height": 900})
                errors: list[str] = []
                page.on("pageerror", lambda e, errors=errors: errors.append(str(e)))
                page.goto(url + "/")
                page.wait_for_selector("body[data-ready='1']")
                page.set_input_files("#file", str(photo))
                page.wait_for_selector("body[data-result='ok']", timeout=30000)
                steps = page.locator("#answer .step")
                levels = steps.evaluate_all("els => els.map(e => e.dataset.level)")
                assert levels[:3] == ["make", "model", "year"]
                make_text = page.locator("#answer .step[data-level='make']").inner_text()
                assert "Class" in make_text and re.search(r"\d+ %", make_text), make_text
                unsure = page.locator("#unsure")
                assert unsure.is_visible() is unknown
                assert page.evaluate("document.body.dataset.unknown") == ("1" if unknown else "0")
                if unknown:
                    assert "may be a car we don't know" in unsure.inner_text()
                    assert page.locator("#top5 .row").count() == 5  # the nearest guesses are still shown
                else:
                    assert "calibrated" in page.locator("#calib-note").inner_text()
                shot = tmp_path / f"page_{int(unknown)}.png"
                page.screenshot(path=str(shot), full_page=True)
                assert shot.stat().st_size > 5000 and errors == []
                page.close()
        finally:
            browser.close()
