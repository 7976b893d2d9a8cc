"""The normalised graph ``Ã = D^-1/2 A D^-1/2`` as a linear operator on embedding-table rows.

SEvo (Structure-aware Embedding Evolution, arXiv 2310.03032) smooths a table update ``X``
with products ``Ã @ Y``. This module defines what such a product needs, once:

* ``GraphOperator``: the interface psi (``sevo_jax.psi``) is written against: ``matmul``
  (``Ã @ y``), ``apply`` (run a row-wise function that may call ``matmul`` on the stacked
  tables, wherever the operator's rows live), ``num_nodes``, ``nnz`` and a host-side
  ``fingerprint``;
* ``NormalizedGraph``: the local operator, ``Ã`` in COO form on one device, and
  ``sparse_matmul``, its product. The row-sharded operator is
  ``sevo_jax.operator_sharded.ShardedGraph``.

State contract (why operators look the way they do). ``jax.jit`` must receive the graph as an
ARGUMENT (a graph closed over becomes an HLO constant: compile 2.06 s vs 0.21 s at 300k nodes /
6M non-zeros, BENCHMARKS.md), so the operator's device arrays are pytree leaves that travel in
the optimizer state. The authoritative copy of the graph stays on the HOST, in the operator's
static (aux) data, together with its ``fingerprint``; the leaves are a device CACHE of it:

* ``fresh()`` uploads NEW device arrays (``init`` calls it), so donating a state never deletes
  a buffer another state or optimizer still uses;
* a ``tag`` leaf (an int32 derived from the fingerprint, never 0 or 1) marks an intact cache;
  ``repaired()`` checks the leaves' shapes and dtypes at trace time, and the tag and one
  stored weight at run time, and, on a mismatch (a ``jax.tree.map(jnp.zeros_like, state)``
  reset, a reset of the float leaves only, an ``optax.tree.cast``, a restore into
  placeholders), re-uploads the graph from the host through ``jax.pure_callback``
  inside ``lax.cond``: an intact cache never embeds the graph as a constant, a broken one is
  repaired in the returned state, so only one step pays the upload.
* ``flax.serialization`` writes an operator as its fingerprint only, and restoring keeps the
  template's arrays (after checking the fingerprints agree): checkpoints need not carry the
  graph. ``isinstance(x, GraphOperator)`` finds graph subtrees for other checkpointers.
"""

from __future__ import annotations

import abc
import hashlib
import weakref
import zlib
from collections.abc import Callable, Hashable, Sequence
from typing import Any, TypeVar

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp
from jax import lax
from jax.experimental import sparse as jsparse

from sevo_jax import graph as graph_lib

__all__ = [
    "MATMUL_BLOCK",
    "MATMUL_CHUNK",
    "MATMUL_IMPLS",
    "MAX_CHUNK_BLOCKS",
    "GraphOperator",
    "NormalizedGraph",
    "as_normalized_graph",
    "blocked_coo",
    "cache_tag",
    "check_fingerprint",
    "check_impl",
    "check_layout",
    "default_matmul_impl",
    "fingerprint_arrays",
    "leaves_match",
    "memo_by_adjacency",
    "normalized_scipy",
    "sparse_matmul",
]

MATMUL_IMPLS = ("chunked", "segment_sum", "bcoo")
MATMUL_CHUNK: int | None = None  # non-zero slots per loop step of "chunked"; None: by width
MATMUL_CHUNK_BYTES = 1 << 20  # the rows one loop step gathers, when MATMUL_CHUNK is None
MATMUL_BLOCK = 8  # slots of one row that "chunked" sums in registers (4 and 16: slower)
MAX_CHUNK_BLOCKS = 4096  # blocks per loop step of "chunked" at most (a power of two)

T = TypeVar("T")
RowwiseFn = Callable[..., jax.Array]  # (matmul, x, *operands) -> y, row-wise except through matmul


def fingerprint_arrays(*arrays: np.ndarray, extra: str = "") -> str:
    """A short content hash of host arrays (BLAKE2b over their dtypes, shapes and bytes).

    Examples:
      >>> fingerprint_arrays(np.arange(3)) == fingerprint_arrays(np.arange(3))
      True
      >>> fingerprint_arrays(np.arange(3)) == fingerprint_arrays(np.arange(4))
      False
    """
    h = hashlib.blake2b(digest_size=12)
    h.update(extra.encode())
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        if a.size:
            h.update(a.data.cast("B"))
    return h.hexdigest()


def cache_tag(fingerprint: str) -> int:
    """The int32 ``tag`` marking an intact device cache of the graph named by ``fingerprint``.

    Derived from the fingerprint and never 0 or 1, so a ``zeros_like`` or ``ones_like`` reset of
    the state, or a state built for another graph, does not pass for intact.

    Examples:
      >>> 2 <= cache_tag("00ff") < 2**31
      True
    """
    return (int(fingerprint[:8], 16) & 0x3FFFFFFF) | 0x40000000


