"""The SEvo smoothing transform psi, as an Optax ``GradientTransformation``.

psi replaces an embedding table's update ``X`` (n x d) by a graph-smoothed one (spec §2), with
``Ã = D^-1/2 A D^-1/2`` and ``beta`` in [0, 1), ``L`` sparse matmuls::

    neumann   : psi(X) = (1-beta)/(1-beta^(L+1)) * sum_{l=0..L} beta^l Ã^l X      (SEvo)
    nsa       : psi(X) = (1-beta) * sum_{l=0..L} beta^l Ã^l X                      (no rescaling)
    iterative : Y_0 = X,  Y_l = beta Ã Y_{l-1} + (1-beta) X,  psi(X) = Y_L          (Theorem 1)

All three are the recursion ``Y_l = a X + beta Ã Y_{l-1}`` (``Y_0 = X``) followed by a scale
``c``: neumann ``a = 1, c = (1-beta)/(1-beta^(L+1))``; nsa ``a = 1, c = 1-beta``; iterative
``a = 1-beta, c = 1``. Each tends to ``psi*(X) = (1-beta)(I - beta Ã)^-1 X`` as L grows
(iterative only for small beta).
"""

from __future__ import annotations

import sys
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.sparse as sp
from jax.experimental import sparse as jsparse

from sevo_jax import graph as graph_lib

__all__ = [
    "APPROXIMATIONS",
    "NormalizedGraph",
    "SEvoSmoothState",
    "as_normalized_graph",
    "propagate",
    "sevo_smooth",
    "smoothness",
]

APPROXIMATIONS = ("neumann", "iterative", "nsa")

MaskOrFn = Any  # a pytree of bools matching (a prefix of) the params, or a callable returning one


@jax.tree_util.register_pytree_with_keys_class
class NormalizedGraph:
    """``Ã = D^-1/2 A D^-1/2`` in COO form (rows sorted): a pytree of two arrays.

    ``indices`` is (nnz, 2) int32 ``(row, col)``; ``weights`` is (nnz,) float32. They are pytree
    leaves so that ``jax.jit`` receives them as arguments: a graph closed over as a constant is
    baked into the compiled program (at 1M nodes / 20M edges: 7.6 s of compilation against
    0.2 s as an argument; BENCHMARKS.md).
    """

    def __init__(self, indices: jax.Array, weights: jax.Array, num_nodes: int):
        self.indices = indices
        self.weights = weights
        self.num_nodes = int(num_nodes)

    def tree_flatten_with_keys(self):
        keys = (jax.tree_util.GetAttrKey("indices"), jax.tree_util.GetAttrKey("weights"))
        return tuple(zip(keys, (self.indices, self.weights))), self.num_nodes

    @classmethod
    def tree_unflatten(cls, num_nodes, children):
        return cls(*children, num_nodes)

    @property
    def nnz(self) -> int:
        return int(self.weights.shape[0])

    def __repr__(self) -> str:
        return f"NormalizedGraph(num_nodes={self.num_nodes}, nnz={self.nnz})"

    @classmethod
    def from_scipy(cls, normalized: sp.spmatrix) -> "NormalizedGraph":
        """Wrap an already-normalised scipy matrix (use ``as_normalized_graph`` for raw ones)."""
        csr = sp.csr_matrix(normalized)  # canonical CSR is already sorted by (row, col)
        csr.sum_duplicates()
        rows = graph_lib.csr_row_ids(csr)
        indices = np.stack([rows, csr.indices.astype(rows.dtype)], axis=1)
        return cls(jnp.asarray(indices), jnp.asarray(csr.data.astype(np.float32)), csr.shape[0])

    def to_scipy(self) -> sp.csr_matrix:
        idx = np.asarray(self.indices)
        data = np.asarray(self.weights, np.float64)
        return sp.csr_matrix((data, (idx[:, 0], idx[:, 1])), shape=(self.num_nodes,) * 2)

    def matmul(self, x: jax.Array, impl: str | None = None) -> jax.Array:
        """``Ã @ x`` for ``x`` of shape (num_nodes, d), accumulated in ``x.dtype``.

        ``impl``: one of ``MATMUL_IMPLS`` (see ``sparse_matmul``); None picks by backend.
        """
        return sparse_matmul(self.indices, self.weights, x, self.num_nodes, impl)


