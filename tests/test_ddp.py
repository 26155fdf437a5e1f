"""Data-parallel training: 2 CPU processes (gloo) equal one process with the same global batch.

Designed so equality must hold: SGD, no dropout, no augmentation, no BatchNorm, fp32, and N divisible by the
global batch. DistributedSampler's permutation does not depend on the world size, so rank r's k-th batch is
every other sample of the single process's k-th batch, and DDP's gradient mean equals the big batch's mean.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from carspotter.config import ExperimentConfig, apply_overrides, dump_config
from carspotter.data.manifest import read_manifest, write_manifest
from carspotter.engine import checkpoint as ck
from carspotter.engine.distributed import DistInfo, gather_by_index
from carspotter.engine.evaluate import evaluate_run
from carspotter.engine.train import fit
from conftest import make_tiny_prepared

CFG = {
    "model.arch": "scratch_cnn",
    "model.channels": [8, 16],
    "model.hidden_dim": 32,
    "pretrained": False,
    "img_size": 32,
    "epochs": 2,
    "device": "cpu",
    "optim.name": "sgd",
    "optim.lr": 0.05,
    "optim.momentum": 0.9,
    "schedule.name": "none",
    "train.amp": False,
    "train.channels_last": False,
}


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_gather_drops_padding_duplicates():
    # DistributedSampler(7 items, 2 ranks, no shuffle): rank 0 gets 0,2,4,6 and rank 1 gets 1,3,5,0 (padding)
    parts = {"index": np.array([0, 2, 4, 6, 1, 3, 5, 0]), "label": np.array([0, 2, 4, 6, 1, 3, 5, 0]) * 10}
    out = gather_by_index(parts, DistInfo())
    assert out["index"].tolist() == list(range(7))
    assert out["label"].tolist() == [i * 10 for i in range(7)]


@pytest.mark.slow
def test_two_process_ddp_equals_one_process(tmp_path):
    data = make_tiny_prepared(tmp_path / "data", n_classes=4, per_class=8)  # 16 train
    recs = read_manifest(data)
    first_val = next(i for i, r in enumerate(recs) if r.split == "val")
    recs[first_val] = dataclasses.replace(recs[first_val], split="test")
    write_manifest(data, recs)  # 7 val images: the 2-rank val shard is padded with a duplicate
    cfg = apply_overrides(ExperimentConfig(), CFG)
    cfg_file = tmp_path / "cfg.yaml"
    dump_config(cfg, cfg_file)

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = fit(apply_overrides(cfg, {"batch_size": 8}), data, tmp_path / "single", progress=False)
    finally:
        torch.set_num_threads(n)

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "carspotter", "train", "--config", str(cfg_file), "--data", str(data),
           "--out", str(tmp_path / "ddp"), "--batch-size", "4", "--nproc", "2", "--no-progress"]  # fmt: skip
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    digests = dict(re.findall(r"rank (\d)/2: final weights sha256 ([0-9a-f]{64})", res.stdout))
    assert set(digests) == {"0", "1"} and digests["0"] == digests["1"], res.stdout

    a = torch.load(tmp_path / "single" / ck.LAST, weights_only=True)["model"]
    b = torch.load(tmp_path / "ddp" / ck.LAST, weights_only=True)["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
    assert single["weights_sha256"] != ""

    ra, rb = rows(tmp_path / "single" / "metrics.csv"), rows(tmp_path / "ddp" / "metrics.csv")
    for x, y in zip(ra, rb, strict=True):
        assert float(x["train_loss"]) == pytest.approx(float(y["train_loss"]), rel=1e-4)
        assert float(x["val_loss"]) == pytest.approx(float(y["val_loss"]), rel=1e-4)  # 7 images, not 8
        assert x["val_accuracy"] == y["val_accuracy"]

    ma = evaluate_run(tmp_path / "single", device="cpu")
    mb = evaluate_run(tmp_path / "ddp", device="cpu")
    assert ma["n_images"] == mb["n_images"] == 9
    assert ma["accuracy"] == mb["accuracy"] and ma["loss"] == pytest.approx(mb["loss"], rel=1e-4)
    ea, _ = ck.load_run(tmp_path / "single")
    eb, _ = ck.load_run(tmp_path / "ddp")
    x = torch.randn(5, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(ea.embed(x), eb.embed(x), rtol=1e-4, atol=1e-5)
