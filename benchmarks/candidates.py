"""Candidate sparse-matmul implementations measured by the benchmarks, NOT part of sevo_jax.

``chunked_matmul`` computes ``Ã @ x`` like ``NormalizedGraph.matmul(impl="segment_sum")`` (same
products, same row-sorted accumulation order) but walks the non-zeros in chunks of ``chunk``
inside a ``lax.fori_loop``: each step gathers ``chunk`` rows of ``x``, scales them and
scatter-adds them into the carried output. The (nnz, d) message buffer of the one-shot
implementations (5 GB at nnz = 20M, d = 64) is never materialised; only a (chunk, d) one is,
which stays in cache. On CPU this is what closes the gap to scipy (see BENCHMARKS.md); on GPU
the serial loop would waste parallelism, so it is a CPU candidate only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

DEFAULT_CHUNK = 16384


def chunked_matmul(graph, x: jax.Array, chunk: int = DEFAULT_CHUNK) -> jax.Array:
    """``Ã @ x`` for a ``sevo_jax.smoothing.NormalizedGraph``, ``chunk`` non-zeros at a time."""
    w = graph.weights.astype(x.dtype)
    nnz = w.shape[0]
    if nnz == 0:
        return jnp.zeros_like(x)
    chunk = max(1, min(int(chunk), nnz))
    num_chunks = -(-nnz // chunk)
    pad = num_chunks * chunk - nnz
    # padding entries point at (0, 0) with weight 0: they add exact zeros to row 0
    rows = jnp.pad(graph.indices[:, 0], (0, pad)).reshape(num_chunks, chunk)
    cols = jnp.pad(graph.indices[:, 1], (0, pad)).reshape(num_chunks, chunk)
    w = jnp.pad(w, (0, pad)).reshape(num_chunks, chunk)

    def body(i, out):
        return out.at[rows[i]].add(w[i][:, None] * x[cols[i]], indices_are_sorted=True)

    return jax.lax.fori_loop(0, num_chunks, body, jnp.zeros_like(x))


@jax.tree_util.register_pytree_node_class
class ForcedImpl:
    """Stand-in for a ``NormalizedGraph`` inside ``sevo_jax.smoothing.propagate`` whose ``matmul``
    uses a fixed implementation (``propagate`` has no ``impl`` argument; it calls
    ``graph.matmul(y)``, which picks by backend). A pytree (the graph is its child, ``impl``
    static), so it can cross ``jax.jit`` boundaries like the graph itself.

    ``impl``: ``"bcoo"``, ``"segment_sum"`` (the library's) or ``"chunked"`` / ``"chunked:N"``
    (``chunked_matmul`` with chunk N).
    """

    def __init__(self, graph, impl: str):
        self.graph, self.impl = graph, impl

    @property
    def num_nodes(self) -> int:
        return self.graph.num_nodes

    def tree_flatten(self):
        return (self.graph,), self.impl

    @classmethod
    def tree_unflatten(cls, impl, children):
        return cls(children[0], impl)

    def matmul(self, y, impl=None):
        impl = impl or self.impl
        if impl.startswith("chunked"):
            _, _, n = impl.partition(":")
            return chunked_matmul(self.graph, y, int(n) if n else DEFAULT_CHUNK)
        return self.graph.matmul(y, impl=impl)
