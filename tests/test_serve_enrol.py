"""Teaching the service new cars: real uvicorn on 127.0.0.1, real FAISS index on disk, real Chromium."""

from __future__ import annotations

import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from carspotter.retrieval.index import GalleryIndex
from carspotter.serve.app import create_app
from conftest import make_tiny_prepared, make_tiny_run
from test_serve import CHROMIUM, running

TOKEN = "s3cret-token-for-tests-0123456789"


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 4-class run, a gallery over 4 classes, and photos of 2 classes neither has seen."""
    from carspotter.retrieval.build import build_index_from_run

    root = tmp_path_factory.mktemp("enrol")
    six = make_tiny_prepared(root / "six", n_classes=6, per_class=8)
    four = make_tiny_prepared(root / "four", n_classes=4, per_class=8)  # the same classes 0-3
    run = make_tiny_run(root / "run", n_classes=4)
    build_index_from_run(run, four, "train", "euclidean", "Flat", root / "index", device="cpu")
    (root / "token").write_text(TOKEN + "\n")
    return {"run": run, "index": root / "index", "photos": six / "images", "token": root / "token"}


@pytest.fixture()
def index(base: dict[str, Path], tmp_path: Path) -> Path:
    shutil.copytree(base["index"], tmp_path / "index")
    return tmp_path / "index"


def files(base: dict[str, Path], cls: int, ids: range) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [
        ("file", (f"c{cls}_{i}.jpg", (base["photos"] / f"c{cls}_{i:03d}.jpg").read_bytes(), "image/jpeg"))
        for i in ids
    ]


def state(index: Path) -> tuple[bytes, bytes]:
    return (index / "meta.csv").read_bytes(), (index / "index.faiss").read_bytes()


def test_enrol_is_off_without_token_file(base, index: Path) -> None:
    app = create_app(base["run"], index)
    with running(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        before = state(index)
        r = c.post("/api/enrol", data={"class": "X"}, files=files(base, 5, range(1)),
                   headers={"Authorization": f"Bearer {TOKEN}"})  # fmt: skip
        assert r.status_code == 403 and "--admin-token-file" in r.json()["detail"]
        assert c.delete("/api/enrol/X").status_code == 403
        assert c.get("/api/health").json()["enrolment"] is False
        assert state(index) == before


def test_enrol_needs_the_token_then_survives_restart(base, index: Path) -> None:
    before = state(index)
    n0 = len(GalleryIndex.load(index).meta)
    app = create_app(base["run"], index, admin_token_file=base["token"])
    with running(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        assert c.get("/api/health").json()["enrolment"] is True
        r = c.post("/api/enrol", data={"class": "New Five"}, files=files(base, 5, range(2)))
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        for bad in ("Bearer wrong-token-xxxxxxxxxxxxxxxxxx", f"Basic {TOKEN}", "Bearer " + TOKEN[:-1]):
            r = c.post("/api/enrol", data={"class": "New Five"}, files=files(base, 5, range(2)),
                       headers={"Authorization": bad})  # fmt: skip
            assert r.status_code in (401, 403), bad
        assert c.delete("/api/enrol/Class 1").status_code == 401
        assert state(index) == before  # nothing refused changed the index
        names = [x["name"] for x in c.get("/api/classes").json()["classes"]]
        assert "New Five" not in names

        auth = {"Authorization": f"Bearer {TOKEN}"}
        r = c.post("/api/enrol", data={"class": "New Five"}, files=files(base, 5, range(3)), headers=auth)
        assert r.status_code == 200, r.text
        assert r.json() == {"class": "New Five", "added": 3, "new_class": True, "duplicates": [],
                            "gallery_size": n0 + 3}  # fmt: skip
        r = c.post("/api/enrol", data={"class": "New Five"}, files=files(base, 5, range(3, 4)), headers=auth)
        assert r.status_code == 409 and "add_to_existing" in r.json()["detail"]
        r = c.post("/api/enrol", data={"class": "New Five", "add_to_existing": "true"},
                   files=files(base, 5, range(2, 4)), headers=auth)  # fmt: skip
        assert r.status_code == 200 and r.json()["added"] == 1 and len(r.json()["duplicates"]) == 1
        r = c.post("/api/enrol", data={"class": "Bad"}, files=[("file", ("x.txt", b"not a photo", "text/plain"))],
                   headers=auth)  # fmt: skip
        assert r.status_code in (400, 415, 422) and state(index)[0].count(b"\n") == n0 + 5

        classes = {x["name"]: x for x in c.get("/api/classes").json()["classes"]}
        assert classes["New Five"]["origin"] == "enrolled" and classes["New Five"]["gallery_count"] == 4
        top = c.post("/api/classify", files=files(base, 5, range(7, 8))).json()["predictions"][0]
        assert top["class_name"] == "New Five" and top["class_id"] == classes["New Five"]["id"]
        hits = c.post("/api/search?k=3", files=files(base, 5, range(7, 8))).json()["results"]
        enrolled = [h for h in hits if h["class_name"] == "New Five"]
        assert enrolled and enrolled[0]["class_id"] == top["class_id"]
        thumb = c.get(enrolled[0]["thumbnail_url"])
        assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"

    app2 = create_app(base["run"], index, admin_token_file=base["token"])  # a restart
    with running(app2) as url, httpx.Client(base_url=url, timeout=60) as c:
        classes = {x["name"]: x for x in c.get("/api/classes").json()["classes"]}
        assert classes["New Five"]["gallery_count"] == 4
        top = c.post("/api/classify", files=files(base, 5, range(6, 7))).json()["predictions"][0]
        assert top["class_name"] == "New Five"
        r = c.delete("/api/enrol/New Five", headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 200 and r.json()["removed"] == 4
        assert (
            c.delete("/api/enrol/New Five", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 404
        )
        assert "New Five" not in [x["name"] for x in c.get("/api/classes").json()["classes"]]
    assert state(index)[0] != before[0]  # sha256 column added, otherwise the same rows
    assert len(GalleryIndex.load(index).meta) == n0


def test_concurrent_enrol_and_search_see_whole_indexes(base, index: Path) -> None:
    app = create_app(base["run"], index, admin_token_file=base["token"])
    auth = {"Authorization": f"Bearer {TOKEN}"}
    stop, seen, errors = threading.Event(), [], []
    with running(app) as url:

        def searcher() -> None:
            with httpx.Client(base_url=url, timeout=60) as c:
                while not stop.is_set():
                    r = c.post("/api/search?k=50", files=files(base, 4, range(7, 8)))
                    if r.status_code != 200:
                        errors.append(r.text)
                    else:
                        seen.append(len(r.json()["results"]))

        with ThreadPoolExecutor(3) as pool:
            futs = [pool.submit(searcher) for _ in range(2)]
            with httpx.Client(base_url=url, timeout=60) as c:
                for cls, name in ((4, "Four A"), (5, "Five B")):
                    for i in range(0, 6, 2):
                        r = c.post("/api/enrol", data={"class": name, "add_to_existing": "1"},
                                   files=files(base, cls, range(i, i + 2)), headers=auth)  # fmt: skip
                        assert r.status_code == 200, r.text
                        time.sleep(0.05)
            stop.set()
            for f in futs:
                f.result()
    assert not errors and seen
    n0 = len(GalleryIndex.load(base["index"]).meta)
    # every answer came from a whole gallery: its size is n0 plus a whole number of 2-photo enrolments
    assert all(n0 <= s <= n0 + 12 and (s - n0) % 2 == 0 for s in seen), sorted(set(seen))
    assert len(GalleryIndex.load(index).meta) == n0 + 12


@pytest.mark.browser
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"Debian chromium not installed at {CHROMIUM}")
def test_teach_panel_in_headless_chromium(base, index: Path, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    args = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"]
    on = create_app(base["run"], index, admin_token_file=base["token"])
    off = create_app(base["run"], index)
    for i in range(2):
        (tmp_path / f"{i}.jpg").write_bytes((base["photos"] / f"c5_00{i}.jpg").read_bytes())
    with sync_playwright() as pw, running(on) as url_on, running(off) as url_off:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=args)
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url_off + "/")
            page.wait_for_selector("body[data-ready='1']")
            assert not page.locator("#admin").is_visible() and not page.locator("#teach").is_visible()

            page.goto(url_on + "/")
            page.wait_for_selector("body[data-ready='1']")
            assert page.locator("#admin").is_visible() and not page.locator("#teach").is_visible()
            page.locator("#admin summary").click()
            assert not page.locator("#teach").is_visible()  # no token typed yet
            page.fill("#admin-token", "wrong-token-but-long-enough")
            assert page.locator("#teach").is_visible()
            page.fill("#teach-class", "Browser Car")
            page.set_input_files("#teach-files", [str(tmp_path / "0.jpg"), str(tmp_path / "1.jpg")])
            page.click("#teach-go")
            page.wait_for_selector("body[data-teach='error']")
            assert "wrong admin token" in page.locator("#teach-msg").inner_text()
            page.fill("#admin-token", TOKEN)
            page.click("#teach-go")
            page.wait_for_selector("body[data-teach='ok']", timeout=30000)
            assert "Enrolled 2 photo(s)" in page.locator("#teach-msg").inner_text()
            assert errors == []
        finally:
            browser.close()
    assert "Browser Car" in (index / "meta.csv").read_text()


def test_class_names_with_a_slash(base, index: Path) -> None:
    """Real Stanford Cars names hold slashes ("Ram C/V Cargo Van Minivan 2012"): enrol and delete them."""
    app = create_app(base["run"], index, admin_token_file=base["token"])
    auth = {"Authorization": f"Bearer {TOKEN}"}
    name = "Ram C/V Cargo Van Minivan 2012"
    with running(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        r = c.post("/api/enrol", data={"class": name}, files=files(base, 4, range(2)), headers=auth)
        assert r.status_code == 200 and r.json()["class"] == name
        assert name in [x["name"] for x in c.get("/api/classes").json()["classes"]]
        r = c.delete("/api/enrol/" + name.replace("/", "%2F"), headers=auth)
        assert r.status_code == 200 and r.json()["removed"] == 2, r.text