MATMUL_IMPLS = ("chunked", "segment_sum", "bcoo")
MATMUL_CHUNK = 16384


def default_matmul_impl() -> str:
    """``"chunked"`` on CPU, ``"segment_sum"`` elsewhere (measured: BENCHMARKS.md)."""
    return "chunked" if jax.default_backend() == "cpu" else "segment_sum"


def _check_impl(impl: str | None) -> None:
    if impl is not None and impl not in MATMUL_IMPLS:
        raise ValueError(f"impl must be one of {MATMUL_IMPLS} or None, got {impl!r}")


def sparse_matmul(indices: jax.Array, weights: jax.Array, x: jax.Array, num_rows: int,
                  impl: str | None = None, chunk: int | None = None) -> jax.Array:
    """``S @ x`` for the (num_rows x x.shape[0]) sparse ``S`` given by row-sorted COO
    ``indices`` (nnz, 2) and ``weights`` (nnz,), in ``x.dtype``. Three formulations:

    * ``"segment_sum"``: gather every ``x[col]``, scale, sorted segment sum (one parallel
      pass; the GPU default);
    * ``"chunked"``: the same products walked ``chunk`` non-zeros at a time in a
      ``fori_loop``, so the (nnz, d) message buffer never exists, only a cache-sized one
      (the CPU default: 0.4-0.6x scipy's CSR time from 4M non-zeros up, BENCHMARKS.md);
    * ``"bcoo"``: ``jax.experimental.sparse.BCOO @ x``.

    Entries whose row is out of range (``>= num_rows``: sharding's padding) are dropped.
    ``chunk`` defaults to ``MATMUL_CHUNK``.
    """
    _check_impl(impl)
    impl = default_matmul_impl() if impl is None else impl
    chunk = MATMUL_CHUNK if chunk is None else int(chunk)
    w = weights.astype(x.dtype)
    rows, cols = indices[:, 0], indices[:, 1]
    nnz = w.shape[0]
    if impl == "bcoo":
        a = jsparse.BCOO((w, indices), shape=(num_rows, x.shape[0]), indices_sorted=True)
        return a @ x
    if impl == "segment_sum" or nnz <= chunk:
        return jax.ops.segment_sum(w[:, None] * x[cols], rows, num_segments=num_rows,
                                   indices_are_sorted=True)
    num_chunks = -(-nnz // chunk)
    pad = num_chunks * chunk - nnz
    # pad with copies of the last entry at weight 0, so rows stay sorted within every chunk
    rows, cols, w = (jnp.pad(v, (0, pad), mode="edge").reshape(num_chunks, chunk)
                     for v in (rows, cols, w))
    w = w.at[-1, chunk - pad:].set(0)

    def body(i, out):
        return out.at[rows[i]].add(w[i][:, None] * x[cols[i]], indices_are_sorted=True, mode="drop")

    # the first chunk seeds the carry, so it has the loop's type (also under shard_map)
    return jax.lax.fori_loop(1, num_chunks, body, body(0, jnp.zeros((num_rows, x.shape[1]), x.dtype)))


flax.serialization.register_serialization_state(
    NormalizedGraph,
    lambda g: {"indices": g.indices, "weights": g.weights},
    lambda g, d: NormalizedGraph(d["indices"], d["weights"], g.num_nodes),
)


def as_normalized_graph(adjacency: Any) -> NormalizedGraph:
    """Validate a RAW symmetric adjacency and normalise it once.

    Accepts a scipy sparse matrix/array, a dense numpy array, a
    ``jax.experimental.sparse.BCOO``, or a ``NormalizedGraph`` (returned unchanged: it is
    already normalised).
    """
    if isinstance(adjacency, NormalizedGraph):
        return adjacency
    return NormalizedGraph.from_scipy(normalized_scipy(adjacency))


def normalized_scipy(adjacency: Any) -> sp.csr_matrix:
    """``as_normalized_graph`` on the host: the normalised matrix as scipy CSR, nothing on device.

    Used by ``sevo_jax.sharding`` so that a million-node graph is never put whole on one device.
    """
    if isinstance(adjacency, NormalizedGraph):
        return adjacency.to_scipy()
    if isinstance(adjacency, jsparse.BCOO):
        if adjacency.n_batch or adjacency.n_dense or adjacency.ndim != 2:
            raise ValueError(
                f"adjacency must be a 2-D BCOO matrix without batch/dense dims, got {adjacency}"
            )
        idx = np.asarray(adjacency.indices)
        adjacency = sp.coo_matrix(
            (np.asarray(adjacency.data, np.float64), (idx[:, 0], idx[:, 1])),
            shape=adjacency.shape,
        )
    elif isinstance(adjacency, (np.ndarray, jax.Array)):
        arr = np.asarray(adjacency)
        if arr.ndim != 2 or arr.shape[0] != arr.shape[1]:
            raise ValueError(f"adjacency must be a square matrix, got shape {arr.shape}")
        adjacency = sp.csr_matrix(arr)
    elif not sp.issparse(adjacency):
        raise TypeError(
            "adjacency must be a scipy.sparse matrix, a numpy array, a "
            f"jax.experimental.sparse.BCOO or a NormalizedGraph, got {type(adjacency).__name__}"
        )
    return graph_lib.normalize(adjacency)


def _check_hyperparameters(beta: float, num_layers: int, approx: str) -> None:
    if isinstance(beta, bool) or not isinstance(beta, (int, float, np.floating, np.integer)):
        raise TypeError(f"beta must be a float in [0, 1), got {beta!r}")
    if not (0.0 <= float(beta) < 1.0):
        raise ValueError(f"beta must lie in [0, 1), got {beta!r}")
    if isinstance(num_layers, bool) or not isinstance(num_layers, (int, np.integer)):
        raise TypeError(f"num_layers must be a non-negative integer, got {num_layers!r}")
    if num_layers < 0:
        raise ValueError(f"num_layers must be a non-negative integer, got {num_layers!r}")
    if approx not in APPROXIMATIONS:
        raise ValueError(f"approx must be one of {APPROXIMATIONS}, got {approx!r}")


def propagate(
    graph: NormalizedGraph,
    x: jax.Array,
    beta: float = 0.99,
    num_layers: int = 3,
    approx: str = "neumann",
    *,
    impl: str | None = None,
) -> jax.Array:
    """psi(x): the L-layer approximation of ``(1-beta)(I - beta Ã)^-1 x`` (module docstring).

    Computes in at least float32 and returns ``x.dtype``. ``impl``: the sparse product, one of
    ``MATMUL_IMPLS`` (``sparse_matmul``); None picks by backend.
    """
    _check_hyperparameters(beta, num_layers, approx)
    _check_impl(impl)
    return _propagate(graph, jnp.asarray(x), float(beta), int(num_layers), approx, impl)


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5))
def _propagate(graph: NormalizedGraph, x: jax.Array, beta: float, num_layers: int, approx: str,
               impl: str | None):
    # jitted so that eager calls (diagnostics, notebooks) compile once per shape and setting
    compute_dtype = jnp.promote_types(x.dtype, jnp.float32)
    matmul = functools.partial(graph.matmul, impl=impl)
    return psi_recursion(matmul, x.astype(compute_dtype), beta, num_layers, approx).astype(x.dtype)


