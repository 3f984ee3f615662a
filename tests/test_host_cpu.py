"""bench/host_cpu.py without a GPU: it times attngen's call path on CPU tensors (real kernels compiled by NVRTC,
launches through a stand-in driver), and puts everything it replaced back."""

import os
import subprocess
import sys
from pathlib import Path

from attngen import bind, driver, launch

ROOT = Path(__file__).resolve().parents[1]


def test_times_the_python_path_and_profiles_it():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "host_cpu.py"), "--calls", "3", "--patterns", "causal", "--profile"],
        capture_output=True, text=True, timeout=600, env=env, cwd=ROOT,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    row = next(line for line in run.stdout.splitlines() if line.split()[:1] == ["causal"])
    forward, both = map(float, row.split()[1:3])
    assert 0 < forward < both  # the backward adds its own launches
    assert "driver.py" in run.stdout and "launch" in run.stdout  # the profile of the call path


def test_the_stand_ins_are_put_back():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import host_cpu
    finally:
        sys.path.remove(str(ROOT / "bench"))
    before = (driver.lib, launch._require_cuda, bind.launch)
    with host_cpu.cpu_launches():
        assert driver.lib is not before[0] and bind.launch is not before[2]
    assert (driver.lib, launch._require_cuda, bind.launch) == before
