"""The analysis notebooks in notebooks/ run end to end with their default settings.

Each notebook is executed headless (nbclient, kernel "python3", cwd = notebooks/) on a copy in
memory, so the committed notebooks and their saved outputs are never overwritten. Any cell
error fails the test. The notebooks read ../shared/data beside the repository; without it the
tests skip with a message.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
NOTEBOOK_FILES = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
CELL_TIMEOUT_S = 600
MAX_FILE_BYTES = 1_500_000


def _data_dir() -> Path | None:
    """The folder notebooks/_helpers.data_dir() resolves: $SEVO_DATA or ../shared/data."""
    if os.environ.get("SEVO_DATA"):
        candidate = Path(os.environ["SEVO_DATA"])
    else:
        candidate = ROOT.parent / "shared" / "data"
    return candidate if (candidate / "ml-100k").is_dir() else None


needs_data = pytest.mark.skipif(
    _data_dir() is None,
    reason=f"real data not found: expected {ROOT.parent / 'shared' / 'data'}/ml-100k (or $SEVO_DATA)",
)


def _kernel_name() -> str:
    """'python3', installing ipykernel's spec for the current interpreter if none resolves.

    jupyter_client runs a spec whose argv starts with 'python' with sys.executable, so the
    kernel uses this interpreter (and this sevo_jax install) either way.
    """
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        KernelSpecManager().get_kernel_spec("python3")
    except NoSuchKernel:
        from ipykernel.kernelspec import install

        install(user=True)
    return "python3"


def test_notebooks_exist():
    names = [p.name for p in NOTEBOOK_FILES]
    assert names == ["01_convergence.ipynb", "02_smoothness.ipynb", "03_category_prior.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOK_FILES, ids=lambda p: p.stem)
def test_committed_notebook_carries_outputs(path):
    """Saved with outputs and plots, no errors, small, opening and closing with prose."""
    import nbformat

    assert path.stat().st_size < MAX_FILE_BYTES, f"{path.name} is {path.stat().st_size} bytes"
    nb = nbformat.read(path, as_version=4)
    assert nb.cells[0].cell_type == "markdown" and nb.cells[-1].cell_type == "markdown"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.get("execution_count") for c in code), "some code cells were not executed"
    outputs = [o for c in code for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 2, "expected saved plots"


@needs_data
@pytest.mark.parametrize("path", NOTEBOOK_FILES, ids=lambda p: p.stem)
def test_notebook_executes(path):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)  # executed in memory; the file is not rewritten
    client = NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name=_kernel_name(),
        resources={"metadata": {"path": str(NOTEBOOKS)}},  # cwd = notebooks/
    )
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError on any failing cell
    seconds = time.perf_counter() - start
    print(f"{path.name}: executed in {seconds:.1f} s", file=sys.__stdout__)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors


@needs_data
def test_helper_runner_reproduces_fit(tmp_path, monkeypatch):
    """The notebooks' shared training loop (notebooks/_helpers.Runner) gives fit's numbers."""
    import numpy as np

    monkeypatch.syspath_prepend(str(NOTEBOOKS))
    monkeypatch.chdir(NOTEBOOKS)
    import _helpers as H
    from sevo_jax import training

    ds = H.load_ml100k()
    config = H.small_config(epochs=2, eval_every=1, out=str(tmp_path))
    training.fit(config, dataset=ds, log=lambda s: None)
    expected = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    runner = H.Runner(config, ds)
    got = runner.train(runner.optimizer(), 2, eval_every=1)["history"]
    for e, g in zip(expected, got, strict=True):
        assert e["epoch"] == g["epoch"]
        np.testing.assert_allclose(g["loss"], e["loss"], rtol=1e-5)
        for key, value in e["valid"].items():
            np.testing.assert_allclose(g["valid"][key], value, rtol=1e-4, atol=1e-6)
