"""Benchmarks are scripts, not timed tests: CI runs each at tiny sizes and checks the VALUES it
computed where it computes any (the timings mean nothing at these sizes)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import helpers

ROOT = Path(__file__).resolve().parents[1]
# bench_vs_pytorch and bench_gpu_steps need torch (an optional extra):
# tests/test_bench_vs_pytorch.py runs them
NEED_TORCH = ("bench_vs_pytorch.py", "bench_gpu_steps.py")
SCRIPTS = sorted(p for p in (ROOT / "benchmarks").glob("bench_*.py") if p.name not in NEED_TORCH)


def numbers(tree, key_part):
    """Every number in a JSON tree under a key containing ``key_part``."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            if key_part in k and isinstance(v, (int, float)) and not isinstance(v, bool):
                yield v
            else:
                yield from numbers(v, key_part)
    elif isinstance(tree, list):
        for v in tree:
            yield from numbers(v, key_part)


# script stem -> (key naming an error, bound): errors of the benchmarked result against a
# reference the script computes independently
ERROR_BOUNDS = {
    "bench_smoothing": ("rel_err", 1e-5),                       # jax psi vs scipy's sparse psi
    "bench_closure_vs_argument": ("rel_err_vs_first", 1e-6),    # closure vs argument graph
    "bench_packed_rows": ("_diff", 1e-4),                       # packed vs unpacked batches
    "bench_host_memory": ("loss_diff", 1e-6),                   # the two malloc settings
    "bench_bert4rec_output": ("_diff", 1e-4),                   # fused vs autodiff output layer
}


def test_every_benchmark_is_listed():
    assert len(SCRIPTS) >= 6


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_smoke(script, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    text = script.read_text()
    writes_json = '"--json"' in text
    cmd = [sys.executable, str(script), "--smoke"]
    if '"--cpu"' in text:
        cmd += ["--cpu", str(helpers.worker_cpu())]
    if writes_json:
        cmd += ["--json", str(tmp_path / "out.json")]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]  # bench_sharding asserts sharded == unsharded
    assert "|" in out.stdout or "median" in out.stdout
    if not writes_json:
        return
    result = json.loads((tmp_path / "out.json").read_text())
    if script.stem in ERROR_BOUNDS:
        key, bound = ERROR_BOUNDS[script.stem]
        errors = list(numbers(result, key))
        assert errors and max(errors) < bound, (key, errors)
    seconds = [v for part in ("_s", "seconds", "times") for v in numbers(result, part)]
    assert all(math.isfinite(v) and v >= 0 for v in seconds), seconds
