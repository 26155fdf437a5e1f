"""Every benchmark script still runs: its `--smoke` mode exits 0 and prints its ratio line.

No timing is asserted (CI machines are shared and noisy); the point is that the scripts do not rot as the
library they measure changes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
OURS = ["embed_throughput.py", "loader_vs_step.py", "gpu_train_throughput.py"]
# Other benchmark scripts join the smoke test as soon as they grow a --smoke mode.
OTHERS = sorted(
    p.name
    for p in BENCH.glob("*.py")
    if p.name not in OURS and p.name != "benchutil.py" and "--smoke" in p.read_text(encoding="utf-8")
)


@pytest.mark.parametrize("script", OURS + OTHERS)
def test_benchmark_smoke_runs(script: str, tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "2", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), "--smoke"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=env,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "ratio" in proc.stdout.lower(), proc.stdout[-3000:]
    if script in OURS:
        assert any(line.startswith("RATIO ") for line in proc.stdout.splitlines()), proc.stdout[-3000:]