def psi_coefficients(beta: float, num_layers: int, approx: str) -> tuple[float, float]:
    """``(a, c)`` of the recursion ``Y_l = a X + beta Ã Y_{l-1}``, ``psi = c Y_L`` (module doc)."""
    beta = float(beta)
    if approx == "iterative":
        return 1.0 - beta, 1.0
    if approx == "nsa":
        return 1.0, 1.0 - beta
    return 1.0, (1.0 - beta) / (1.0 - beta ** (num_layers + 1))


def psi_recursion(
    matmul: Callable[[jax.Array], jax.Array],
    x: jax.Array,
    beta: float,
    num_layers: int,
    approx: str,
) -> jax.Array:
    """``c * Y_L`` with ``Y_0 = x``, ``Y_l = a x + beta matmul(Y_{l-1})``, in ``x.dtype``.

    Shared by ``propagate`` and the row-sharded ``sevo_jax.sharding.propagate_sharded`` so
    that both run the same arithmetic; ``matmul`` computes ``Ã @ y``.
    """
    a, c = psi_coefficients(beta, num_layers, approx)
    beta = float(beta)
    ax = x if a == 1.0 else a * x
    y = jax.lax.fori_loop(0, num_layers, lambda _, y: ax + beta * matmul(y), x)
    return c * y