class GraphOperator(abc.ABC):
    """``Ã`` as a linear operator on the rows of the stacked tables (the interface of psi).

    Implementations are pytrees whose leaves are the device arrays of ``Ã`` plus an int32
    ``tag``, and whose static data holds the host copy and ``fingerprint`` (module docstring).

    * ``num_nodes``: rows of ``Ã`` (the stacked tables' total row count); ``nnz``: stored
      non-zeros; ``fingerprint``: host-side content hash (equal graphs, equal strings);
    * ``matmul(y)``: ``Ã @ y`` for ``y`` of shape (num_nodes, d);
    * ``apply(fn, tables, operands=())``: ``fn(matmul, x, *operands)`` on the row-wise
      concatenation ``x`` of ``tables``, split back; ``fn`` may mix rows only through
      ``matmul`` (a sharded operator runs it on each device's block of rows). ``operands``
      are scalars (e.g. a traced ``beta``) that ``fn`` needs: pass them here rather than
      closing over them, so that a sharded operator can hand them to its ``shard_map``;
    * ``fresh()``, ``abstract()``, ``is_intact()``, ``repaired()``: the device cache (module
      docstring).
    """

    num_nodes: int
    nnz: int

    def __init__(self, host: Any, indices: Any, weights: Any, tag: Any):
        self.host = host  # static: the host copy, compared and hashed by its fingerprint
        self.indices = indices
        self.weights = weights
        self.tag = tag

    # -- pytree: the three leaves; the host copy is the static data --------------------------
    def tree_flatten_with_keys(self):
        keys = [jax.tree_util.GetAttrKey(k) for k in ("indices", "weights", "tag")]
        return tuple(zip(keys, (self.indices, self.weights, self.tag), strict=True)), self.host

    @classmethod
    def tree_unflatten(cls, host, children):
        return cls(host, *children)

    @property
    def fingerprint(self) -> str:
        """Host-side content hash of the operator (graph, and layout for sharded ones)."""
        return self.host.fingerprint

    @abc.abstractmethod
    def matmul(self, y: jax.Array, impl: str | None = None) -> jax.Array:
        """``Ã @ y`` for ``y`` of shape (num_nodes, d)."""

    @abc.abstractmethod
    def apply(self, fn: RowwiseFn, tables: Sequence[jax.Array], *, impl: str | None = None,
              operands: Sequence[Any] = ()) -> list[jax.Array]:
        """``fn(matmul, concatenate(tables), *operands)`` split back into the tables' row counts."""

    @abc.abstractmethod
    def fresh(self) -> GraphOperator:
        """The same operator with NEW device arrays uploaded from the host copy."""

    @abc.abstractmethod
    def uploaded(self) -> GraphOperator:
        """Leaves fetched from the host copy by ``jax.pure_callback``: what ``fresh`` is inside
        a trace (``jax.jit(opt.init)``), where ``fresh`` would make the graph a constant."""

    @abc.abstractmethod
    def abstract(self) -> GraphOperator:
        """The same operator with ``jax.ShapeDtypeStruct`` leaves (no device memory)."""

    @abc.abstractmethod
    def has_layout(self) -> bool:
        """Trace-time check: the leaves have the host copy's shapes and dtypes."""

    @abc.abstractmethod
    def is_intact(self) -> jax.Array:
        """Scalar bool: the leaves hold this graph (tag and one weight checked; shapes/dtypes
        statically)."""

    @abc.abstractmethod
    def repaired(self) -> GraphOperator:
        """This operator, its leaves re-uploaded from the host where ``is_intact`` fails."""


def default_matmul_impl() -> str:
    """``"chunked"`` on CPU, ``"segment_sum"`` elsewhere (measured: BENCHMARKS.md).

    Examples:
      >>> default_matmul_impl() in MATMUL_IMPLS
      True
    """
    return "chunked" if jax.default_backend() == "cpu" else "segment_sum"


def check_impl(impl: str | None) -> None:
    """Raise ``ValueError`` unless ``impl`` is None or one of ``MATMUL_IMPLS``.

    Examples:
      >>> check_impl("chunked")
      >>> check_impl("csr")
      Traceback (most recent call last):
      ...
      ValueError: impl must be one of ('chunked', 'segment_sum', 'bcoo') or None, got 'csr'
    """
    if impl is not None and impl not in MATMUL_IMPLS:
        raise ValueError(f"impl must be one of {MATMUL_IMPLS} or None, got {impl!r}")


