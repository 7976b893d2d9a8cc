"""Shared test machinery: multi-device checks in a fresh process, and clean CLI failures.

Multi-device checks need ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` set before jax
is imported, which earlier test files already did in the pytest process. A test module that
needs devices therefore doubles as a script: its ``check_*`` functions run in ONE subprocess
(``run_checks``), which prints ``PASS name`` / ``FAIL name: ...``, and each pytest test asserts
on its own line (``assert_check_passed``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NUM_DEVICES = 8
DEVICE_FLAGS = f"--xla_force_host_platform_device_count={NUM_DEVICES}"


def worker_cpu() -> int:
    """The core a benchmark run by this test process pins itself to (``--cpu``): the
    pytest-xdist worker ``gwN`` takes the N-th core it may run on (modulo their number), so two
    workers' benchmarks do not share the default core 0."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [0]
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:]
    return cpus[(int(worker) if worker.isdigit() else 0) % len(cpus)]


def config_fields(model: str, fields: dict) -> dict:
    """``fields`` without those ``model`` does not read (``TrainConfig`` rejects them:
    ``training.unread_fields``, and ``maxlen`` where ``training.reads_maxlen`` says no), plus
    ``model``."""
    from sevo_jax import training

    unread = set(training.unread_fields(model))
    optimizer = fields.get("optimizer", training.TrainConfig.optimizer)
    if not training.reads_maxlen(model, fields.get("graph", "auto"), optimizer):
        unread.add("maxlen")
    return {**{k: v for k, v in fields.items() if k not in unread}, "model": model}


def collect_checks(namespace: dict) -> dict:
    """``{name: fn}`` for every ``check_name`` function of a module's globals."""
    return {k[len("check_"):]: fn for k, fn in list(namespace.items()) if k.startswith("check_")}


def script_main(checks: dict, names: list[str]) -> None:
    """Entry point of a test module run as a script: run the named checks, report each."""
    os.environ.setdefault("XLA_FLAGS", DEVICE_FLAGS)
    for name in names or list(checks):
        try:
            checks[name]()
        except Exception:  # report every check, keep going
            print(f"FAIL {name}: " + traceback.format_exc().replace("\n", "\n    "), flush=True)
        else:
            print(f"PASS {name}", flush=True)


def run_checks(script: str, checks: dict, extra_flags: str = "") -> subprocess.CompletedProcess:
    """Run ``script``'s checks in a fresh process with ``NUM_DEVICES`` fake CPU devices."""
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": pythonpath,
           "XLA_FLAGS": f"{DEVICE_FLAGS} {extra_flags}".strip()}
    return subprocess.run([sys.executable, str(Path(script).resolve()), *checks], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=600)


def assert_check_passed(proc: subprocess.CompletedProcess, name: str) -> None:
    out = proc.stdout
    lines = [line for line in out.splitlines() if line.startswith(("PASS ", "FAIL "))]
    mine = [line for line in lines if line.split(":")[0].split()[1] == name]
    assert mine, f"check {name} did not report (exit {proc.returncode}):\n{out}\n{proc.stderr[-3000:]}"
    start = out.index(mine[0])
    assert mine[0].startswith("PASS "), out[start:start + 4000]


def fails_cleanly(capsys, argv: list[str], needle: str) -> None:
    """``sevo-train argv`` exits non-zero with ONE stderr line containing ``needle``."""
    from sevo_jax.train import main

    try:
        code = main(argv)
    except SystemExit as e:  # argparse errors
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert needle in err, err
