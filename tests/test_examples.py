"""The example scripts run end to end (one epoch on a small synthetic set) and print metrics."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "script,optimizer",
    [("examples/sasrec.py", "sevo-adamw"), ("examples/gru4rec.py", "sevo-adamw"),
     ("examples/sasrec.py", "adamw")],
)
def test_example_runs(script, optimizer):
    cmd = [sys.executable, script, "--epochs", "1", "--num-users", "200", "--optimizer", optimizer]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "epoch   1  loss" in proc.stdout
    assert "NDCG@10" in proc.stdout and "HR@10" in proc.stdout


def test_reproduce_paper_grid_resumes_and_summarises(tmp_path):
    base = [sys.executable, "examples/reproduce_paper.py", "--models", "sasrec", "--optimizers",
            "adamw", "sevo-adamw", "--out", str(tmp_path)]
    run = lambda *extra: subprocess.run(base + list(extra), cwd=ROOT, capture_output=True,  # noqa: E731
                                        text=True, timeout=600)
    first = run("--seeds", "0", "--epochs", "1")
    assert first.returncode == 0, first.stderr[-3000:]
    summary = (tmp_path / "summary.md").read_text()
    assert "| sasrec | adamw | 1 |" in summary and "| sasrec | sevo-adamw | 1 |" in summary
    assert "sevo-train --model sasrec --optimizer sevo-adamw --seed 0" in summary
    results = json.loads((tmp_path / "sasrec-adamw-s0" / "results.json").read_text())
    assert results["train_seconds"] > 0  # summed from metrics.jsonl, so it survives resumes
    # summary of a partly finished grid: seed 1 has not run, nothing is trained
    partial = run("--seeds", "0", "1", "--summary-only")
    assert partial.returncode == 0, partial.stderr[-3000:]
    assert "| sasrec | adamw | 1 |" in partial.stdout
    assert not (tmp_path / "sasrec-adamw-s1").exists()
    nothing = run("--summary-only", "--out", str(tmp_path / "missing"))
    assert nothing.returncode == 2 and "no finished runs" in nothing.stderr
    assert "Traceback" not in nothing.stderr
