"""``benchmarks/bench_vs_pytorch.py --smoke``: our PyTorch re-implementation of the reference
(MTandHJ/SEvo) agrees with sevo_jax on graph, psi, losses, gradients, optimizer updates,
training steps and ranking metrics, and the side-by-side timings come out. Skipped without torch
(a benchmark-only extra: ``pip install 'sevo_jax[bench]'``)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import helpers

pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_vs_pytorch.py"

# Bounds on the max abs differences (float32 on both sides), stated here independently of the
# script's own tolerances. Gradients relative to each leaf's largest entry (also at each of
# three training steps, from our parameters); optimizer updates in units of the learning rate.
BOUNDS = {
    "graph_weights": 1e-6,
    "psi_vs_torch": 1e-5,
    "psi_vs_scipy": 1e-5,
    "loss": 1e-5,
    "grad_rel": 1e-4,
    "update_same_grads_lr": 1e-3,
    "train_loss": 1e-4,
    "train_step_grad_rel": 1e-4,
    "metrics": 2e-3,
    "rank_mismatch_fraction": 5e-3,
    "max_rank_difference": 1,
}
MODELS = ("sasrec", "gru4rec")
OPTIMIZERS = ("adamw", "sevo-adamw")
CHECKS = (["graph_weights", "psi_vs_torch", "psi_vs_scipy"]
          + [f"{m}_{k}" for m in MODELS
             for k in ("loss", "grad_rel", "metrics", "rank_mismatch_fraction",
                       "max_rank_difference")]
          + [f"{m}_{o}_{k}" for m in MODELS for o in OPTIMIZERS
             for k in ("update_same_grads_lr", "train_loss", "train_step_grad_rel")])


def bound(name: str) -> float:
    return next(v for k, v in BOUNDS.items() if name == k or name.endswith("_" + k))


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("vs_pytorch") / "smoke.json"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    cmd = [sys.executable, str(SCRIPT), "--smoke", "--json", str(out),
           "--cpu", str(helpers.worker_cpu())]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("name", CHECKS)
def test_agrees_with_the_pytorch_reference(smoke, name):
    value = smoke["agreement"]["checked"][name]["value"]
    assert value <= bound(name), f"{name}: max abs difference {value:.3g} > {bound(name):g}"


def test_ranking_metrics_are_those_of_the_same_model(smoke):
    for m in MODELS:
        ours, theirs = smoke["agreement"]["info"][f"{m}_valid_ndcg10_ours_torch"]
        assert 0 < ours == pytest.approx(theirs, abs=1e-6)


def test_side_by_side_timings(smoke):
    ratios = [r["cpu"]["ratio"] for r in smoke["train"].values()]
    ratios += [smoke["psi"][k]["cpu"]["ratio"] for k in ("vs_torch", "vs_scipy")]
    ratios += [r["cpu"]["ratio"] for r in smoke["eval"].values()]
    assert sorted(smoke["train"]) == sorted(f"{m} {o}" for m in MODELS for o in OPTIMIZERS)
    assert len(ratios) == 8 and all(math.isfinite(r) and r > 0 for r in ratios)


def test_gpu_steps_script_checks_agreement_then_times(tmp_path):
    """``bench_gpu_steps.py`` (made for the GPU machine) on this machine's CPU: the first
    dropout-free steps of both sides agree, then both sides are timed."""
    out = tmp_path / "steps.json"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gpu_steps.py"),
                           "--smoke", "--models", "sasrec", "--device", "cpu", "--json", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    for optimizer in OPTIMIZERS:
        row = result[f"sasrec {optimizer}"]
        assert row["agreement"]["loss_rel"] < 1e-5 and row["agreement"]["table_rel"] < 1e-5
        assert math.isfinite(row["ratio"]) and row["ours_s"] > 0 and row["torch_s"] > 0
    assert "| sasrec sevo-adamw |" in proc.stdout
