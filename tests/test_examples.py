"""The numbered examples run as a user runs them, in a fresh interpreter from the repository root.

On the CPU: 02 prints the plan, the resource report and CUDA source and writes the full sources; 09 prints its
table of top-k recall by rank; the GPU examples, with the GPU hidden, explain that they need one, still show the
plan, and exit 0. With a GPU (marker `gpu`): 01, 03, 04, 05, 06 and 08 run for real and pass their own checks
against the reference, SDPA and dense attention (06, the transformers integration, when transformers is installed);
07 (context parallelism) runs under torchrun on several GPUs, by hand."""

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
EXAMPLES = ROOT / "examples"


def run(script: str, *args: str, hide_gpu: bool = False, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    if hide_gpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_every_example_says_what_it_shows_and_how_to_run_it():
    scripts = sorted(p.name for p in EXAMPLES.glob("*.py"))
    assert scripts[:4] == [
        "01_declare_and_run.py",
        "02_inspect_emitted_cuda.py",
        "03_runtime_masks.py",
        "04_train_tiny_lm.py",
    ]
    for name in scripts:
        text = (EXAMPLES / name).read_text()
        assert text.startswith('"""') and f"python examples/{name}" in text.split('"""')[1], name


@pytest.mark.slow
def test_inspect_emitted_cuda_prints_plan_resources_and_source():
    result = run("02_inspect_emitted_cuda.py")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "KernelPlan for causal() & sliding_window(1024) | global_tokens(16)" in out
    for entry in ("attngen_fwd", "attngen_bwd_preprocess", "attngen_bwd_dkdv", "attngen_bwd_dq"):
        assert re.search(rf"^{entry}: registers: \d+, shared_bytes: \d+, spill_stores: \d+", out, re.M), entry
    assert "// attngen forward kernel" in out and "compiles standalone with NVRTC" in out
    assert 'attngen emit "causal() & sliding_window(1024) | global_tokens(16)" --head-dim 64' in out
    written = [Path(line) for line in out.splitlines() if line.endswith(".cu") and Path(line).is_absolute()]
    assert [p.name for p in written] == ["forward.cu", "backward.cu"]
    try:
        assert 'extern "C" __global__' in written[0].read_text()
        assert "attngen_fwd" in written[0].read_text() and "attngen_bwd_dq" in written[1].read_text()
    finally:
        shutil.rmtree(written[0].parent)


@pytest.mark.slow
def test_topk_recall_prints_recall_by_rank():
    result = run("09_topk_recall.py")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "exact: causal() & topk(32)   predicted: causal() & topk(32, scorer=lowrank())" in out
    assert re.search(r"^exact q·k +1\.000 +0\.\d{3}$", out, re.M)
    recall = {int(r): float(x) for r, x in re.findall(r"^lowrank, r = (\d+) +([0-9.]+) +[0-9.]+$", out, re.M)}
    (chance,) = re.findall(r"^32 random earlier keys +([0-9.]+) +\1$", out, re.M)
    assert list(recall) == [4, 8, 16, 32, 64]
    assert float(chance) < recall[4] < recall[8] < recall[16] < recall[32] < recall[64] < 1  # seeded: grows with r


@pytest.mark.slow
@pytest.mark.parametrize(
    "script, shows",
    [
        ("01_declare_and_run.py", "KernelPlan for causal() & sliding_window(1024) | global_tokens(16)"),
        ("03_runtime_masks.py", "KernelPlan for documents() & causal() & key_padding()"),
        ("04_train_tiny_lm.py", "04_train_tiny_lm needs a CUDA GPU to train"),
        ("05_train_nm_attention.py", "05_train_nm_attention needs a CUDA GPU to train"),
        pytest.param(
            "06_transformers.py",
            "layer 1: causal() & documents() & nm(2, 4)",
            marks=pytest.mark.skipif(not HAS_TRANSFORMERS, reason="needs transformers"),
        ),
        ("07_context_parallel.py", "rank 3: 9 blocks, keys from ranks (0, 1, 2)"),
        ("08_train_lsh_attention.py", "08_train_lsh_attention needs a CUDA GPU to train"),
    ],
)
def test_gpu_examples_explain_themselves_without_a_gpu(script, shows):
    result = run(script, hide_gpu=True)
    assert result.returncode == 0, result.stderr
    assert re.search(r"needs (a CUDA GPU|one)", result.stdout)
    assert shows in result.stdout


@pytest.mark.parametrize(
    "script, args, expect",
    [
        ("01_declare_and_run.py", (), r"relative error [0-9.e+-]+ \(tolerance"),
        ("03_runtime_masks.py", (), r"all checks passed"),
        (
            "04_train_tiny_lm.py",
            ("--steps", "60"),
            r"over 60 steps: [0-9.]+ .*\nPASS: attngen causal tracks SDPA causal",
        ),
        (
            "05_train_nm_attention.py",
            ("--steps", "60", "--finetune", "20", "--tolerance", "0.3"),
            r"fine-tuned \(evaluation batches\): [+-][0-9.]+ .*\nPASS: 2:4 attention trains",
        ),
        pytest.param(
            "06_transformers.py",
            (),
            r"PASS: attngen runs the model as SDPA does",
            marks=pytest.mark.skipif(not HAS_TRANSFORMERS, reason="needs transformers"),
        ),
        (
            "08_train_lsh_attention.py",
            ("--steps", "60"),
            r"\(at least [0-9.]+\)\nPASS: all three attentions train",
        ),
    ],
    ids=["01", "03", "04", "05", "06", "08"],
)
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_example_runs_and_passes_its_checks(script, args, expect):
    result = run(script, *args)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert re.search(expect, result.stdout), result.stdout[-4000:]
