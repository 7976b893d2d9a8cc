"""XLA:CPU flags that ``import sevo_jax`` sets before JAX creates its CPU backend: a workaround
for wrong reductions, and wide vectors on CPUs with AVX-512.

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

On a CPU with AVX-512 (``avx512f`` in ``/proc/cpuinfo``), ``XLA_FLAGS`` also gets
``--xla_cpu_prefer_vector_width=512`` (XLA:CPU's default is 256): psi's sparse products and
the GRU4Rec step are faster with it on an Intel Xeon, the SASRec step and evaluation the same
(BENCHMARKS.md "XLA:CPU's vector width"). Not where ``XLA_FLAGS`` already names the option,
``SEVO_JAX_KEEP_XLA_FLAGS=1`` is set, or the CPU backend exists already (a speed setting only:
no warning).
"""

from __future__ import annotations

import os
import warnings

__all__ = ["WIDE_VECTOR_FLAG", "YNN_FLAG", "disable_ynn_reductions", "prefer_wide_vectors"]

YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type=-REDUCE"
_OPTION = "xla_cpu_experimental_ynn_fusion_type"
WIDE_VECTOR_FLAG = "--xla_cpu_prefer_vector_width=512"
_WIDTH_OPTION = "xla_cpu_prefer_vector_width"


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


def prefer_wide_vectors(environ: dict | None = None, cpu_flags: str | None = None) -> bool:
    """Add ``WIDE_VECTOR_FLAG`` to ``environ["XLA_FLAGS"]`` (default ``os.environ``) on a CPU
    whose ``cpu_flags`` (default: ``/proc/cpuinfo``'s) include ``avx512f`` (module docstring);
    True if it was added.

    Examples:
      >>> env = {"XLA_FLAGS": YNN_FLAG}
      >>> prefer_wide_vectors(env, "fpu sse avx2 avx512f"), env["XLA_FLAGS"].split()[-1]
      (True, '--xla_cpu_prefer_vector_width=512')
      >>> prefer_wide_vectors({}, "fpu sse avx2")
      False
    """
    env = os.environ if environ is None else environ
    flags = env.get("XLA_FLAGS", "")
    if _WIDTH_OPTION in flags or env.get("SEVO_JAX_KEEP_XLA_FLAGS") == "1":
        return False
    if cpu_flags is None:
        cpu_flags = _cpuinfo_flags()
    if "avx512f" not in cpu_flags.split():
        return False
    if environ is None and _cpu_backend_exists():
        return False
    env["XLA_FLAGS"] = f"{flags} {WIDE_VECTOR_FLAG}".strip()
    return True


def _cpuinfo_flags() -> str:
    """The ``flags`` line of ``/proc/cpuinfo`` ("" where there is none, e.g. not Linux)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return line.partition(":")[2]
    except OSError:
        pass
    return ""


def _cpu_backend_exists() -> bool:
    try:
        from jax._src import xla_bridge
    except ImportError:  # pragma: no cover - a JAX without this module: assume not yet
        return False
    return bool(xla_bridge.backends_are_initialized())
