"""psi, the SEvo smoothing of a table update, written once against ``GraphOperator``.

SEvo (Structure-aware Embedding Evolution, arXiv 2310.03032, spec §2) replaces an embedding
table's update ``X`` (n x d) by a graph-smoothed one, with ``Ã = D^-1/2 A D^-1/2``,
``beta`` in [0, 1) and ``L`` sparse products::

    neumann   : psi(X) = (1-beta)/(1-beta^(L+1)) * sum_{l=0..L} beta^l Ã^l X      (SEvo)
    nsa       : psi(X) = (1-beta) * sum_{l=0..L} beta^l Ã^l X                      (no rescaling)
    iterative : Y_0 = X,  Y_l = beta Ã Y_{l-1} + (1-beta) X,  psi(X) = Y_L          (Theorem 1)

All three are the recursion ``Y_l = a X + beta Ã Y_{l-1}`` (``Y_0 = X``) followed by a scale
``c``: neumann ``a = 1, c = (1-beta)/(1-beta^(L+1))``; nsa ``a = 1, c = 1-beta``; iterative
``a = 1-beta, c = 1``. As L grows, each tends to ``psi*(X) = (1-beta)(I - beta Ã)^-1 X`` for
every beta < 1 (the spectral radius of ``beta Ã`` is at most beta); the error shrinks like
``beta^(L+1)``, slowly for beta near 1 (iterative at beta 0.99: max error 0.18 at L = 3,
2.3e-7 at L = 50).

Non-finite rows. A row of ``X`` holding a NaN or an inf is kept out of the propagation (it
enters as zero) and gets its own non-finite value back, so finite rows stay finite: exactly
the rows plain AdamW would poison are poisoned, instead of every row within L hops.

``propagate`` is the only place psi is applied; ``GraphOperator.apply`` runs it on a local
``NormalizedGraph`` or, row-sharded, on a ``ShardedGraph``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sevo_jax.operator import GraphOperator, check_impl

__all__ = [
    "APPROXIMATIONS",
    "check_hyperparameters",
    "is_concrete",
    "propagate",
    "psi_coefficients",
    "psi_recursion",
]

APPROXIMATIONS = ("neumann", "iterative", "nsa")


def is_concrete(x: Any) -> bool:
    """True unless ``x`` is (or holds) a JAX tracer, i.e. its value is known now.

    Examples:
      >>> is_concrete(0.9), is_concrete(jnp.float32(0.9))
      (True, True)
      >>> jax.jit(lambda b: jnp.asarray(is_concrete(b)))(0.9)
      Array(False, dtype=bool)
    """
    return not any(isinstance(v, jax.core.Tracer) for v in jax.tree_util.tree_leaves(x))


def check_hyperparameters(beta: Any, num_layers: Any, approx: str) -> None:
    """Validate psi's settings: ``0 <= beta < 1``, integer ``num_layers >= 0``, a known ``approx``.

    Values are checked when concrete (Python numbers, numpy or JAX arrays known now); traced
    ones (``optax.inject_hyperparams`` under ``jax.jit``) here only by dtype, and out of range
    they make psi's result NaN (``smooth_finite_rows``).

    Examples:
      >>> check_hyperparameters(0.99, 3, "neumann")
      >>> check_hyperparameters(jnp.asarray(0.5), jnp.asarray(2), "nsa")   # arrays are fine
      >>> check_hyperparameters(1.0, 3, "neumann")
      Traceback (most recent call last):
      ...
      ValueError: beta must lie in [0, 1), got 1.0
    """
    if approx not in APPROXIMATIONS:
        raise ValueError(f"approx must be one of {APPROXIMATIONS}, got {approx!r}")
    for name, value, kinds in ((("beta", beta, (jnp.floating, jnp.integer)),
                                ("num_layers", num_layers, (jnp.integer,)))):
        if isinstance(value, (bool, str)):
            expected = "float in [0, 1)" if name == "beta" else "non-negative integer"
            raise TypeError(f"{name} must be a {expected}, got {value!r}")
        dtype = getattr(value, "dtype", None)
        if dtype is None:
            ok = isinstance(value, (int, np.integer)) or (
                name == "beta" and isinstance(value, (float, np.floating)))
        else:
            # issubdtype, not dtype.kind: numpy gives bfloat16 the kind "V"
            ok = any(jnp.issubdtype(dtype, k) for k in kinds) and jnp.ndim(value) == 0
        if not ok:
            expected = "a float in [0, 1)" if name == "beta" else "a non-negative integer"
            raise TypeError(f"{name} must be {expected}, got {value!r}")
    if is_concrete(beta) and not 0.0 <= float(beta) < 1.0:
        raise ValueError(f"beta must lie in [0, 1), got {beta!r}")
    if is_concrete(num_layers) and int(num_layers) < 0:
        raise ValueError(f"num_layers must be a non-negative integer, got {num_layers!r}")


def psi_coefficients(beta: Any, num_layers: Any, approx: str) -> tuple[Any, Any]:
    """``(a, c)`` of the recursion ``Y_l = a X + beta Ã Y_{l-1}``, ``psi = c Y_L`` (module doc).

    Python floats (in float64) for concrete settings, traced scalars otherwise.

    Examples:
      >>> psi_coefficients(0.5, 1, "neumann")    # (1 - 0.5) / (1 - 0.5^2)
      (1.0, 0.6666666666666666)
      >>> psi_coefficients(0.5, 1, "iterative")
      (0.5, 1.0)
    """
    if is_concrete((beta, num_layers)):
        beta, num_layers = float(beta), int(num_layers)
        if approx == "iterative":
            return 1.0 - beta, 1.0
        if approx == "nsa":
            return 1.0, 1.0 - beta
        return 1.0, (1.0 - beta) / (1.0 - beta ** (num_layers + 1))
    beta = jnp.asarray(beta).astype(jnp.promote_types(jnp.result_type(beta), jnp.float32))
    if approx == "iterative":
        return 1.0 - beta, 1.0
    if approx == "nsa":
        return 1.0, 1.0 - beta
    return 1.0, (1.0 - beta) / (1.0 - beta ** (jnp.asarray(num_layers) + 1).astype(beta.dtype))


def psi_recursion(
    matmul: Callable[[jax.Array], jax.Array],
    x: jax.Array,
    beta: Any,
    num_layers: Any,
    approx: str,
) -> jax.Array:
    """``c * Y_L`` with ``Y_0 = x``, ``Y_l = a x + beta matmul(Y_{l-1})``, in ``x.dtype``.

    ``matmul`` computes ``Ã @ y``; ``(a, c)`` from ``psi_coefficients``. ``num_layers`` may be
    traced (the loop then runs as a ``while_loop``).

    Examples:
      >>> psi_recursion(lambda y: y, jnp.ones((1, 1)), 0.5, 2, "neumann")  # Ã = I: identity
      Array([[1.]], dtype=float32)
    """
    a, c = psi_coefficients(beta, num_layers, approx)
    dtype = x.dtype
    ax = x if (isinstance(a, float) and a == 1.0) else (a * x).astype(dtype)
    b = float(beta) if is_concrete(beta) else jnp.asarray(beta).astype(dtype)
    y = jax.lax.fori_loop(0, num_layers, lambda _, y: (ax + b * matmul(y)).astype(dtype), x)
    return (c * y).astype(dtype)


def smooth_finite_rows(matmul: Callable[[jax.Array], jax.Array], x: jax.Array, beta: Any,
                       num_layers: Any, approx: str) -> jax.Array:
    """``psi`` of ``x`` with non-finite rows kept out and given back as they were (module doc).

    Traced settings outside their range (``beta`` not in [0, 1), ``num_layers < 0``) give an
    all-NaN result: they cannot raise under ``jax.jit``, and must not pass silently."""
    finite = jnp.all(jnp.isfinite(x), axis=1, keepdims=True)
    y = psi_recursion(matmul, jnp.where(finite, x, 0), beta, num_layers, approx)
    y = jnp.where(finite, y, x)
    if is_concrete((beta, num_layers)):  # checked by check_hyperparameters already
        return y
    in_range = (beta >= 0) & (beta < 1) & (jnp.asarray(num_layers) >= 0)
    return jnp.where(in_range, y, jnp.nan).astype(y.dtype)


def propagate(
    graph: GraphOperator,
    x: jax.Array | Sequence[jax.Array],
    beta: Any = 0.99,
    num_layers: Any = 3,
    approx: str = "neumann",
    *,
    impl: str | None = None,
) -> Any:
    """psi(x): the L-layer approximation of ``(1-beta)(I - beta Ã)^-1 x`` (module docstring).

    ``x`` is one (num_nodes, d) array, or a list of tables stacked row-wise on the graph's
    nodes (each output in its table's dtype). Computes in at least float32 (the graph's
    weights are float32: float64 tables get float32-rounded weights, ~1e-8 relative);
    non-finite rows are kept out of the propagation (module docstring). ``beta`` and
    ``num_layers`` may be traced.
    ``impl``: the sparse product (``sevo_jax.operator.sparse_matmul``); None picks by backend.

    Examples:
      >>> from sevo_jax.operator import as_normalized_graph
      >>> g = as_normalized_graph(np.array([[0.0, 1.0], [1.0, 0.0]]))
      >>> y = propagate(g, jnp.array([[1.0], [0.0]]), beta=0.5, num_layers=1)
      >>> np.asarray(y, float).round(4).tolist()
      [[0.6667], [0.3333]]
      >>> y = propagate(g, jnp.array([[jnp.nan], [1.0]]), beta=0.5, num_layers=1)
      >>> np.asarray(y, float).round(4).tolist()   # the NaN row stays in its row
      [[nan], [0.6667]]
    """
    check_hyperparameters(beta, num_layers, approx)
    check_impl(impl)
    if not isinstance(graph, GraphOperator):
        raise TypeError(f"propagate needs a graph operator (sevo_jax.as_normalized_graph of the "
                        f"adjacency), got {type(graph).__name__}")
    single = not isinstance(x, (list, tuple))
    tables = [jnp.asarray(x)] if single else [jnp.asarray(t) for t in x]
    if not tables:
        raise ValueError("propagate needs at least one table")
    for t in tables:
        if t.ndim != 2:
            raise ValueError(f"psi smooths 2-D tables (rows = graph nodes), got shape "
                             f"{t.shape}")
        if not jnp.issubdtype(t.dtype, jnp.inexact):
            raise TypeError(f"psi smooths float or complex tables, got {t.dtype} (an "
                            "integer or bool table would be rounded back after smoothing)")
    if is_concrete((beta, num_layers)):
        out = _propagate_static(graph, tables, float(beta), int(num_layers), approx, impl)
    else:
        out = _propagate(graph, tables, beta, num_layers, approx, impl)
    return out[0] if single else out


def _propagate(graph: GraphOperator, tables: list[jax.Array], beta: Any, num_layers: Any,
               approx: str, impl: str | None) -> list[jax.Array]:
    compute_dtype = jnp.promote_types(jnp.result_type(*tables), jnp.float32)
    tables_in = [t.astype(compute_dtype) for t in tables]
    if is_concrete((beta, num_layers)):
        fn = functools.partial(smooth_finite_rows, beta=beta, num_layers=num_layers, approx=approx)
        out = graph.apply(lambda matmul, x: fn(matmul, x), tables_in, impl=impl)
    else:  # traced settings enter as operands (a sharded operator passes them to shard_map)
        out = graph.apply(
            lambda matmul, x, b, n: smooth_finite_rows(matmul, x, b, n, approx), tables_in,
            impl=impl, operands=(jnp.asarray(beta), jnp.asarray(num_layers)))
    return [o.astype(t.dtype) for o, t in zip(out, tables, strict=True)]


# jitted with static settings so that eager calls (diagnostics, notebooks) compile once
_propagate_static = jax.jit(_propagate, static_argnums=(2, 3, 4, 5))
