"""Fault and bad-input suite (issue 10): nothing crashes, nothing is lost.

Most faults are tested beside the code they guard (docs/RELIABILITY.md maps every fault to its test):
bad photos in test_data_prepare.py, bad annotation files in test_data_layouts.py, `kill -9` + `--resume` in
test_resume_kill.py, checkpoint / run-dir / --weights faults in test_engine_train.py, the web service in
test_serve.py. This file adds what those do not cover.
"""

from __future__ import annotations

import ast
import csv
import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import scipy.io
import torch
from PIL import Image, ImageFile
from typer.testing import CliRunner

from carspotter.cli import build_app
from carspotter.config import ExperimentConfig, apply_overrides, dump_config
from carspotter.data.images import ImageError, decode
from carspotter.data.manifest import read_manifest
from carspotter.data.prepare import prepare
from carspotter.engine import checkpoint as ck
from carspotter.engine.train import fit
from carspotter.models.factory import WeightsError, load_backbone_weights
from carspotter.utils import atomic_path, atomic_write_bytes, atomic_write_json
from conftest import TINY_OVERRIDES
from test_data_layouts import NAMES, cell_array, jpeg, make_devkit, make_kaggle, struct_array
from test_data_prepare import bomb_png

SRC = Path(__file__).resolve().parents[1] / "src" / "carspotter"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TINY = {**TINY_OVERRIDES, "epochs": 1}


def tiny_cfg(**overrides: object) -> ExperimentConfig:
    return apply_overrides(ExperimentConfig(), {**TINY, **overrides})


def cli(*args: str | Path):
    return CliRunner().invoke(build_app(), [str(a) for a in args])