def _row_blocks(indices: jax.Array, weights: jax.Array, num_rows: int, block: int,
                num_blocks: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Row-sorted COO regrouped into ``num_blocks`` blocks of ``block`` slots, each in ONE row.

    Row ``r`` (degree ``k``) owns ``ceil(k / block)`` consecutive blocks holding its entries in
    order; the slots past its last entry have weight 0 and repeat the row's first column, and
    blocks past the last row's (up to ``num_blocks``) have target row ``num_rows`` (dropped), as
    do entries whose row is out of range. Returns ``(block_row, cols, weights)``, of shapes
    (num_blocks,), (num_blocks, block) and (num_blocks, block). Only gathers, one scatter of
    ``num_rows`` ones and cumulative sums: no per-non-zero scatter.
    """
    rows, cols = indices[:, 0], indices[:, 1]
    nnz = rows.shape[0]
    degree = jax.ops.segment_sum(jnp.ones(nnz, jnp.int32), rows, num_segments=num_rows,
                                 indices_are_sorted=True)
    row_blocks = (degree + (block - 1)) // block
    ends = jnp.cumsum(jnp.stack([degree, row_blocks], 1), axis=0)  # one cumsum for both
    entry_end, block_end = ends[:, 0], ends[:, 1]
    entry_start, block_start = entry_end - degree, block_end - row_blocks
    # block q belongs to the last row starting at or before it (empty rows start where the next
    # non-empty row does, so the count lands on that one)
    starts = jnp.zeros(num_blocks, jnp.int32).at[block_start].add(1, mode="drop")
    block_row = jnp.cumsum(starts) - 1
    q = jnp.arange(num_blocks, dtype=jnp.int32)
    first = entry_start[block_row]
    src = (first + (q - block_start[block_row]) * block)[:, None] + jnp.arange(block,
                                                                              dtype=jnp.int32)
    valid = src < entry_end[block_row][:, None]
    src = jnp.where(valid, src, jnp.minimum(first, max(nnz - 1, 0))[:, None])
    block_row = jnp.where(valid[:, 0], block_row, num_rows)
    return block_row, cols[src], jnp.where(valid, weights[src], 0)


def blocked_coo(indices: np.ndarray, weights: np.ndarray, num_rows: int,
                block: int = MATMUL_BLOCK) -> tuple[np.ndarray, np.ndarray, int]:
    """``_row_blocks`` on the host, once per graph: a row-sorted COO (rows in range) rewritten
    as blocks of ``block`` consecutive slots, each in one row, in the layout that
    ``sparse_matmul(..., blocked=(block, used))`` reads without regrouping.

    Returns ``(blocks, weights, used)``. ``blocks`` is int32 of shape (total, 1 + block): a
    block's row, then its ``block`` columns; ``weights`` (total * block,) float32 holds the
    slots' weights block after block. The slots past a row's last entry repeat its first
    column with weight 0. ``total`` is the ``used`` blocks rounded up to a power of two, or to
    a multiple of ``MAX_CHUNK_BLOCKS`` from there on (the padding blocks repeat the last
    entry with weight 0), so that any power-of-two number of blocks per loop step up to that
    divides it. Padding only repeats entries with weight 0: a non-finite ``x[col]`` reaches no
    row that lacks ``col``. A block's row and columns sit side by side because the product
    reads them together: from the interleaved ``(slots, 2)`` COO this layout replaced, XLA
    copied the columns out before every product (psi 1.3-1.6x the time at d = 16:
    BENCHMARKS.md).

    Examples:
      >>> idx = np.array([[0, 1], [1, 0], [1, 1]], np.int32)
      >>> b, w, used = blocked_coo(idx, np.array([2.0, 3.0, 4.0], np.float32), 2, block=2)
      >>> b.tolist(), w.tolist(), used
      ([[0, 1, 1], [1, 0, 1]], [2.0, 0.0, 3.0, 4.0], 2)
    """
    rows = np.asarray(indices[:, 0], np.int64)
    degree = np.bincount(rows, minlength=num_rows)
    row_blocks = -(-degree // block)
    used = int(row_blocks.sum())
    total = (1 << max(used - 1, 0).bit_length() if used <= MAX_CHUNK_BLOCKS
             else -(-used // MAX_CHUNK_BLOCKS) * MAX_CHUNK_BLOCKS)
    total = total if used else 0
    block_row = np.repeat(np.arange(num_rows), row_blocks)
    entry_start = np.cumsum(degree) - degree
    block_start = np.cumsum(row_blocks) - row_blocks
    first = entry_start[block_row] + (np.arange(used) - block_start[block_row]) * block
    src = first[:, None] + np.arange(block)
    valid = src < (entry_start + degree)[block_row][:, None]
    src = np.where(valid, src, entry_start[block_row][:, None])
    blocks = np.zeros((total, 1 + block), np.int32)
    blocks[:used, 0] = block_row
    blocks[:used, 1:] = indices[src, 1]
    if used:  # weight 0 on an entry that exists
        blocks[used:, 0], blocks[used:, 1:] = indices[-1, 0], indices[-1, 1]
    out_weights = np.zeros((total, block), np.float32)
    out_weights[:used] = np.where(valid, weights[src], 0)
    return blocks, out_weights.reshape(-1), used


def blocks_as_coo(blocks: jax.Array) -> jax.Array:
    """``blocked_coo``'s blocks as the row-sorted COO ``(slots, 2)`` they hold (padding slots
    included, with their zero weights), for the products that read a COO.

    Examples:
      >>> blocks_as_coo(jnp.array([[0, 1, 1], [1, 0, 1]])).tolist()
      [[0, 1], [0, 1], [1, 0], [1, 1]]
    """
    block = blocks.shape[1] - 1
    rows = jnp.broadcast_to(blocks[:, :1], (blocks.shape[0], block))
    return jnp.stack([rows.reshape(-1), blocks[:, 1:].reshape(-1)], axis=1)


def take_rows(x: jax.Array, rows: jax.Array) -> jax.Array:
    """``x[rows]`` for non-negative ``rows`` (clamped into range), as one XLA gather.

    ``x[rows]`` in ``jax.numpy`` first maps negative indices to ``rows + len(x)``: a compare,
    an add and a select per index that XLA:CPU keeps inside the gather loop (psi took 1.1-1.25x
    the time with them at d = 16: BENCHMARKS.md). Graph indices are never negative.

    Examples:
      >>> take_rows(jnp.arange(6.0).reshape(3, 2), jnp.array([2, 0]))
      Array([[4., 5.],
             [0., 1.]], dtype=float32)
    """
    dims = lax.GatherDimensionNumbers(offset_dims=(1,), collapsed_slice_dims=(0,),
                                      start_index_map=(0,))
    return lax.gather(x, rows[:, None], dims, (1, x.shape[1]), indices_are_sorted=False,
                      mode=lax.GatherScatterMode.CLIP)


def add_rows(out: jax.Array, rows: jax.Array, updates: jax.Array) -> jax.Array:
    """``out.at[rows].add(updates, mode="drop")`` for sorted, non-negative ``rows``, without
    ``jax.numpy``'s negative-index wrap (see :func:`take_rows`); rows ``>= len(out)`` are
    dropped.

    Examples:
      >>> add_rows(jnp.zeros((2, 1)), jnp.array([1, 1, 2]), jnp.ones((3, 1)))
      Array([[0.],
             [2.]], dtype=float32)
    """
    dims = lax.ScatterDimensionNumbers(update_window_dims=(1,), inserted_window_dims=(0,),
                                       scatter_dims_to_operand_dims=(0,))
    return lax.scatter_add(out, rows[:, None], updates, dims, indices_are_sorted=True,
                           mode=lax.GatherScatterMode.FILL_OR_DROP)


def check_layout(indices_shape: Sequence[int], weights_shape: Sequence[int],
                 blocked: tuple[int, int] | None) -> None:
    """Raise ``ValueError`` unless ``indices`` and ``weights`` have the shapes ``sparse_matmul``
    reads: ``(nnz, 2)`` and ``(nnz,)`` (a COO), or with ``blocked=(block, used)``
    ``blocked_coo``'s ``(total, 1 + block)`` and ``(total * block,)``. A COO read as blocks, or
    blocks read as a COO, would give wrong sums, not an error.

    Examples:
      >>> check_layout((6, 2), (6,), None)
      >>> check_layout((2, 9), (16,), (8, 2))
      >>> check_layout((2, 9), (16,), None)  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      ValueError: indices (2, 9) with 16 weights are blocked_coo's blocks: pass blocked=(8, ...
    """
    indices_shape, weights_shape = tuple(indices_shape), tuple(weights_shape)
    if blocked is None:
        if len(indices_shape) == 2 and indices_shape[1] > 2 and len(weights_shape) == 1 \
                and weights_shape[0] == indices_shape[0] * (indices_shape[1] - 1):
            raise ValueError(
                f"indices {indices_shape} with {weights_shape[0]} weights are blocked_coo's "
                f"blocks: pass blocked=({indices_shape[1] - 1}, used blocks), as "
                "NormalizedGraph.matmul does with its host.blocked")
        if (len(indices_shape) != 2 or indices_shape[1] != 2 or len(weights_shape) != 1
                or weights_shape[0] != indices_shape[0]):
            raise ValueError(
                f"a COO needs indices of shape (nnz, 2) and weights of shape (nnz,), got "
                f"{indices_shape} and {weights_shape}")
        return
    block = blocked[0]
    if (len(indices_shape) != 2 or indices_shape[1] != 1 + block or len(weights_shape) != 1
            or weights_shape[0] != indices_shape[0] * block):
        raise ValueError(
            f"blocked={tuple(blocked)} needs blocked_coo's blocks, indices of shape "
            f"(total, {1 + block}) and weights of shape (total * {block},), got "
            f"{indices_shape} and {weights_shape}")


def sparse_matmul(indices: jax.Array, weights: jax.Array, x: jax.Array, num_rows: int,
                  impl: str | None = None, chunk: int | None = None,
                  blocked: tuple[int, int] | None = None) -> jax.Array:
    """``S @ x`` for the (num_rows x x.shape[0]) sparse ``S`` in row-sorted COO, in ``x.dtype``.

    ``(S @ x)[r] = sum_k weights[k] x[indices[k, 1]]`` over the entries ``k`` with
    ``indices[k, 0] = r``. Three formulations:

    * ``"segment_sum"``: gather every ``x[col]``, scale, sorted segment sum (one parallel
      pass; the GPU default);
    * ``"chunked"`` (the CPU default): each row's entries regrouped into blocks of
      ``MATMUL_BLOCK`` (8) slots, padded with zero weights (``_row_blocks``, computed in the
      call, or ``blocked_coo``'s once per graph, as ``NormalizedGraph`` does on CPU: then
      ``indices`` are its blocks, (blocks, 1 + block), and ``blocked=(block, used blocks)``;
      the other products read them as ``blocks_as_coo``); a ``fori_loop`` walks ``chunk``
      slots at a time, sums each block's scaled rows ``x[col]`` in registers
      (``MATMUL_BLOCK`` gathers and multiply-adds, one fused loop) and scatter-adds the block
      sums into their rows, so the (nnz, d) message buffer never exists and the scatter sees
      one update per block, not per non-zero (with the blocks built once per graph, psi
      at 0.45-0.75x scipy's and 0.55-0.87x torch's CSR time at d = 16-128 and 100k-20M
      non-zeros: BENCHMARKS.md);
    * ``"bcoo"``: ``jax.experimental.sparse.BCOO @ x``.

    Rows must be non-decreasing (``"chunked"`` groups each row's entries by position and
    gives wrong sums otherwise); entries whose row is out of range (``>= num_rows``:
    sharding's padding, sorted last) are dropped. Columns must lie in ``[0, x.shape[0])``
    (as in every graph ``as_normalized_graph`` and ``shard_graph`` build; not checked here):
    ``"chunked"`` and ``"segment_sum"`` clamp others into range, ``"bcoo"`` drops them.
    ``chunk`` (slots per loop step; one step, by ``"segment_sum"``, when ``nnz <= chunk``)
    defaults to ``MATMUL_CHUNK`` or, when that is None, to the number of rows of ``x`` that
    fill ``MATMUL_CHUNK_BYTES`` (4096 at d = 64 in float32). While it runs, ``"chunked"``
    holds the blocks' columns and weights: 8 bytes for each of at most ``nnz + 7 num_rows``
    slots (about 11 bytes per non-zero at 20 non-zeros a row; the graph itself takes 12).

    Examples:
      >>> idx = jnp.array([[0, 1], [1, 0]], jnp.int32)   # S = [[0, 2], [3, 0]]
      >>> sparse_matmul(idx, jnp.array([2.0, 3.0]), jnp.array([[1.0], [10.0]]), 2)
      Array([[20.],
             [ 3.]], dtype=float32)
    """
    check_impl(impl)
    impl = default_matmul_impl() if impl is None else impl
    if chunk is None:
        row_bytes = x.dtype.itemsize * max(x.shape[1], 1)
        chunk = MATMUL_CHUNK or max(256, MATMUL_CHUNK_BYTES // row_bytes)
    chunk = int(chunk)
    w = weights.astype(x.dtype)
    nnz = w.shape[0]
    check_layout(indices.shape, w.shape, blocked)
    if blocked is not None and (impl != "chunked" or nnz <= chunk):
        indices, blocked = blocks_as_coo(indices), None  # a plain COO for the other products
    if impl == "bcoo":
        a = jsparse.BCOO((w, indices), shape=(num_rows, x.shape[0]), indices_sorted=True)
        return a @ x
    if impl == "segment_sum" or nnz <= chunk or num_rows == 0:
        rows, cols = indices[:, 0], indices[:, 1]
        return jax.ops.segment_sum(w[:, None] * take_rows(x, cols), rows, num_segments=num_rows,
                                   indices_are_sorted=True)
    if blocked is not None:  # blocked_coo's layout: reshapes, no regrouping
        block, used = blocked
        total = nnz // block
        per_chunk = min(1 << (max(1, chunk // block).bit_length() - 1), MAX_CHUNK_BLOCKS,
                        total)  # a power of two that divides total
        num_chunks = -(-used // per_chunk)
        blocks = indices.reshape(-1, per_chunk, 1 + block)
        bw = w.reshape(-1, per_chunk, block)

        def chunk_blocks(i):  # (rows, columns) of the blocks of loop step i
            return blocks[i, :, 0], blocks[i, :, 1:]
    else:
        block = MATMUL_BLOCK
        per_chunk = max(1, chunk // block)  # blocks per loop step
        bound = -(-(nnz + (block - 1) * min(num_rows, nnz)) // block)  # >= blocks in use
        num_chunks = -(-bound // per_chunk)
        block_row, bcols, bw = (a.reshape(num_chunks, per_chunk, *a.shape[1:]) for a in
                                _row_blocks(indices, w, num_rows, block, num_chunks * per_chunk))

        def chunk_blocks(i):
            return block_row[i], bcols[i]

    def body(i, out):
        rows, cols = chunk_blocks(i)
        v = bw[i]
        acc = v[:, 0, None] * take_rows(x, cols[:, 0])
        for j in range(1, block):  # one fused loop; a gather then a sum over j is ~10x slower
            acc = acc + v[:, j, None] * take_rows(x, cols[:, j])
        return add_rows(out, rows, acc)

    # the first chunk seeds the carry, so it has the loop's type (also under shard_map)
    seed = body(0, jnp.zeros((num_rows, x.shape[1]), x.dtype))
    return jax.lax.fori_loop(1, num_chunks, body, seed)


def leaves_match(leaves: Sequence[Any], specs: Sequence[jax.ShapeDtypeStruct]) -> bool:
    """Trace-time check: every leaf has its spec's shape and dtype.

    Examples:
      >>> leaves_match([jnp.zeros(2)], [jax.ShapeDtypeStruct((2,), jnp.float32)])
      True
      >>> leaves_match([jnp.zeros(2, jnp.bfloat16)], [jax.ShapeDtypeStruct((2,), jnp.float32)])
      False
    """
    return all(
        hasattr(x, "shape") and hasattr(x, "dtype") and tuple(x.shape) == tuple(s.shape)
        and jnp.dtype(x.dtype) == jnp.dtype(s.dtype)
        for x, s in zip(leaves, specs, strict=False)
    )


class HostCOO:
    """The host (numpy) copy of a normalised graph: row-sorted COO, its fingerprint and tag,
    and what the device leaves hold: the same COO, or ``blocked_coo``'s blocks and weights
    (``blocked``: then ``self.blocked`` is ``(block, used blocks)`` for ``sparse_matmul``, else
    None).

    Compared and hashed by fingerprint, so that it can sit in a pytree's static data.
    """

    def __init__(self, indices: np.ndarray, weights: np.ndarray, num_nodes: int,
                 blocked: bool = False):
        self.indices = np.ascontiguousarray(indices, np.int32)
        self.weights = np.ascontiguousarray(weights, np.float32)
        self.num_nodes = int(num_nodes)
        self.fingerprint = fingerprint_arrays(self.indices, self.weights,
                                              extra=f"coo{self.num_nodes}")
        self.tag = cache_tag(self.fingerprint)
        self.leaf_indices, self.leaf_weights = self.indices, self.weights
        self.blocked: tuple[int, int] | None = None
        if blocked and self.weights.size:
            self.leaf_indices, self.leaf_weights, used = blocked_coo(
                self.indices, self.weights, self.num_nodes)
            self.blocked = (MATMUL_BLOCK, used)
        # one stored weight of largest magnitude, checked beside ``tag``: a reset of only the
        # float leaves (moments zeroed, counts kept) leaves ``tag`` intact but not this slot
        self.probe_slot = int(np.argmax(np.abs(self.leaf_weights))) if self.leaf_weights.size else 0
        self.probe_value = (float(self.leaf_weights[self.probe_slot]) if self.leaf_weights.size
                            else 0.0)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, HostCOO) and other.fingerprint == self.fingerprint

    def __hash__(self) -> int:
        return hash(self.fingerprint)

    def specs(self) -> tuple[jax.ShapeDtypeStruct, ...]:
        return (jax.ShapeDtypeStruct(self.leaf_indices.shape, jnp.int32),
                jax.ShapeDtypeStruct(self.leaf_weights.shape, jnp.float32),
                jax.ShapeDtypeStruct((), jnp.int32))

    def numpy_leaves(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.leaf_indices, self.leaf_weights, np.asarray(self.tag, np.int32)


@jax.tree_util.register_pytree_with_keys_class
class NormalizedGraph(GraphOperator):
    """``Ã = D^-1/2 A D^-1/2`` in row-sorted COO form on one device: the local operator.

    Leaves: ``indices`` int32, ``weights`` (slots,) float32 and ``tag`` (int32 scalar,
    ``cache_tag(fingerprint)`` when intact). On CPU, where ``"chunked"`` is the default
    product, they are ``blocked_coo``'s (the entries regrouped once into blocks of one row,
    padded with zero weights; ``indices`` (blocks, 1 + block): each block's row, then its
    columns); elsewhere the ``nnz`` entries themselves (``indices`` (nnz, 2) ``(row, col)``).
    Static: the host copy (module docstring). Build it with ``as_normalized_graph`` (raw
    adjacency) or ``from_scipy`` (already normalised).

    Examples:
      >>> g = as_normalized_graph(np.array([[0.0, 1.0], [1.0, 0.0]]))
      >>> g
      NormalizedGraph(num_nodes=2, nnz=2)
      >>> g.matmul(jnp.array([[1.0], [2.0]]))
      Array([[2.],
             [1.]], dtype=float32)
      >>> reset = jax.tree.map(jnp.zeros_like, g)     # a generic reset...
      >>> bool(reset.is_intact()), bool(reset.repaired().is_intact())   # ...is repaired
      (False, True)
    """

    host: HostCOO

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def from_scipy(cls, normalized: sp.spmatrix) -> NormalizedGraph:
        """Wrap an ALREADY-normalised scipy matrix (``as_normalized_graph`` normalises raw ones).

        Examples:
          >>> NormalizedGraph.from_scipy(sp.eye(3) * 0.5).nnz
          3
        """
        csr = sp.csr_matrix(normalized)  # canonical CSR is sorted by (row, col)
        csr.sum_duplicates()
        rows = graph_lib.csr_row_ids(csr)
        if csr.shape[0] >= 2**31:
            raise ValueError(f"{csr.shape[0]} nodes do not fit int32 indices")
        indices = np.stack([rows, csr.indices.astype(rows.dtype)], axis=1)
        host = HostCOO(indices, csr.data, csr.shape[0],
                       blocked=default_matmul_impl() == "chunked")
        return cls(host, None, None, None).fresh()

    def to_scipy(self) -> sp.csr_matrix:
        """``Ã`` as a float64 scipy CSR matrix (from the host copy).

        Examples:
          >>> as_normalized_graph(np.ones((2, 2))).to_scipy().toarray()
          array([[0.5, 0.5],
                 [0.5, 0.5]])
        """
        idx, data = self.host.indices, self.host.weights.astype(np.float64)
        return sp.csr_matrix((data, (idx[:, 0], idx[:, 1])), shape=(self.num_nodes,) * 2)

    # -- GraphOperator -------------------------------------------------------------------------
    @property
    def num_nodes(self) -> int:  # type: ignore[override]
        return self.host.num_nodes

    @property
    def nnz(self) -> int:  # type: ignore[override]
        return int(self.host.weights.shape[0])

    def __repr__(self) -> str:
        return f"NormalizedGraph(num_nodes={self.num_nodes}, nnz={self.nnz})"

    def matmul(self, y: jax.Array, impl: str | None = None) -> jax.Array:
        """``Ã @ y`` for ``y`` (num_nodes, d), accumulated in ``y.dtype`` (``sparse_matmul``).

        Examples:
          >>> g = as_normalized_graph(np.ones((2, 2)))
          >>> g.matmul(jnp.array([[2.0], [4.0]]), impl="segment_sum")
          Array([[3.],
                 [3.]], dtype=float32)
        """
        shape = jnp.shape(y)
        if len(shape) != 2 or shape[0] != self.num_nodes:
            raise ValueError(f"y must have shape (num_nodes, d) = ({self.num_nodes}, d), got "
                             f"{shape}: one row per node of the graph")
        return sparse_matmul(self.indices, self.weights, y, self.num_nodes, impl,
                             blocked=self.host.blocked)

    def apply(self, fn: RowwiseFn, tables: Sequence[jax.Array], *, impl: str | None = None,
              operands: Sequence[Any] = ()) -> list[jax.Array]:
        """``fn(matmul, x, *operands)`` on the stacked ``tables``, split back (``GraphOperator``).

        Examples:
          >>> g = as_normalized_graph(np.ones((3, 3)) - np.eye(3))
          >>> a, b = g.apply(lambda mm, x: mm(x), [jnp.ones((1, 2)), jnp.ones((2, 2))])
          >>> a.shape, b.shape, float(a[0, 0])
          ((1, 2), (2, 2), 1.0)
        """
        tables = list(tables)
        x = tables[0] if len(tables) == 1 else jnp.concatenate(tables)
        y = fn(lambda v: self.matmul(v, impl), x, *operands)
        if len(tables) == 1:
            return [y]
        return list(jnp.split(y, np.cumsum([t.shape[0] for t in tables])[:-1]))

    def fresh(self) -> NormalizedGraph:
        """New device arrays from the host copy (donating them never touches another state).

        Examples:
          >>> g = as_normalized_graph(np.ones((2, 2)))
          >>> g.fresh().weights is g.weights
          False
        """
        leaves = self.host.numpy_leaves()
        return NormalizedGraph(self.host, *(jnp.array(x, copy=True) for x in leaves))

    def uploaded(self) -> NormalizedGraph:
        """The host copy through ``jax.pure_callback`` (no constant when traced).

        Examples:
          >>> g = as_normalized_graph(np.ones((2, 2)))
          >>> lowered = jax.jit(lambda: g.uploaded()).lower()
          >>> bool(jnp.all(lowered.compile()().weights == g.weights))
          True
        """
        return NormalizedGraph(self.host, *jax.pure_callback(self.host.numpy_leaves,
                                                             self.host.specs()))

    def abstract(self) -> NormalizedGraph:
        """``jax.ShapeDtypeStruct`` leaves: the structure of a state without device memory.

        Examples:
          >>> as_normalized_graph(np.ones((2, 2))).abstract().tag
          ShapeDtypeStruct(shape=(), dtype=int32)
        """
        return NormalizedGraph(self.host, *self.host.specs())

    def has_layout(self) -> bool:
        return leaves_match((self.indices, self.weights, self.tag), self.host.specs())

    def is_intact(self) -> jax.Array:
        """Scalar bool: shapes/dtypes are right (checked at trace time), ``tag`` is intact and
        so is one weight (the host's probe slot: a reset of the float leaves alone changes it).

        Examples:
          >>> g = as_normalized_graph(np.ones((2, 2)))
          >>> cast = jax.tree.map(lambda t: t.astype(jnp.bfloat16), g)   # optax.tree.cast
          >>> floats_zeroed = jax.tree.map(
          ...     lambda t: jnp.zeros_like(t) if t.dtype == jnp.float32 else t, g)
          >>> bool(g.is_intact()), bool(cast.is_intact()), bool(floats_zeroed.is_intact())
          (True, False, False)
        """
        if not self.has_layout():
            return jnp.asarray(False)
        return self._cache_matches()

    def _cache_matches(self) -> jax.Array:
        """``tag`` intact and the host's probe slot holding its weight (``HostCOO``)."""
        if not self.host.leaf_weights.size:
            return self.tag == self.host.tag
        return (self.tag == self.host.tag) & (self.weights[self.host.probe_slot]
                                              == self.host.probe_value)

    def repaired(self) -> NormalizedGraph:
        """Leaves unchanged when intact, else re-uploaded from the host (``pure_callback``).

        A dtype/shape mismatch (known at trace time) always re-uploads; a tag mismatch (known
        at run time) re-uploads through ``lax.cond``, so an intact graph never becomes a
        constant of the program.

        Examples:
          >>> g = as_normalized_graph(np.ones((2, 2)))
          >>> cast = jax.tree.map(lambda t: t.astype(jnp.bfloat16), g)
          >>> fixed = jax.jit(lambda g: g.repaired())(cast)
          >>> fixed.weights.dtype, bool(fixed.is_intact())
          (dtype('float32'), True)
        """
        if not self.has_layout():
            return self.uploaded()
        leaves = (self.indices, self.weights, self.tag)
        intact = self._cache_matches()

        def upload():
            return tuple(jax.tree.leaves(self.uploaded()))

        return NormalizedGraph(self.host, *jax.lax.cond(intact, lambda: leaves, upload))


def check_fingerprint(template: GraphOperator, state: dict) -> GraphOperator:
    """flax.serialization restore of an operator: the template itself, if the fingerprints agree.

    A checkpoint stores ``{"fingerprint": ...}`` for each graph operator; older checkpoints that
    stored the arrays (no fingerprint) restore to the template's arrays too.

    Examples:
      >>> g = as_normalized_graph(np.ones((2, 2)))
      >>> check_fingerprint(g, {"fingerprint": g.fingerprint}) is g
      True
      >>> check_fingerprint(g, {"fingerprint": "0" * 24})
      Traceback (most recent call last):
      ...
      ValueError: the checkpoint's SEvo graph (fingerprint 000000000000000000000000) is not this
      optimizer's graph ...
    """
    stored = state.get("fingerprint")
    if stored is not None and str(stored) != template.fingerprint:
        raise ValueError(
            f"the checkpoint's SEvo graph (fingerprint {stored}) is not this optimizer's graph "
            f"(fingerprint {template.fingerprint}); rebuild the optimizer with the "
            "checkpoint's graph"
        )
    return template


flax.serialization.register_serialization_state(
    NormalizedGraph, lambda g: {"fingerprint": g.fingerprint}, check_fingerprint, override=True,
)


_MEMO: dict[int, tuple[Any, dict[Hashable, tuple[tuple, Any]]]] = {}


def _contents(adjacency: Any) -> tuple:
    """What an in-place edit of a numpy or scipy adjacency changes: its shape and the shape,
    dtype and CRC-32 of each host buffer (about 2 GB/s). JAX values are immutable: ()."""
    if isinstance(adjacency, np.ndarray):
        buffers = {"array": adjacency}
    elif sp.issparse(adjacency):
        if adjacency.format in ("lil", "dok"):  # Python lists or a dict: compare a COO copy
            adjacency = adjacency.tocoo()
        buffers = {k: v for k, v in vars(adjacency).items() if isinstance(v, np.ndarray)}
    else:
        return ()
    return (np.shape(adjacency),) + tuple(
        (name, b.shape, b.dtype.str, zlib.crc32(np.ascontiguousarray(b).data))
        for name, b in sorted(buffers.items()))


def memo_by_adjacency(adjacency: Any, key: Hashable, make: Callable[[], T]) -> T:
    """``make()``, memoised per ``(adjacency, key)`` while that object lives, by its identity.

    A numpy or scipy ``adjacency`` edited in place since the last call gets ``make()`` again:
    each call compares a CRC-32 of its buffers (about 1 ms at 220k non-zeros, 0.1 s at 20M).
    An object without weak references is not memoised.

    Examples:
      >>> a = np.eye(2)
      >>> memo_by_adjacency(a, "k", lambda: "built"), memo_by_adjacency(a, "k", lambda: "new")
      ('built', 'built')
      >>> a[0, 0] = 2.0
      >>> memo_by_adjacency(a, "k", lambda: "new")
      'new'
    """
    contents = _contents(adjacency)
    entry = _MEMO.get(id(adjacency))
    if entry is not None and entry[0]() is adjacency:
        hit = entry[1].get(key)
        if hit is not None and hit[0] == contents:
            return hit[1]
    value = make()
    if entry is None or entry[0]() is not adjacency:
        try:
            ident = id(adjacency)
            ref = weakref.ref(adjacency, lambda _: _MEMO.pop(ident, None))
        except TypeError:
            return value
        entry = _MEMO[ident] = (ref, {})
    entry[1][key] = (contents, value)
    return value


def as_normalized_graph(adjacency: Any) -> NormalizedGraph:
    """Validate a RAW symmetric adjacency ``A`` and return ``Ã = D^-1/2 A D^-1/2``.

    Accepts a scipy sparse matrix/array, a dense numpy array, a
    ``jax.experimental.sparse.BCOO``, or a ``NormalizedGraph`` (returned unchanged). The result
    is memoised by the identity of ``adjacency`` (``memo_by_adjacency``), so factories called
    again with the same object (``optax.inject_hyperparams`` re-calls them in every update) do
    not normalise it again, while one edited in place since is normalised anew. The operator
    keeps a host copy of ``Ã`` (12 bytes per non-zero) besides each state's device copy.

    Examples:
      >>> g = as_normalized_graph(np.array([[0.0, 2.0], [2.0, 0.0]]))
      >>> g.to_scipy().toarray()
      array([[0., 1.],
             [1., 0.]])
    """
    if isinstance(adjacency, NormalizedGraph):
        return adjacency
    return memo_by_adjacency(adjacency, NormalizedGraph,
                             lambda: NormalizedGraph.from_scipy(normalized_scipy(adjacency)))


def normalized_scipy(adjacency: Any) -> sp.csr_matrix:
    """``Ã`` on the host as scipy CSR (``as_normalized_graph`` without the device).

    Used by the sharded operator so that a million-node graph never sits whole on one device.

    Examples:
      >>> normalized_scipy(np.array([[0.0, 4.0], [4.0, 0.0]])).toarray()
      array([[0., 1.],
             [1., 0.]])
    """
    if isinstance(adjacency, NormalizedGraph):
        return adjacency.to_scipy()
    if any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(adjacency)):
        raise TypeError(
            "adjacency is a traced array: optax.inject_hyperparams injects numpy/JAX arrays as "
            "hyperparameters; pass a scipy.sparse matrix or a NormalizedGraph "
            "(sevo_jax.as_normalized_graph(A)), or static_args=('adjacency',)"
        )
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
