"""The example scripts run end to end (one epoch on a small synthetic set) and print metrics."""

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