def digest(root: Path) -> dict[str, tuple[str, int]]:
    """Content hash and mtime of every file under `root`: 'untouched' means both are unchanged."""
    return {
        str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


class Evil:
    """Unpickling this runs a shell command that creates `marker`: what a malicious checkpoint does."""

    marker = ""

    def __reduce__(self):
        return (os.system, (f"touch {Evil.marker}",))


# ---------------------------------------------------------------- data: entries that cannot be read at all
def test_unreadable_entries_are_reported_by_name_and_good_ones_kept(tmp_path: Path) -> None:
    """Entries named like photos that no one can open (root included) are reported, never silently dropped."""
    src = tmp_path / "src"
    for c in "AB":
        for i in range(3):
            jpeg(src / "train" / c / f"{i}.jpg", colour=i)
    d = src / "train" / "A"
    os.symlink("no-such-photo.jpg", d / "dangling.jpg")
    os.symlink("loop.jpg", d / "loop.jpg")
    (d / "folder.jpg").mkdir()
    os.mkfifo(d / "fifo.jpg")  # opening it would block forever
    expected = {
        "dangling.jpg": "No such file or directory",
        "loop.jpg": "Too many levels of symbolic links",
        "folder.jpg": "is a directory",
        "fifo.jpg": "not a regular file",
    }
    if os.geteuid() != 0:  # root reads a mode-000 file anyway: this case only means something for users
        jpeg(d / "no_permission.jpg")
        (d / "no_permission.jpg").chmod(0)
        expected["no_permission.jpg"] = "Permission denied"

    s = prepare(src, tmp_path / "out", val_fraction=0, workers=2)
    skipped = {Path(x["file"]).name: x for x in s["skipped"]}
    assert set(skipped) == set(expected)
    for name, detail in expected.items():
        assert skipped[name]["reason"] == "unreadable", skipped[name]
        assert name in skipped[name]["detail"] and detail in skipped[name]["detail"], skipped[name]
    assert s["n_images"] == 6 and len(read_manifest(tmp_path / "out")) == 6
    assert s["skipped_by_reason"] == {"unreadable": len(expected)}


def test_pillow_bomb_guard_stays_on(tmp_path: Path) -> None:
    """Importing every module that decodes photos leaves Pillow's guards at their safe defaults."""
    import carspotter.data.dataset
    import carspotter.retrieval.embed
    import carspotter.serve.app
    import carspotter.serve.uploads  # noqa: F401

    assert Image.MAX_IMAGE_PIXELS == 1024 * 1024 * 1024 // 4 // 3  # Pillow's default, ~89 Mpx
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    bomb_png(tmp_path / "bomb.png", side=30000)
    t0 = time.perf_counter()
    with pytest.raises(ImageError, match=r"bomb\.png: too many pixels \(decompression bomb\)"):
        decode(tmp_path / "bomb.png")
    assert time.perf_counter() - t0 < 1  # refused from the header: 900 Mpx are never allocated


# ---------------------------------------------------------------- data: wrong or missing annotation files
def _manifest_without_class(src: Path) -> Path:
    jpeg(src / "a.jpg")
    (src / "photos.csv").write_text("path,colour\na.jpg,red\n")
    return src / "photos.csv"


def _manifest_row_without_class(src: Path) -> Path:
    jpeg(src / "a.jpg")
    jpeg(src / "b.jpg")
    (src / "manifest.csv").write_text("path,class_name\na.jpg,Audi\nb.jpg,\n")
    return src


def _kaggle_bad_row(src: Path) -> Path:
    make_kaggle(src)
    (src / "anno_train.csv").write_text("00001.jpg,8,8,40,1\n")  # 5 fields: the class is missing
    return src


def _devkit_meta_wrong_variable(src: Path) -> Path:
    make_devkit(src)
    scipy.io.savemat(src / "devkit" / "cars_meta.mat", {"names": cell_array(NAMES)})
    return src


def _devkit_annos_missing(src: Path) -> Path:
    make_devkit(src)
    (src / "devkit" / "cars_train_annos.mat").unlink()
    return src


def _cars_annos_wrong_fields(src: Path) -> Path:
    jpeg(src / "car_ims" / "000001.jpg")
    rows = [{"fname": "car_ims/000001.jpg", "bbox_x1": 1, "bbox_y1": 1, "bbox_x2": 9, "bbox_y2": 9}]
    scipy.io.savemat(
        src / "cars_annos.mat", {"annotations": struct_array(rows), "class_names": cell_array(NAMES)}
    )
    return src


def _cars_annos_not_a_mat(src: Path) -> Path:
    jpeg(src / "car_ims" / "000001.jpg")
    (src / "cars_annos.mat").write_text("<html>404 Not Found</html>")
    return src


# name: (build the source, --layout, text the error must contain)
ANNOTATION_FAULTS: dict[str, tuple[Callable[[Path], Path], str, str]] = {
    "source missing": (lambda src: src / "nowhere", "auto", "nowhere: does not exist"),
    "manifest CSV without a class column": (
        _manifest_without_class, "auto", "photos.csv: not a manifest CSV: its header ['path', 'colour'] lacks a class",
    ),
    "manifest CSV row without a class": (_manifest_row_without_class, "auto", "manifest.csv line 3: no class"),
    "Kaggle anno_train.csv row of 5 fields": (_kaggle_bad_row, "auto", "anno_train.csv line 1: expected"),
    "Kaggle names.csv missing": (
        lambda src: make_kaggle(src, with_names=False), "auto", "names.csv not found",
    ),
    "devkit cars_meta.mat without class_names": (
        _devkit_meta_wrong_variable, "auto", "cars_meta.mat: no variable 'class_names'",
    ),
    "devkit cars_train_annos.mat missing": (
        _devkit_annos_missing, "devkit", "devkit/cars_train_annos.mat not found",
    ),
    "cars_annos.mat without relative_im_path": (
        _cars_annos_wrong_fields, "auto", "cars_annos.mat: 'annotations' has no field(s) ['relative_im_path'",
    ),
    "cars_annos.mat that is not a .mat file": (
        _cars_annos_not_a_mat, "cars-annos", "cars_annos.mat: not a readable MATLAB .mat file",
    ),
}  # fmt: skip


@pytest.mark.parametrize("fault", list(ANNOTATION_FAULTS))
def test_wrong_or_missing_annotation_file_is_named(tmp_path: Path, fault: str) -> None:
    build, layout, message = ANNOTATION_FAULTS[fault]
    target = build(tmp_path / "src")
    out = tmp_path / "out"
    r = cli("data", "prepare", target, "--out", out, "--layout", layout, "--workers", "1")
    assert r.exit_code == 2, r.output
    assert "error:" in r.output and message in r.output, r.output
    assert "Traceback" not in r.output
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# ---------------------------------------------------------------- training: run dirs and checkpoints
def test_run_dir_is_never_touched_without_resume_or_overwrite(tiny_prepared: Path, tmp_path: Path) -> None:
    cfg_file = tmp_path / "tiny.yaml"
    dump_config(tiny_cfg(), cfg_file)
    run = tmp_path / "run"
    train = ("train", "--config", cfg_file, "--data", tiny_prepared, "--out", run, "--no-progress")
    r = cli(*train)
    assert r.exit_code == 0, r.output
    before = digest(run)
    assert {"config.yaml", "model.json", "best.safetensors", "last.pt", "metrics.csv"} <= set(before)

    r = cli(*train)
    assert r.exit_code == 2, r.output
    assert "already exists" in r.output and "--resume" in r.output and "--overwrite" in r.output
    assert digest(run) == before  # not one byte rewritten, not even a timestamp

    r = cli(*train, "--resume", "--epochs", "2")  # continues the same run
    assert r.exit_code == 0, r.output
    with open(run / "metrics.csv", newline="") as f:
        assert [row["epoch"] for row in csv.DictReader(f)] == ["1", "2"]
    r = cli(*train, "--overwrite", "--seed", "5")  # replaces it
    assert r.exit_code == 0, r.output
    assert ck.read_run_config(run).train.seed == 5
    assert ck.load_state(run / ck.LAST)["epoch"] == 1


_SAVER = """
import sys, torch
from carspotter.engine.checkpoint import load_state, save_state
path = sys.argv[1]
state = load_state(path)
state["pad"] = torch.ones(48_000_000, dtype=torch.uint8)  # 48 MB: the write takes a while
for i in range(1000):
    print(f"writing {i}", flush=True)
    save_state(path, state)
"""


def test_checkpoint_write_killed_midway_keeps_last_loadable(tiny_prepared: Path, tmp_path: Path) -> None:
    """SIGKILL a process while it rewrites last.pt: last.pt still loads, and --resume cleans up and finishes."""
    run = tmp_path / "run"
    fit(tiny_cfg(epochs=1), tiny_prepared, run, progress=False)
    keys = ck.load_state(run / ck.LAST)["model"].keys()
    mid_write = 0
    for _ in range(3):
        proc = subprocess.Popen(
            [sys.executable, "-c", _SAVER, str(run / ck.LAST)], stdout=subprocess.PIPE, env=ENV, text=True
        )
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline().startswith("writing 0")  # state loaded, first write started
            deadline = time.time() + 60
            while time.time() < deadline:  # kill once the temp file has some bytes in it
                temps = list(run.glob(".last.pt.*.tmp"))
                if any(p.exists() and p.stat().st_size > 0 for p in temps):
                    break
                time.sleep(0.001)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        mid_write += bool(list(run.glob(".last.pt.*.tmp")))  # a temp left behind: it died mid-write
        state = ck.load_state(run / ck.LAST)  # complete: the old file or a fully written new one
        assert state["epoch"] == 1 and state["model"].keys() == keys
    print(f"\nkilled 3 writers of a 48 MB last.pt, {mid_write} of them mid-write; last.pt loaded every time")
    assert mid_write >= 1  # the fault really was injected mid-write at least once
    s = fit(tiny_cfg(epochs=2), tiny_prepared, run, resume=True, progress=False)
    assert s["epochs_completed"] == 2
    assert not list(run.glob(".*.tmp"))  # the resumed run removed the dead writer's temp files


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077], ids=oct)
def test_atomic_writes_get_normal_permissions(tmp_path: Path, umask: int) -> None:
    """Atomic writes go through a private 0600 temp file; the final file gets what open() would give it."""
    old = os.umask(umask)
    try:
        (tmp_path / "plain.txt").write_text("x")
        want = (tmp_path / "plain.txt").stat().st_mode & 0o777
        assert want == 0o666 & ~umask
        atomic_write_bytes(tmp_path / "a.bin", b"abc")
        atomic_write_json(tmp_path / "b.json", {"a": 1})
        with atomic_path(tmp_path / "c.pt") as tmp:
            torch.save({"w": torch.zeros(2)}, tmp)
        ck.save_weights(torch.nn.Linear(2, 2), tmp_path / "d.safetensors")
        (tmp_path / "e.txt").write_text("old")
        (tmp_path / "e.txt").chmod(0o600)
        atomic_write_bytes(tmp_path / "e.txt", b"new")  # replacing a file: a new file, normal mode
        for name in ("a.bin", "b.json", "c.pt", "d.safetensors", "e.txt"):
            assert (tmp_path / name).stat().st_mode & 0o777 == want, (name, oct(want))
    finally:
        os.umask(old)
    assert (tmp_path / "e.txt").read_bytes() == b"new"
    assert not list(tmp_path.glob(".*.tmp"))


