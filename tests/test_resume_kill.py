"""`kill -9` a real `carspotter train` mid-epoch, then `--resume`: it ends where an uninterrupted run ends.

The subprocess runs on a pseudo-terminal so it draws its tqdm progress bar; the test kills it when the bar
shows epoch 2 part-way done, whatever the machine's speed.
"""

from __future__ import annotations

import csv
import fcntl
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_prepared

# One thread: on a shared 2-core machine, two OpenMP threads per process can be 10× slower, not faster.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def train_cmd(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "carspotter", "train", "--preset", "seed-s3-cnn-aug", "--data", str(data),
        "--out", str(out), "--epochs", "3", "--img-size", "48", "--batch-size", "1", "--device", "cpu",
        "--set", "model.channels=[16,32]", "--set", "model.hidden_dim=32", "--set", "model.dropout=0.2",
        *extra,
    ]  # fmt: skip


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def kill_mid_epoch(cmd: list[str], epoch: int, timeout: float = 180) -> str:
    """Run `cmd` on a pty; SIGKILL it once its progress bar shows `epoch` between 5 % and 90 %."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # tqdm needs a width
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=ENV)
    os.close(slave)
    seen, deadline = "", time.time() + timeout
    try:
        while time.time() < deadline:
            if select.select([master], [], [], 0.2)[0]:
                try:
                    seen += os.read(master, 65536).decode(errors="replace")
                except OSError:  # the child closed the pty: it exited
                    break
            pcts = [int(p) for p in re.findall(rf"epoch {epoch}:\s+(\d+)%", seen)]
            if pcts and 5 <= pcts[-1] <= 90:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return seen
            if proc.poll() is not None:
                break
        raise AssertionError(f"never saw epoch {epoch} in progress; output:\n{seen[-2000:]}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)


@pytest.mark.slow
def test_kill_9_mid_epoch_then_resume(tmp_path):
    data = make_tiny_prepared(tmp_path / "data", n_classes=4, per_class=48, size=48)  # 96 steps per epoch
    killed, whole = tmp_path / "killed", tmp_path / "whole"

    seen = kill_mid_epoch(train_cmd(data, killed), epoch=2)
    pct = re.findall(r"epoch 2:\s+(\d+)%", seen)[-1]
    assert len(rows(killed / "metrics.csv")) == 1
    assert torch.load(killed / "last.pt", weights_only=True)["epoch"] == 1

    subprocess.run(train_cmd(data, killed, "--resume"), check=True, capture_output=True, env=ENV)
    subprocess.run(train_cmd(data, whole), check=True, capture_output=True, env=ENV)

    a, b = rows(killed / "metrics.csv"), rows(whole / "metrics.csv")
    assert [r["epoch"] for r in a] == ["1", "2", "3"]
    for ra, rb in zip(a, b, strict=True):
        for col in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_f1_macro"):
            assert ra[col] == rb[col], (ra["epoch"], col)
    sa = torch.load(killed / "last.pt", weights_only=True)["model"]
    sb = torch.load(whole / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert (killed / "best.safetensors").read_bytes() == (whole / "best.safetensors").read_bytes()
    print(
        f"\nSIGKILL at epoch 2, {pct}% done; after --resume all {len(a)} epochs' metrics and the weights match"
    )