class SEvoSmoothState(NamedTuple):
    """State of ``sevo_smooth``: the normalised graph, carried so jit receives it as an argument.

    ``update`` never changes it. With ``mesh=`` it is a ``sevo_jax.sharding.ShardedGraph``.
    """

    graph: Any  # NormalizedGraph, or sevo_jax.sharding.ShardedGraph when row-sharded


def _broadcast_mask(mask: MaskOrFn, tree: Any) -> list[bool]:
    """Flat list of bools, one per leaf of ``tree``; ``None`` selects every leaf."""
    leaves = jax.tree_util.tree_leaves(tree)
    if mask is None:
        return [True] * len(leaves)
    mask_tree = mask(tree) if callable(mask) else mask
    try:
        full = jax.tree_util.tree_map(
            lambda m, sub: jax.tree_util.tree_map(lambda _: m, sub), mask_tree, tree
        )
    except (ValueError, TypeError) as e:
        raise ValueError(
            f"mask must be a pytree of bools with the structure of the params (or a prefix of "
            f"it), or a callable returning one; it does not match: {e}"
        ) from None
    flags = jax.tree_util.tree_leaves(full)
    if any(not isinstance(f, (bool, np.bool_)) for f in flags):
        raise TypeError("mask leaves must be Python bools (static), got arrays or other values")
    return [bool(f) for f in flags]


def _leaf_paths(tree: Any) -> list[str]:
    return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _check_selection(tree: Any, flags: list[bool], num_nodes: int) -> None:
    """Raise if the selected leaves cannot be stacked into a (num_nodes, d) signal."""
    leaves = jax.tree_util.tree_leaves(tree)
    paths = _leaf_paths(tree)
    chosen = [(p, leaf) for p, leaf, f in zip(paths, leaves, flags) if f]
    if not chosen:
        raise ValueError("mask selects no parameter; SEvo needs at least one embedding table")
    for p, leaf in chosen:
        if jnp.ndim(leaf) != 2:
            raise ValueError(
                f"mask selects {p or 'the params'} of shape {jnp.shape(leaf)}; SEvo smooths "
                "2-D embedding tables (rows = graph nodes)"
            )
    widths = {jnp.shape(leaf)[1] for _, leaf in chosen}
    if len(widths) > 1:
        raise ValueError(
            f"masked tables must share their embedding width to be stacked, got widths {sorted(widths)}"
        )
    rows = sum(jnp.shape(leaf)[0] for _, leaf in chosen)
    if rows != num_nodes:
        names = ", ".join(f"{p or 'params'} ({jnp.shape(leaf)[0]} rows)" for p, leaf in chosen)
        raise ValueError(
            f"adjacency has {num_nodes} nodes but the masked tables stack to {rows} rows "
            f"[{names}]; the graph must have one node per stacked row, in pytree-flatten order"
        )


def smooth_selected(
    updates: Any,
    flags: list[bool],
    graph: NormalizedGraph,
    beta: float,
    num_layers: int,
    approx: str,
    impl: str | None = None,
) -> Any:
    """Stack the flagged leaves row-wise, apply psi once, split back (other leaves untouched)."""
    leaves, treedef = jax.tree_util.tree_flatten(updates)
    chosen = [leaf for leaf, f in zip(leaves, flags) if f]
    dtype = jnp.result_type(*chosen)
    signal = chosen[0] if len(chosen) == 1 else jnp.concatenate([c.astype(dtype) for c in chosen])
    smoothed = propagate(graph, signal, beta, num_layers, approx, impl=impl)
    splits = np.cumsum([c.shape[0] for c in chosen])[:-1]
    pieces = iter(jnp.split(smoothed, splits) if len(chosen) > 1 else [smoothed])
    out = [next(pieces).astype(leaf.dtype) if f else leaf for leaf, f in zip(leaves, flags)]
    return jax.tree_util.tree_unflatten(treedef, out)