# ---------------------------------------------------------------- loading: no pickled code ever runs
def test_malicious_pickle_in_a_run_dir_is_refused(tiny_prepared: Path, tmp_path: Path) -> None:
    Evil.marker = str(tmp_path / "pwned")
    run = tmp_path / "run"
    fit(tiny_cfg(), tiny_prepared, run, progress=False)
    torch.save({"epoch": Evil(), "model": {}}, run / ck.LAST)  # a poisoned resumable state
    r = cli("train", "--out", run, "--data", tiny_prepared, "--resume", "--epochs", "2", "--no-progress")
    assert r.exit_code == 2, r.output
    assert "last.pt: cannot load resumable state" in r.output and "Traceback" not in r.output

    torch.save({"classifier.weight": Evil()}, run / ck.BEST)  # a pickle disguised as safetensors
    r = cli("evaluate", run, "--device", "cpu")
    assert r.exit_code == 2, r.output
    assert "best.safetensors: not readable safetensors" in r.output
    assert not Path(Evil.marker).exists()


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin", ".ckpt", ".safetensors"])
def test_malicious_weights_file_is_refused_whatever_its_name(tmp_path: Path, suffix: str) -> None:
    Evil.marker = str(tmp_path / "pwned")
    path = tmp_path / f"evil{suffix}"
    torch.save({"state_dict": {"weight": Evil()}}, path)
    with pytest.raises(WeightsError, match=f"evil{suffix}: (refused to load|not a readable safetensors)"):
        load_backbone_weights(torch.nn.Linear(2, 2), path)
    assert not Path(Evil.marker).exists()


