"""An XLA:CPU workaround that ``import sevo_jax`` turns on before JAX creates its CPU backend.

jaxlib 0.10's XLA:CPU hands some fused reductions to YNNPACK (the ``REDUCE`` entry of the
default list of ``--xla_cpu_experimental_ynn_fusion_type``), and some of those return wrong
sums: the gradient of a dropout-free SASRec on one Beauty sequence padded to a batch of 64 rows
differs by 5% of its largest entry from the same gradient at 128 rows, which agrees with
float64 autodiff (``tests/test_xla_workarounds.py``; BENCHMARKS.md "XLA:CPU's YNN reductions").
Every explicit list of fusion types (even an empty one) or ``-REDUCE`` gives the float64 values,
and the training steps take the same time without REDUCE (0.96-1.00x).

So ``XLA_FLAGS`` gets ``--xla_cpu_experimental_ynn_fusion_type=-REDUCE``, unless it already
names that option, or ``SEVO_JAX_KEEP_XLA_FLAGS=1`` is set, or jaxlib is not 0.10.x (another
version may lack the option, and XLA aborts on an unknown flag). A CPU backend that already
exists keeps its options: import sevo_jax before running JAX code (a warning says so).
"""

from __future__ import annotations

import os
import warnings

__all__ = ["YNN_FLAG", "disable_ynn_reductions"]

YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type=-REDUCE"
_OPTION = "xla_cpu_experimental_ynn_fusion_type"


def disable_ynn_reductions(environ: dict | None = None, jaxlib_version: str | None = None) -> bool:
    """Add ``YNN_FLAG`` to ``environ["XLA_FLAGS"]`` (default ``os.environ``) where it applies
    (module docstring); True if it was added.

    Examples:
      >>> env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
      >>> disable_ynn_reductions(env, "0.10.2"), env["XLA_FLAGS"].split()[-1] == YNN_FLAG
      (True, True)
      >>> disable_ynn_reductions({"XLA_FLAGS": ""}, "0.11.0")
      False
    """
    env = os.environ if environ is None else environ
    if jaxlib_version is None:
        import jaxlib

        jaxlib_version = jaxlib.__version__
    flags = env.get("XLA_FLAGS", "")
    if (not jaxlib_version.startswith("0.10.") or _OPTION in flags
            or env.get("SEVO_JAX_KEEP_XLA_FLAGS") == "1"):
        return False
    if environ is None and _cpu_backend_exists():
        warnings.warn("sevo_jax was imported after JAX created its CPU backend, so XLA:CPU keeps "
                      f"its YNN reductions, which can give wrong gradients (set XLA_FLAGS="
                      f"{YNN_FLAG} or import sevo_jax first)", RuntimeWarning, stacklevel=3)
        return False
    env["XLA_FLAGS"] = f"{flags} {YNN_FLAG}".strip()
    return True


def _cpu_backend_exists() -> bool:
    try:
        from jax._src import xla_bridge
    except ImportError:  # pragma: no cover - a JAX without this module: assume not yet
        return False
    return bool(xla_bridge.backends_are_initialized())