def sevo_smooth(
    adjacency: Any,
    beta: float = 0.99,
    num_layers: int = 3,
    *,
    approx: str = "neumann",
    mask: MaskOrFn | None = None,
    mesh: jax.sharding.Mesh | None = None,
    axis_name: str | None = None,
    impl: str | None = None,
) -> optax.GradientTransformation:
    """Structure-aware embedding evolution: replace the masked tables' update ``X`` by psi(X).

    ``psi`` is the module docstring's approximation of ``(1-beta)(I - beta Ã)^-1 X`` with
    ``Ã = D^-1/2 A D^-1/2``. The masked leaves (2-D tables of equal width) are stacked row-wise in
    pytree-flatten order, smoothed as one signal and split back, so one graph can span several
    tables (users then items on a user-item graph). Unmasked leaves pass through unchanged.
    The update keeps its dtype; the matmuls run in at least float32.

    Args:
      adjacency: the RAW symmetric non-negative adjacency (scipy sparse, numpy array, BCOO, or
        a ``NormalizedGraph``); it is validated and normalised once, here. A
        ``sevo_jax.sharding.ShardedGraph`` selects the row-sharded path on its own mesh.
      beta: smoothing strength in [0, 1); 0 is the identity.
      num_layers: number L >= 0 of sparse matmuls; 0 is the identity for ``neumann``.
      approx: ``"neumann"`` (SEvo), ``"iterative"`` or ``"nsa"``.
      mask: Optax-style pytree of bools (or a callable of the params returning one) choosing
        the tables to smooth; None selects every leaf.
      mesh, axis_name: row-shard psi over the mesh axis ``axis_name`` of a
        ``jax.sharding.Mesh`` (``sevo_jax.sharding``): the graph's rows and the tables' rows are
        split across that axis and the L matmuls run under ``jax.shard_map``; each smoothed
        table leaves row-sharded (``NamedSharding(mesh, P(axis_name, None))``) when its row
        count divides the axis size. None (the default) runs psi unsharded.
      impl: the sparse product (``sparse_matmul``): ``"chunked"``, ``"segment_sum"`` or
        ``"bcoo"``; None (the default) picks by backend (chunked on CPU, segment_sum on GPU).

    Returns:
      An ``optax.GradientTransformation`` whose state only carries the normalised graph (a
      ``sevo_jax.sharding.ShardedGraph`` when ``mesh`` is given, built at ``init`` from the
      masked tables' row counts).
    """
    _check_hyperparameters(beta, num_layers, approx)
    _check_impl(impl)
    # a ShardedGraph can only exist once sevo_jax.sharding (which imports this module) is loaded
    sharding_module = sys.modules.get("sevo_jax.sharding")
    prebuilt = sharding_module is not None and isinstance(adjacency, sharding_module.ShardedGraph)
    if mesh is not None or axis_name is not None or prebuilt:
        from sevo_jax import sharding as sharding_lib

        return sharding_lib.sharded_sevo_smooth(
            adjacency, beta, num_layers, approx=approx, mask=mask, mesh=mesh, axis_name=axis_name,
            impl=impl,
        )
    graph = as_normalized_graph(adjacency)

    def init_fn(params):
        _check_selection(params, _broadcast_mask(mask, params), graph.num_nodes)
        return SEvoSmoothState(graph=graph)

    def update_fn(updates, state, params=None):
        del params
        flags = _broadcast_mask(mask, updates)
        _check_selection(updates, flags, state.graph.num_nodes)
        return smooth_selected(updates, flags, state.graph, beta, num_layers, approx, impl), state

    return optax.GradientTransformation(init_fn, update_fn)


def smoothness(x: jax.Array, adjacency: Any) -> jax.Array:
    """``J(X) = trace(X^T (I - Ã) X)``, the graph smoothness of a signal (lower = smoother).

    Equals ``1/2 sum_ij w_ij ||x_i/sqrt(d_i) - x_j/sqrt(d_j)||^2`` plus ``||x_i||^2`` for each
    isolated node. ``adjacency`` is raw (normalised here) or a ``NormalizedGraph``.
    """
    graph = as_normalized_graph(adjacency)
    x = jnp.asarray(x)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2 or x.shape[0] != graph.num_nodes:
        raise ValueError(
            f"x must have one row per graph node ({graph.num_nodes}), got shape {x.shape}"
        )
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    return jnp.sum(x * x) - jnp.sum(x * graph.matmul(x))