def test_source_never_unpickles() -> None:
    """Every torch.load passes weights_only=True; nothing imports pickle-based loaders or lets numpy unpickle."""
    loads, offenders = 0, []
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            where = f"{path.relative_to(SRC)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Import | ast.ImportFrom):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                if any(
                    m.split(".")[0] in ("pickle", "cPickle", "dill", "cloudpickle", "joblib") for m in mods
                ):
                    offenders.append(f"{where}: imports {mods}")
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            kw = {k.arg: k.value for k in node.keywords}
            target = ast.unparse(node.func)
            if target == "torch.load":
                loads += 1
                ok = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                if not ok:
                    offenders.append(f"{where}: torch.load without weights_only=True")
            if target in ("np.load", "numpy.load") and "allow_pickle" in kw:
                offenders.append(f"{where}: np.load(allow_pickle=...)")
            if target.endswith("pd.read_pickle") or target == "torch.jit.load":
                offenders.append(f"{where}: {target}")
    assert offenders == []
    assert loads >= 2  # checkpoint.load_state and factory's --weights reader


# ---------------------------------------------------------------- service: safe default interface
def test_serve_binds_loopback_by_default_and_warns_otherwise(
    tiny_prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import uvicorn

    run = tmp_path / "run"
    fit(tiny_cfg(), tiny_prepared, run, progress=False)
    bound: list[str] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, host, **kw: bound.append(host))  # record, do not serve
    r = cli("serve", run)
    assert r.exit_code == 0, r.output
    assert bound == ["127.0.0.1"] and "warning" not in r.output
    r = cli("serve", run, "--host", "0.0.0.0")
    assert r.exit_code == 0, r.output
    assert bound[-1] == "0.0.0.0" and "warning: binding 0.0.0.0 makes the service reachable" in r.output
