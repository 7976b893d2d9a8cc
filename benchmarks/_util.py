"""Small helpers shared by the benchmark scripts: thread pinning, timing, machine info, tables.

Import order matters for ``limit_threads``: call it BEFORE numpy / scipy / jax are imported,
because their thread pools are sized when they load.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

THREAD_ENV_VARS = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
)

# Amazon Beauty in the shared data folder beside the repository (read there, never copied)
BEAUTY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data",
                      "amazon-beauty", "Beauty.txt")

# Restricts XLA:CPU's Eigen pool for dense ops; a single core is enforced by CPU affinity, which
# every thread of the process inherits (the equivalent of running under `taskset -c CPU`).
XLA_SINGLE_THREAD_FLAGS = "--xla_cpu_multi_thread_eigen=false"


def limit_threads(cpu: int | None = 0, xla: bool = True) -> None:
    """One thread per library and (if ``cpu`` is not None) pin the process to core ``cpu``."""
    for var in THREAD_ENV_VARS:
        os.environ[var] = "1"
    if xla:
        flags = os.environ.get("XLA_FLAGS", "")
        if XLA_SINGLE_THREAD_FLAGS not in flags:
            os.environ["XLA_FLAGS"] = (flags + " " + XLA_SINGLE_THREAD_FLAGS).strip()
    if cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {int(cpu)})


def allowed_cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []


def num_threads() -> int:
    """Threads of this process right now (Linux), -1 if unknown."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return -1


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict:
    info = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model(),
        "allowed_cpus": allowed_cpus(),
        "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "thread_env": {v: os.environ.get(v) for v in THREAD_ENV_VARS if os.environ.get(v)},
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
    }
    for mod in ("numpy", "scipy", "jax", "jaxlib"):
        m = sys.modules.get(mod)
        if m is not None:
            info[mod] = getattr(m, "__version__", "?")
    return info


def machine_line(info: dict) -> str:
    vers = ", ".join(f"{k} {info[k]}" for k in ("numpy", "scipy", "jax") if k in info)
    load = info.get("loadavg")
    load_s = f"; loadavg {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}" if load else ""
    return (
        f"{info['date_utc']}; nproc {info['nproc']} ({info['cpu_model']}); "
        f"process CPUs {info['allowed_cpus']}; {vers}{load_s}"
    )


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


class Timer:
    """``with Timer() as t: ...`` then ``t.s``."""

    def __enter__(self):
        self._t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.s = time.perf_counter() - self._t
        return False


def summarize(times: list[float]) -> dict:
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "count": len(times),
    }


def fmt_s(x: float | None) -> str:
    if x is None:
        return "-"
    if x >= 100:
        return f"{x:.0f}"
    if x >= 1:
        return f"{x:.2f}"
    if x >= 1e-3:
        return f"{x * 1e3:.1f} ms"
    return f"{x * 1e6:.0f} us"


def fmt_int(x: int) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            v = x / div
            return f"{v:.3g}{unit}"
    return str(x)


def load_data(path: str, fmt: str | None = None, **kwargs):
    """``sevo_jax.data.load_dataset`` of ``path`` (its format detected unless ``fmt``); a
    missing or malformed file ends the benchmark with the loader's one-line message."""
    from sevo_jax import data

    try:
        return data.load_dataset(fmt or data.detect_format(path), path, **kwargs)
    except data.DataError as e:
        raise SystemExit(f"{os.path.basename(sys.argv[0]).removesuffix('.py')}: {e}") from None


def model_data(path: str | None, smoke: bool, seq_len: tuple[int, int] = (5, 12),
               maxlen: int = 10) -> tuple:
    """``(data set, TrainConfig source fields)`` of a model benchmark: a tiny synthetic set and
    tiny sizes (``smoke``), or the file ``path`` in its detected format. Imports sevo_jax: call
    it after ``limit_threads``."""
    from sevo_jax import data

    if smoke:
        return (data.synthetic(num_users=60, num_items=80, seq_len=seq_len, seed=0),
                dict(maxlen=maxlen, batch_size=16, features=16))
    ds = load_data(path)
    return ds, dict(data=path, format=data.detect_format(path))


def unpacked(config):
    """``config`` (a ``training.TrainConfig``) with its batches unpacked: ``pack_rows=False``
    where the model packs rows, unchanged where it has no such option (GRU4Rec, MF-BPR)."""
    import dataclasses

    return config if config.pack_rows is None else dataclasses.replace(config, pack_rows=False)


def undonated_train_step(loss_fn, tx):
    """The trainer's step (``training.make_train_step``) without its buffer donation, so that
    every timed call can reuse the same params and state; not jitted."""
    import jax
    import optax

    def train_step(params, state, batch, key):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch, key)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    return train_step


def markdown_table(headers: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def write_json(path: str | None, payload: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(payload, f, indent=2, default=str)
