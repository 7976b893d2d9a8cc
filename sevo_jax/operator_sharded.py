"""The row-sharded graph operator: ``Ã`` split by rows across one mesh axis (``ShardedGraph``).

SEvo (arXiv 2310.03032) for tables too large for one device: ``sevo_smooth(..., mesh=mesh,
axis_name="x")`` builds a ``ShardedGraph`` at ``init`` and psi (``sevo_jax.psi``) runs its L
products under one ``jax.shard_map`` through ``ShardedGraph.apply``.

Layout. Each smoothed table of ``s`` rows is cut into ``P`` contiguous blocks of
``m = ceil(s / P)`` rows (the last ones padded with zero rows when ``P`` does not divide
``s``), which is exactly how ``NamedSharding(mesh, P("x", None))`` lays the table out, so
device ``k`` already holds block ``k`` of every table and the stacked signal it works on is
the concatenation of those local blocks (users block ``k``, then items block ``k``): no
resharding of the tables, even when several are smoothed jointly. The graph renumbers the
nodes into that device-major order (``k * n_local + local row``, with ``n_local`` the sum of
the tables' ``m``), gives device ``k`` the edges whose ROW it owns (local row, global column,
weight), pads every device's edge list to the same length ``E_max`` with weight-0 edges aimed at
an out-of-range row (dropped by the scatter) and stacks them into arrays of shape
``(P, E_max, ...)`` sharded on their leading axis. Padding rows have no edges in or out, start
at zero and are sliced off, so they never leak into real rows. One product is an
``all_gather`` of the (n_local, d) local signal into the full (P * n_local, d) one (the only
communication), then the local ``sparse_matmul`` into the local rows. Memory per device: its
edge block plus one gathered (P * n_local, d) signal at a time. On CPU each device's edges are
regrouped once, on the host, into the blocks the local ``"chunked"`` product reads (as
``NormalizedGraph`` does).

Output sharding. A table whose row count is a multiple of ``P`` comes back
``NamedSharding(mesh, P(axis_name, None))``, like the input. Other tables work (padded inside,
sliced back) but their output sharding is left to XLA, and with an ``Explicit`` axis they are
first replicated to be padded: pad such tables (``sevo_jax.sharding.pad_rows`` and
``pad_adjacency``).

Device cache (``sevo_jax.operator``). The host keeps every device's edge block; ``fresh()``
uploads new arrays, and ``repaired()`` re-uploads each device's own block from the host through
``jax.pure_callback`` inside the ``shard_map`` (each process serves its own devices) when the
per-device ``tag`` says the cache was reset; a cast (dtype/shape change) is re-uploaded at trace
time the same way. Several hosts: call ``jax.distributed.initialize()`` first, build the same
adjacency on every process (each uploads only its own devices' blocks through
``jax.make_array_from_callback``) and use a global mesh.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as PSpec

from sevo_jax.operator import (
    MATMUL_BLOCK,
    GraphOperator,
    RowwiseFn,
    blocked_coo,
    cache_tag,
    check_fingerprint,
    default_matmul_impl,
    fingerprint_arrays,
    leaves_match,
    normalized_scipy,
    sparse_matmul,
)

__all__ = ["ShardedGraph", "check_axis", "device_major_positions", "local_sizes", "shard_graph",
           "shard_normalized"]


def check_axis(mesh: Any, axis_name: Any) -> int:
    """Validate ``mesh``/``axis_name`` and return the axis size ``P``.

    Examples:
      >>> check_axis(jax.make_mesh((1,), ("x",)), "x")
      1
    """
    if not isinstance(mesh, Mesh):
        raise TypeError(
            f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__} (axis_name={axis_name!r})"
        )
    if axis_name is None:
        raise ValueError(
            f"axis_name is required with mesh= (one of the mesh's axis names {mesh.axis_names})"
        )
    if axis_name not in mesh.axis_names:
        raise ValueError(
            f"axis_name={axis_name!r} is not an axis of the mesh; its axes are {mesh.axis_names}"
        )
    return int(mesh.shape[axis_name])


def local_sizes(segments: Sequence[int], num_shards: int) -> tuple[int, ...]:
    """Rows of each table held per device: ``ceil(segment / P)``.

    Examples:
      >>> local_sizes([13, 16], 8)
      (2, 2)
    """
    return tuple(-(-int(s) // num_shards) for s in segments)


def device_major_positions(segments: Sequence[int], num_shards: int) -> np.ndarray:
    """Node ``i`` (stacked order) -> its row in the all-gathered (P * n_local, d) signal.

    Examples:
      >>> device_major_positions([3], 2).tolist()   # blocks [0, 1] on device 0, [2] on device 1
      [0, 1, 2]
      >>> device_major_positions([2, 2], 2).tolist()  # device 0: u0, i0; device 1: u1, i1
      [0, 2, 1, 3]
    """
    local = local_sizes(segments, num_shards)
    n_local = sum(local)
    pos = np.empty(int(sum(segments)), np.int64)
    start, offset = 0, 0
    for s, m in zip(segments, local, strict=True):
        o = np.arange(s, dtype=np.int64)
        pos[start : start + s] = (o // m) * n_local + offset + o % m
        start += s
        offset += m
    return pos


class HostBlocks:
    """Host copy of a ``ShardedGraph``: every device's edge block, the layout and fingerprint.

    Compared and hashed by (fingerprint, mesh, axis), so it can sit in a pytree's static data.
    """

    def __init__(self, indices: np.ndarray, weights: np.ndarray, segments: Sequence[int],
                 mesh: Mesh, axis_name: str, nnz: int, edges_per_shard: int,
                 blocked: tuple[int, int] | None = None):
        self.indices = indices
        self.weights = weights
        self.segments = tuple(int(s) for s in segments)
        self.mesh = mesh
        self.axis_name = axis_name
        self.nnz = int(nnz)
        self.edges_per_shard = int(edges_per_shard)
        self.blocked = blocked  # (block, used blocks) for sparse_matmul, or None: a plain COO
        self.fingerprint = fingerprint_arrays(indices, weights,
                                              extra=f"blocks{self.segments}{blocked}")
        self.tag = cache_tag(self.fingerprint)
        self.tags = np.full((indices.shape[0],), self.tag, np.int32)
        # per device, one stored weight of largest magnitude, checked beside its tag (as
        # ``HostCOO``'s probe: a reset of the float leaves alone keeps the tags)
        width = weights.shape[1] if weights.ndim == 2 else 0
        self.probe_slots = (np.argmax(np.abs(weights), axis=1).astype(np.int32) if width
                            else np.zeros(weights.shape[0], np.int32))
        self.probe_values = (np.take_along_axis(weights, self.probe_slots[:, None], 1)[:, 0]
                             .astype(np.float32) if width
                             else np.zeros(weights.shape[0], np.float32))

    def _key(self) -> tuple:
        return (self.fingerprint, self.mesh, self.axis_name)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, HostBlocks) and other._key() == self._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def sharding(self, ndim: int) -> NamedSharding:
        """Rows over the axis, written for all ``ndim`` dimensions as ``jax.jit`` writes its
        outputs' (``P('x')`` and ``P('x', None)`` are the same layout but different cache keys:
        a state from ``init`` would compile a user's jitted update twice)."""
        return NamedSharding(self.mesh, PSpec(self.axis_name, *(None,) * (ndim - 1)))

    def specs(self, sharded: bool = True) -> tuple[jax.ShapeDtypeStruct, ...]:
        return tuple(jax.ShapeDtypeStruct(x.shape, dtype,
                                          sharding=self.sharding(x.ndim) if sharded else None)
                     for x, dtype in ((self.indices, jnp.int32), (self.weights, jnp.float32),
                                      (self.tags, jnp.int32)))

    def block(self, k: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Device ``k``'s block of each leaf, with a leading axis of 1."""
        k = int(np.asarray(k).reshape(-1)[0])
        return self.indices[k : k + 1], self.weights[k : k + 1], self.tags[k : k + 1]


@jax.tree_util.register_pytree_with_keys_class
class ShardedGraph(GraphOperator):
    """``Ã`` split by rows across one mesh axis (module docstring): the row-sharded operator.

    Leaves, all sharded ``NamedSharding(mesh, P(axis))`` on their leading axis of size ``P``:
    ``indices`` (P, E_max, 2) int32 ``(local row, column in the device-major gathered
    signal)``, ``weights`` (P, E_max) float32 and ``tag`` (P,) int32. Padding edges have
    weight 0 and local row ``n_local`` (out of range, dropped). On CPU, where ``"chunked"``
    is the default product, each device's edges are held as ``NormalizedGraph`` holds them
    there, ``blocked_coo``'s blocks: ``indices`` (P, T, 1 + block) and ``weights``
    (P, T * block), padded to one ``T`` with weight-0 blocks aimed at row ``n_local``.
    Static: the host copy, with ``segments`` (row counts of the tables stacked on it;
    ``num_nodes`` is their sum), ``mesh``, ``axis_name``, ``nnz`` (real edges) and
    ``edges_per_shard``. Build it with ``shard_graph``.

    Examples:
      >>> mesh = jax.make_mesh((1,), ("x",))
      >>> g = shard_graph(np.ones((4, 4)) - np.eye(4), mesh, "x", segments=(1, 3))
      >>> g.segments, g.num_nodes, g.nnz
      ((1, 3), 4, 12)
      >>> [t.shape for t in g.apply(lambda mm, x: mm(x), [jnp.ones((1, 2)), jnp.ones((3, 2))])]
      [(1, 2), (3, 2)]
    """

    host: HostBlocks

    # -- layout --------------------------------------------------------------------------------
    @property
    def segments(self) -> tuple[int, ...]:
        return self.host.segments

    @property
    def mesh(self) -> Mesh:
        return self.host.mesh

    @property
    def axis_name(self) -> str:
        return self.host.axis_name

    @property
    def num_nodes(self) -> int:  # type: ignore[override]
        return sum(self.segments)

    @property
    def nnz(self) -> int:  # type: ignore[override]
        return self.host.nnz

    @property
    def num_shards(self) -> int:
        return int(self.mesh.shape[self.axis_name])

    @property
    def local_sizes(self) -> tuple[int, ...]:
        """Rows of each table held per device (``ceil(segment / P)``)."""
        return local_sizes(self.segments, self.num_shards)

    @property
    def edges_per_shard(self) -> int:
        """``E_max``: the most edges any device holds (its leaves may pad them further)."""
        return self.host.edges_per_shard

    def __repr__(self) -> str:
        return (
            f"ShardedGraph(num_nodes={self.num_nodes}, segments={self.segments}, "
            f"nnz={self.nnz}, axis={self.axis_name!r} x {self.num_shards}, "
            f"edges_per_shard={self.edges_per_shard})"
        )

    # -- products ------------------------------------------------------------------------------
    def apply(self, fn: RowwiseFn, tables: Sequence[jax.Array], *, impl: str | None = None,
              operands: Sequence[Any] = ()) -> list[jax.Array]:
        """``fn(matmul, x, *operands)`` on the stacked ``tables``, each device on its block of rows.

        Inside one ``shard_map``, ``x`` is the device's local blocks of the tables (padded) and
        ``matmul`` is an ``all_gather`` then the local ``sparse_matmul``; ``operands`` enter the
        ``shard_map`` replicated (arguments, not closures). The tables must match
        ``segments`` and share their width; each comes back in its dtype, row-sharded when its
        row count is a multiple of ``P``.

        Examples:
          >>> mesh = jax.make_mesh((1,), ("x",))
          >>> g = shard_graph(np.array([[0.0, 1.0], [1.0, 0.0]]), mesh, "x")
          >>> g.apply(lambda mm, x: mm(x), [jnp.array([[1.0], [2.0]])])[0]
          Array([[2.],
                 [1.]], dtype=float32)
        """
        tables = list(tables)
        shapes = [jnp.shape(t) for t in tables]
        if any(len(s) != 2 for s in shapes) or len({s[1] for s in shapes}) > 1:
            raise ValueError(f"tables must be 2-D with a common width, got shapes {shapes}")
        if tuple(s[0] for s in shapes) != self.segments:
            raise ValueError(
                f"the tables' row counts {[s[0] for s in shapes]} do not match the ShardedGraph's "
                f"segments {list(self.segments)}"
            )
        mesh, axis, num_shards = self.mesh, self.axis_name, self.num_shards
        local = self.local_sizes
        n_local = sum(local)
        rows_spec = PSpec(axis, None)
        explicit = mesh.axis_types[mesh.axis_names.index(axis)] == jax.sharding.AxisType.Explicit
        # in explicit mode each result gets back its table's layout where that is on this
        # mesh (psi must not move a replicated table's update to rows: the step would recompile)
        layouts = [jax.typeof(t).sharding.spec
                   if explicit and jax.typeof(t).sharding.mesh.axis_names == mesh.axis_names
                   else None for t in tables]
        padded = []
        for t, s, m in zip(tables, self.segments, local, strict=True):
            if m * num_shards != s:
                if explicit:  # cannot pad along a sharded dim in explicit mode: replicate first
                    t = jax.sharding.reshard(t, NamedSharding(mesh, PSpec()))
                t = jnp.pad(t, ((0, m * num_shards - s), (0, 0)))
            if explicit:
                t = jax.sharding.reshard(t, NamedSharding(mesh, rows_spec))
            padded.append(t)
        splits = list(np.cumsum(local)[:-1])

        operands = [jnp.asarray(o) for o in operands]
        num_tables = len(padded)

        def body(idx, w, *args):
            idx, w = idx[0], w[0]
            blocks, extra = args[:num_tables], args[num_tables:]
            x = blocks[0] if len(blocks) == 1 else jnp.concatenate(blocks)

            def matmul(y):
                full = jax.lax.all_gather(y, axis, tiled=True)
                return sparse_matmul(idx, w, full, n_local, impl, blocked=self.host.blocked)

            y = fn(matmul, x, *extra)
            return tuple(jnp.split(y, splits)) if len(blocks) > 1 else (y,)

        outs = jax.shard_map(
            body,
            mesh=mesh,
            in_specs=(PSpec(axis), PSpec(axis)) + (rows_spec,) * num_tables
            + (PSpec(),) * len(operands),
            out_specs=(rows_spec,) * num_tables,
        )(self.indices, self.weights, *padded, *operands)
        result = []
        for o, s, m, layout in zip(outs, self.segments, local, layouts, strict=True):
            if m * num_shards != s:
                if explicit:
                    o = jax.sharding.reshard(o, NamedSharding(mesh, PSpec()))
                o = o[:s]
            if layout is not None and jax.typeof(o).sharding.spec != layout:
                o = jax.sharding.reshard(o, NamedSharding(mesh, layout))
            result.append(o)
        return result

    def matmul(self, y: jax.Array, impl: str | None = None) -> jax.Array:
        """``Ã @ y`` for a (num_nodes, d) ``y`` (split by ``segments``, then ``apply``).

        Examples:
          >>> mesh = jax.make_mesh((1,), ("x",))
          >>> shard_graph(np.ones((2, 2)), mesh, "x").matmul(jnp.array([[2.0], [4.0]]))
          Array([[3.],
                 [3.]], dtype=float32)
        """
        parts = jnp.split(y, np.cumsum(self.segments)[:-1]) if len(self.segments) > 1 else [y]
        out = self.apply(lambda mm, x: mm(x), parts, impl=impl)
        return out[0] if len(out) == 1 else jnp.concatenate(out)

    # -- device cache --------------------------------------------------------------------------
    def fresh(self) -> ShardedGraph:
        """New device arrays: each process uploads its own devices' blocks.

        Examples:
          >>> g = shard_graph(np.ones((2, 2)), jax.make_mesh((1,), ("x",)), "x")
          >>> g.fresh().weights is g.weights
          False
        """
        def put(host):
            return jax.make_array_from_callback(host.shape, self.host.sharding(host.ndim),
                                                lambda i: np.array(host[i]))

        return ShardedGraph(self.host, put(self.host.indices), put(self.host.weights),
                            put(self.host.tags))

    def uploaded(self) -> ShardedGraph:
        """Each device's block through ``jax.pure_callback`` in a ``shard_map`` (no constant
        when traced, e.g. in ``jax.jit(opt.init)``).

        Examples:
          >>> g = shard_graph(np.ones((2, 2)), jax.make_mesh((1,), ("x",)), "x")
          >>> bool(jnp.all(jax.jit(lambda: g.uploaded())().weights == g.weights))
          True
        """
        return self._from_host(None)

    def abstract(self) -> ShardedGraph:
        """``jax.ShapeDtypeStruct`` leaves (with their shardings): no device memory."""
        return ShardedGraph(self.host, *self.host.specs())

    def has_layout(self) -> bool:
        return leaves_match((self.indices, self.weights, self.tag), self.host.specs(sharded=False))

    def is_intact(self) -> jax.Array:
        """Scalar bool: right shapes/dtypes (trace time), every device's tag and probe weight
        intact.

        Examples:
          >>> g = shard_graph(np.ones((2, 2)), jax.make_mesh((1,), ("x",)), "x")
          >>> bool(g.is_intact()), bool(jax.tree.map(jnp.zeros_like, g).is_intact())
          (True, False)
        """
        if not self.has_layout():
            return jnp.asarray(False)
        host = self.host
        tags_ok = jnp.all(self.tag == host.tag)
        if not self.weights.shape[1]:
            return tags_ok
        probed = jnp.take_along_axis(self.weights, jnp.asarray(host.probe_slots)[:, None], 1)
        return tags_ok & jnp.all(probed[:, 0] == host.probe_values)

    def repaired(self) -> ShardedGraph:
        """Each device's block unchanged when its tag is intact, else re-uploaded from the host.

        A dtype/shape mismatch (trace time) re-uploads through ``fresh``-like callbacks; a tag
        mismatch (run time) through ``jax.pure_callback`` inside ``lax.cond`` in a
        ``shard_map``, each device fetching its own block.

        Examples:
          >>> g = shard_graph(np.ones((2, 2)), jax.make_mesh((1,), ("x",)), "x")
          >>> bool(jax.jit(lambda g: g.repaired())(jax.tree.map(jnp.zeros_like, g)).is_intact())
          True
        """
        if not self.has_layout():
            return self.uploaded()
        return _repaired_blocks(self.host, self.indices, self.weights, self.tag)

    def _from_host(self, leaves: tuple | None) -> ShardedGraph:
        """Blocks from the host: all of them (``leaves`` None), or where a tag/probe is broken."""
        host, axis = self.host, self.axis_name
        block_specs = tuple(jax.ShapeDtypeStruct((1,) + s.shape[1:], s.dtype)
                            for s in host.specs(sharded=False))

        def body(idx, w, tag):
            k = jax.lax.axis_index(axis)

            def upload():  # the callback's blocks differ per device: mark them varying
                return jax.lax.pcast(jax.pure_callback(host.block, block_specs, k), axis,
                                     to="varying")

            if idx is None:
                return upload()
            probe_ok = (w[0, jnp.asarray(host.probe_slots)[k]]
                        == jnp.asarray(host.probe_values)[k]) if w.shape[1] else True
            return jax.lax.cond((tag[0] == host.tag) & probe_ok, lambda: (idx, w, tag), upload)

        specs = (PSpec(axis),) * 3
        if leaves is None:
            out = jax.shard_map(lambda: body(None, None, None), mesh=self.mesh, in_specs=(),
                                out_specs=specs)()
        else:
            out = jax.shard_map(body, mesh=self.mesh, in_specs=specs, out_specs=specs)(*leaves)
        return ShardedGraph(host, *out)


@functools.partial(jax.jit, static_argnums=0)
def _repaired_blocks(host: HostBlocks, indices: jax.Array, weights: jax.Array,
                     tag: jax.Array) -> ShardedGraph:
    """``ShardedGraph.repaired``'s blocks, jitted per host layout (static: hashed by fingerprint,
    mesh and axis): un-jitted, an eager update traced and compiled the shard_map's ops again at
    every call (1.5-1.8 s at Beauty's size)."""
    return ShardedGraph(host, indices, weights, tag)._from_host((indices, weights, tag))


flax.serialization.register_serialization_state(
    ShardedGraph, lambda g: {"fingerprint": g.fingerprint}, check_fingerprint, override=True,
)


def shard_graph(
    adjacency: Any,
    mesh: Mesh,
    axis_name: str,
    segments: Sequence[int] | None = None,
) -> ShardedGraph:
    """Normalise (if raw) and split ``Ã = D^-1/2 A D^-1/2`` by rows across ``mesh``'s ``axis_name``.

    ``adjacency``: as for ``sevo_smooth`` (raw scipy / numpy / BCOO, or a ``NormalizedGraph``);
    it is normalised on the host and each process uploads only its own devices' edge blocks
    (``jax.make_array_from_callback``), so this works unchanged on several hosts. ``segments``:
    the row counts of the tables that will be stacked on it, in order (default: one table of
    all the nodes); each is blocked across the axis separately (module docstring).

    Examples:
      >>> g = shard_graph(np.ones((3, 3)), jax.make_mesh((1,), ("x",)), "x")
      >>> g
      ShardedGraph(num_nodes=3, segments=(3,), nnz=9, axis='x' x 1, edges_per_shard=9)
    """
    check_axis(mesh, axis_name)
    return shard_normalized(normalized_scipy(adjacency), mesh, axis_name, segments)


def shard_normalized(
    normalized: sp.spmatrix, mesh: Mesh, axis_name: str, segments: Sequence[int] | None
) -> ShardedGraph:
    """``shard_graph`` of an ALREADY-normalised scipy matrix (no validation, no normalisation).

    Examples:
      >>> g = shard_normalized(sp.csr_matrix(np.eye(2)), jax.make_mesh((1,), ("x",)), "x", (1, 1))
      >>> g.segments, g.nnz
      ((1, 1), 2)
    """
    num_shards = int(mesh.shape[axis_name])
    a = sp.coo_matrix(normalized)
    n = a.shape[0]
    segments = (n,) if segments is None else tuple(int(s) for s in segments)
    if any(s < 0 for s in segments) or sum(segments) != n:
        raise ValueError(
            f"segments {segments} must be non-negative and sum to the graph's {n} nodes"
        )
    local = local_sizes(segments, num_shards)
    n_local = sum(local)
    if num_shards * n_local >= 2**31:
        raise ValueError(f"{num_shards * n_local} padded nodes do not fit int32 indices")
    pos = device_major_positions(segments, num_shards)
    keep = a.data != 0
    rows, cols, data = pos[a.row[keep]], pos[a.col[keep]], a.data[keep].astype(np.float32)
    device, local_row = np.divmod(rows, max(n_local, 1))
    order = np.lexsort((cols, local_row, device))
    device, local_row, cols, data = device[order], local_row[order], cols[order], data[order]
    counts = np.bincount(device, minlength=num_shards)
    e_max = max(1, int(counts.max()) if counts.size else 1)
    slot = np.arange(device.size) - np.concatenate([[0], np.cumsum(counts)[:-1]])[device]
    idx = np.empty((num_shards, e_max, 2), np.int32)
    idx[..., 0], idx[..., 1] = n_local, 0  # padding: out-of-range row, weight 0
    w = np.zeros((num_shards, e_max), np.float32)
    idx[device, slot, 0], idx[device, slot, 1], w[device, slot] = local_row, cols, data
    blocked = None
    if default_matmul_impl() == "chunked" and data.size:
        idx, w, blocked = _block_every_device(idx, w, counts, n_local)
    host = HostBlocks(idx, w, segments, mesh, axis_name, int(data.size), e_max, blocked)
    return ShardedGraph(host, None, None, None).fresh()


def _block_every_device(indices: np.ndarray, weights: np.ndarray, counts: np.ndarray,
                        n_local: int) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """Every device's edge list (its first ``counts[k]`` slots) as ``blocked_coo``'s blocks, as
    ``NormalizedGraph`` holds them on CPU, padded to one block count ``T`` (the largest: a power
    of two or a multiple of ``MAX_CHUNK_BLOCKS``, so every device's chunks divide it) with
    weight-0 blocks aimed at row ``n_local`` (out of range: dropped). Returns the stacked
    ``(P, T, 1 + block)`` blocks, ``(P, T * block)`` weights and ``(block, most used blocks)``.
    """
    per_device = [blocked_coo(indices[k, :c], weights[k, :c], n_local)
                  for k, c in enumerate(counts.tolist())]
    total = max(b.shape[0] for b, _, _ in per_device)
    used = max(u for _, _, u in per_device)
    blocks = np.zeros((len(per_device), total, 1 + MATMUL_BLOCK), np.int32)
    blocks[:, :, 0] = n_local
    out_weights = np.zeros((len(per_device), total * MATMUL_BLOCK), np.float32)
    for k, (b, bw, _) in enumerate(per_device):
        blocks[k, : b.shape[0]], out_weights[k, : bw.size] = b, bw
    return blocks, out_weights, (MATMUL_BLOCK, used)
