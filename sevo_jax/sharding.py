"""Row-sharded SEvo: psi over a mesh axis, for embedding tables too large for one device.

``sevo_smooth(..., mesh=mesh, axis_name="x")`` (and ``sevo_adamw``/``sevo_adam``/``sevo_sgd``
with the same keywords) splits the masked tables' rows and the graph's rows across the mesh
axis ``"x"`` of size ``P`` and runs psi's L sparse matmuls under one ``jax.shard_map``.

Layout. Each smoothed table of ``s`` rows is cut into ``P`` contiguous blocks of
``m = ceil(s / P)`` rows (the last ones padded with zero rows when ``P`` does not divide
``s``), which is exactly how ``NamedSharding(mesh, P("x", None))`` lays the table out, so
device ``k`` already holds block ``k`` of every table and the stacked signal it works on is
the concatenation of those local blocks (users block ``k``, then items block ``k``): no
resharding of the tables, even when several are smoothed jointly. The ``ShardedGraph``
renumbers the nodes into that device-major order (``k * n_local + local row``, with
``n_local`` the sum of the tables' ``m``), gives device ``k`` the edges whose ROW it owns
(local row, global column, weight), pads every device's edge list to the same length ``E_max``
with weight-0 edges aimed at an out-of-range row (dropped by the scatter) and stacks them into
arrays of shape ``(P, E_max, ...)`` sharded on their leading axis. Padding rows have no edges
in or out, start at zero and are sliced off, so they never leak into real rows. One layer is
an ``all_gather`` of the (n_local, d) local signal into the full (P * n_local, d) one (the only
communication), then the local sparse product (``smoothing.sparse_matmul``, by backend) into the local rows;
the whole recursion ``Y_l = a X + beta Ã Y_{l-1}`` (``smoothing.psi_recursion``, the same
arithmetic as ``propagate``) runs inside the one ``shard_map``. Memory per device: its edge
block plus one gathered (P * n_local, d) signal at a time.

Output sharding. A smoothed table whose row count is a multiple of ``P`` leaves the update
with ``NamedSharding(mesh, P(axis_name, None))``, like the input. JAX cannot shard a table
evenly whose row count ``P`` does not divide; psi still works (padded inside, sliced back)
but the output's sharding is then left to XLA (on CPU it comes out replicated), and with an
``Explicit`` axis the table is first replicated to be padded. For real row-sharding pad such
tables: ``pad_rows(n, P)`` gives the row count to allocate and ``pad_adjacency`` inserts the
matching isolated nodes into the graph (they never influence real rows).

One host, several GPUs (``Auto`` axes let the model's own ``table[ids]`` gathers compile
unchanged; ``Explicit`` axes, ``jax.make_mesh``'s default, work too but make JAX ask the model
code for output shardings of such gathers)::

    mesh = jax.make_mesh((jax.device_count(),), ("x",), axis_types=(AxisType.Auto,))
    table = jax.device_put(table, row_sharding(mesh, "x"))   # rows a multiple of the axis size
    opt = sj.sevo_adamw(1e-3, adjacency, mesh=mesh, axis_name="x", mask=mask)
    state = opt.init(params)                                 # builds the ShardedGraph once

Several hosts: call ``jax.distributed.initialize()`` first on every process, build the same
``adjacency`` on every process (each process only uploads the edge blocks of its own devices,
through ``jax.make_array_from_callback``), and use a global mesh over ``jax.devices()``
(``jax.make_mesh`` does that); the tables are global ``jax.Array`` s created with
``row_sharding(mesh, axis)`` (e.g. ``jax.make_array_from_callback`` or a jitted init with
``out_shardings``). Nothing in the update fetches a global array to the host.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.sparse as sp
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as PSpec

from sevo_jax import smoothing

__all__ = [
    "MeshPlan",
    "ShardedGraph",
    "StepShardings",
    "build_mesh",
    "check_axis",
    "pad_adjacency",
    "pad_rows",
    "parse_mesh_spec",
    "propagate_sharded",
    "row_sharding",
    "shard_graph",
    "sharded_sevo_smooth",
    "to_host",
]


def check_axis(mesh: Any, axis_name: Any) -> int:
    """Validate ``mesh``/``axis_name`` and return the axis size ``P``."""
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


def row_sharding(mesh: Mesh, axis_name: str) -> NamedSharding:
    """``NamedSharding(mesh, P(axis_name, None))``: a table's rows split across ``axis_name``."""
    check_axis(mesh, axis_name)
    return NamedSharding(mesh, PSpec(axis_name, None))


def pad_rows(n: int, multiple: int) -> int:
    """The smallest multiple of ``multiple`` that is >= ``n``: the rows to allocate for a table
    of ``n`` real rows so that it can be row-sharded over an axis of size ``multiple``."""
    n, multiple = int(n), int(multiple)
    if n < 0 or multiple < 1:
        raise ValueError(f"need n >= 0 and multiple >= 1, got n={n}, multiple={multiple}")
    return -(-n // multiple) * multiple


def pad_adjacency(adjacency: Any, segments: Sequence[int], multiple: int) -> sp.csr_matrix:
    """Insert isolated nodes so each table's node block grows to ``pad_rows(size, multiple)``.

    ``segments`` are the tables' row counts in stacking order (summing to the node count);
    after table ``t``'s nodes, ``pad_rows(segments[t], multiple) - segments[t]`` isolated nodes
    are inserted. Pass a RAW adjacency (scipy sparse or dense numpy); the result is raw too.
    Isolated nodes do not change the normalisation of the others and never mix with them:
    psi maps an isolated row to a multiple of itself (zero for the zero gradient of a padding
    row that is never looked up).
    """
    a = sp.csr_matrix(adjacency)
    segments = [int(s) for s in segments]
    if sum(segments) != a.shape[0] or a.shape[0] != a.shape[1]:
        raise ValueError(
            f"segments {segments} must sum to the node count of the square adjacency {a.shape}"
        )
    new_sizes = [pad_rows(s, multiple) for s in segments]
    new_start = np.cumsum([0] + new_sizes)[:-1]
    mapping = np.concatenate(
        [np.zeros(0, np.int64)] + [np.arange(s) + ns for s, ns in zip(segments, new_start)]
    ).astype(np.int64)
    coo = a.tocoo()
    n_new = int(sum(new_sizes))
    return sp.csr_matrix(
        (coo.data, (mapping[coo.row], mapping[coo.col])), shape=(n_new, n_new)
    )


def _local_sizes(segments: Sequence[int], num_shards: int) -> tuple[int, ...]:
    return tuple(-(-int(s) // num_shards) for s in segments)


def _device_major_positions(segments: Sequence[int], num_shards: int) -> np.ndarray:
    """Node i (stacked order) -> its row in the all-gathered (P * n_local, d) signal."""
    local = _local_sizes(segments, num_shards)
    n_local = sum(local)
    pos = np.empty(int(sum(segments)), np.int64)
    start, offset = 0, 0
    for s, m in zip(segments, local):
        o = np.arange(s, dtype=np.int64)
        pos[start : start + s] = (o // m) * n_local + offset + o % m
        start += s
        offset += m
    return pos


@jax.tree_util.register_pytree_with_keys_class
class ShardedGraph:
    """``Ã`` split by rows across one mesh axis (module docstring): a pytree of two arrays.

    ``indices`` is (P, E_max, 2) int32 ``(local row, column in the device-major gathered
    signal)``, ``weights`` (P, E_max) float32, both sharded ``NamedSharding(mesh, P(axis))``.
    Padding edges have weight 0 and local row ``n_local`` (out of range, dropped). Static:
    ``segments`` (the row counts of the tables stacked on it, in order; ``num_nodes`` is their
    sum), ``mesh``, ``axis_name``, ``nnz`` (real edges). Build it with ``shard_graph``.
    """

    def __init__(
        self,
        indices: jax.Array,
        weights: jax.Array,
        segments: Sequence[int],
        mesh: Mesh,
        axis_name: str,
        nnz: int,
    ):
        self.indices = indices
        self.weights = weights
        self.segments = tuple(int(s) for s in segments)
        self.mesh = mesh
        self.axis_name = axis_name
        self.nnz = int(nnz)

    def tree_flatten_with_keys(self):
        keys = (jax.tree_util.GetAttrKey("indices"), jax.tree_util.GetAttrKey("weights"))
        aux = (self.segments, self.mesh, self.axis_name, self.nnz)
        return tuple(zip(keys, (self.indices, self.weights))), aux

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children, *aux)

    @property
    def num_nodes(self) -> int:
        return sum(self.segments)

    @property
    def num_shards(self) -> int:
        return int(self.mesh.shape[self.axis_name])

    @property
    def local_sizes(self) -> tuple[int, ...]:
        """Rows of each table held per device (``ceil(segment / P)``)."""
        return _local_sizes(self.segments, self.num_shards)

    @property
    def edges_per_shard(self) -> int:
        """``E_max``: the padded length of every device's edge list."""
        return int(self.weights.shape[1])

    def __repr__(self) -> str:
        return (
            f"ShardedGraph(num_nodes={self.num_nodes}, segments={self.segments}, "
            f"nnz={self.nnz}, axis={self.axis_name!r} x {self.num_shards}, "
            f"edges_per_shard={self.edges_per_shard})"
        )


flax.serialization.register_serialization_state(
    ShardedGraph,
    lambda g: {"indices": g.indices, "weights": g.weights},
    lambda g, d: ShardedGraph(
        jax.device_put(d["indices"], g.indices.sharding),
        jax.device_put(d["weights"], g.weights.sharding),
        g.segments,
        g.mesh,
        g.axis_name,
        g.nnz,
    ),
)


def shard_graph(
    adjacency: Any,
    mesh: Mesh,
    axis_name: str,
    segments: Sequence[int] | None = None,
) -> ShardedGraph:
    """Normalise (if raw) and split a graph by rows across ``mesh``'s axis ``axis_name``.

    ``adjacency``: as for ``sevo_smooth`` (raw scipy / numpy / BCOO, or a ``NormalizedGraph``);
    it is normalised on the host and each process uploads only its own devices' edge blocks
    (``jax.make_array_from_callback``), so this works unchanged on several hosts. ``segments``:
    the row counts of the tables that will be stacked on it, in order (default: one table of
    all the nodes); each is blocked across the axis separately (module docstring).
    """
    check_axis(mesh, axis_name)
    return _shard_normalized(smoothing.normalized_scipy(adjacency), mesh, axis_name, segments)


def _shard_normalized(
    normalized: sp.spmatrix, mesh: Mesh, axis_name: str, segments: Sequence[int] | None
) -> ShardedGraph:
    """``shard_graph`` of an already-normalised scipy matrix."""
    num_shards = int(mesh.shape[axis_name])
    a = sp.coo_matrix(normalized)
    n = a.shape[0]
    segments = (n,) if segments is None else tuple(int(s) for s in segments)
    if any(s < 0 for s in segments) or sum(segments) != n:
        raise ValueError(
            f"segments {segments} must be non-negative and sum to the graph's {n} nodes"
        )
    local = _local_sizes(segments, num_shards)
    n_local = sum(local)
    if num_shards * n_local >= 2**31:
        raise ValueError(f"{num_shards * n_local} padded nodes do not fit int32 indices")
    pos = _device_major_positions(segments, num_shards)
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
    sharding = NamedSharding(mesh, PSpec(axis_name))
    put = lambda host: jax.make_array_from_callback(host.shape, sharding, lambda i: host[i])
    return ShardedGraph(put(idx), put(w), segments, mesh, axis_name, int(data.size))


def _is_explicit(mesh: Mesh, axis_name: str) -> bool:
    axis_type = mesh.axis_types[mesh.axis_names.index(axis_name)]
    return axis_type == jax.sharding.AxisType.Explicit


def propagate_sharded(
    graph: ShardedGraph,
    tables: jax.Array | Sequence[jax.Array],
    beta: float = 0.99,
    num_layers: int = 3,
    approx: str = "neumann",
    *,
    impl: str | None = None,
) -> jax.Array | list[jax.Array]:
    """psi of the stacked ``tables`` (one per ``graph.segments``), computed row-sharded.

    Equals ``smoothing.propagate`` on the row-wise concatenation, split back. Returns one
    array (when given one) or a list, each in its table's dtype; a table whose row count is a
    multiple of the axis size comes back ``NamedSharding(mesh, P(axis, None))``.
    ``impl``: the local sparse product, one of ``smoothing.MATMUL_IMPLS``; None picks by backend.
    """
    smoothing._check_hyperparameters(beta, num_layers, approx)
    smoothing._check_impl(impl)
    single = not isinstance(tables, (list, tuple))
    tables = [tables] if single else list(tables)
    shapes = [jnp.shape(t) for t in tables]
    if any(len(s) != 2 for s in shapes) or len({s[1] for s in shapes}) > 1:
        raise ValueError(f"tables must be 2-D with a common width, got shapes {shapes}")
    if tuple(s[0] for s in shapes) != graph.segments:
        raise ValueError(
            f"the tables' row counts {[s[0] for s in shapes]} do not match the ShardedGraph's "
            f"segments {list(graph.segments)}"
        )
    mesh, axis, num_shards = graph.mesh, graph.axis_name, graph.num_shards
    local = graph.local_sizes
    n_local = sum(local)
    compute_dtype = jnp.promote_types(jnp.result_type(*tables), jnp.float32)
    rows_spec = PSpec(axis, None)
    explicit = _is_explicit(mesh, axis)
    padded = []
    for t, s, m in zip(tables, graph.segments, local):
        t = t.astype(compute_dtype)
        if m * num_shards != s:
            if explicit:  # cannot pad along a sharded dim in explicit mode: replicate first
                t = jax.sharding.reshard(t, NamedSharding(mesh, PSpec()))
            t = jnp.pad(t, ((0, m * num_shards - s), (0, 0)))
        if explicit:
            t = jax.sharding.reshard(t, NamedSharding(mesh, rows_spec))
        padded.append(t)
    splits = list(np.cumsum(local)[:-1])

    def body(idx, w, *blocks):
        idx, w = idx[0], w[0]
        x = blocks[0] if len(blocks) == 1 else jnp.concatenate(blocks)

        def matmul(y):
            full = jax.lax.all_gather(y, axis, tiled=True)
            return smoothing.sparse_matmul(idx, w, full, n_local, impl)

        y = smoothing.psi_recursion(matmul, x, beta, num_layers, approx)
        return tuple(jnp.split(y, splits)) if len(blocks) > 1 else (y,)

    fn = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(PSpec(axis), PSpec(axis)) + (rows_spec,) * len(padded),
        out_specs=(rows_spec,) * len(padded),
    )
    outs = fn(graph.indices, graph.weights, *padded)
    result = []
    for o, t, s, m in zip(outs, tables, graph.segments, local):
        if m * num_shards != s:
            if explicit:
                o = jax.sharding.reshard(o, NamedSharding(mesh, PSpec()))
            o = o[:s]
        result.append(o.astype(jnp.result_type(t)))
    return result[0] if single else result


def sharded_sevo_smooth(
    adjacency: Any,
    beta: float = 0.99,
    num_layers: int = 3,
    *,
    approx: str = "neumann",
    mask: Any = None,
    mesh: Mesh | None = None,
    axis_name: str | None = None,
    impl: str | None = None,
) -> optax.GradientTransformation:
    """``sevo_smooth(..., mesh=, axis_name=)``: psi row-sharded across ``mesh``'s ``axis_name``.

    The graph is normalised on the host here; the ``ShardedGraph`` is built at ``init`` (its
    blocking depends on the masked tables' row counts) and carried in ``SEvoSmoothState`` so
    that jit receives it as a sharded argument. A ``ShardedGraph`` may be passed as
    ``adjacency`` (its mesh and axis are then used; ``mesh``/``axis_name`` may be omitted).
    """
    smoothing._check_hyperparameters(beta, num_layers, approx)
    if isinstance(adjacency, ShardedGraph):
        if mesh is None and axis_name is None:
            mesh, axis_name = adjacency.mesh, adjacency.axis_name
        if (mesh, axis_name) != (adjacency.mesh, adjacency.axis_name):
            raise ValueError(
                f"mesh/axis_name ({axis_name!r}) differ from the ShardedGraph's "
                f"({adjacency.axis_name!r})"
            )
    if mesh is None:
        raise ValueError(f"axis_name={axis_name!r} was given without a mesh")
    check_axis(mesh, axis_name)
    if isinstance(adjacency, ShardedGraph):
        prebuilt, host = adjacency, None
    else:
        prebuilt, host = None, smoothing.normalized_scipy(adjacency)
    num_nodes = prebuilt.num_nodes if prebuilt is not None else host.shape[0]
    cache: dict[tuple[int, ...], ShardedGraph] = {}

    def segments_of(tree, flags):
        leaves = jax.tree_util.tree_leaves(tree)
        return tuple(int(jnp.shape(x)[0]) for x, f in zip(leaves, flags) if f)

    def init_fn(params):
        flags = smoothing._broadcast_mask(mask, params)
        smoothing._check_selection(params, flags, num_nodes)
        segments = segments_of(params, flags)
        if prebuilt is not None:
            if prebuilt.segments != segments:
                raise ValueError(
                    f"the ShardedGraph was built for tables of {list(prebuilt.segments)} rows, "
                    f"the masked tables have {list(segments)}"
                )
            return smoothing.SEvoSmoothState(graph=prebuilt)
        if segments not in cache:
            cache[segments] = _shard_normalized(host, mesh, axis_name, segments)
        return smoothing.SEvoSmoothState(graph=cache[segments])

    def update_fn(updates, state, params=None):
        del params
        graph = state.graph
        flags = smoothing._broadcast_mask(mask, updates)
        smoothing._check_selection(updates, flags, graph.num_nodes)
        leaves, treedef = jax.tree_util.tree_flatten(updates)
        chosen = [x for x, f in zip(leaves, flags) if f]
        if tuple(x.shape[0] for x in chosen) != graph.segments:
            raise ValueError(
                f"the masked tables have {[x.shape[0] for x in chosen]} rows but the state's "
                f"ShardedGraph was built (at init) for {list(graph.segments)}"
            )
        smoothed = iter(propagate_sharded(graph, chosen, beta, num_layers, approx, impl=impl))
        out = [next(smoothed) if f else x for x, f in zip(leaves, flags)]
        return jax.tree_util.tree_unflatten(treedef, out), state

    return optax.GradientTransformation(init_fn, update_fn)


# ---- a training run's placement -----------------------------------------------------------------


def parse_mesh_spec(spec: str) -> tuple[str, int]:
    """``"NAME=SIZE"`` (one mesh axis, e.g. ``"data=8"``) -> ``(NAME, SIZE)``."""
    match = re.fullmatch(r"\s*([A-Za-z_]\w*)\s*=\s*([0-9]+)\s*", str(spec))
    if match is None or int(match.group(2)) < 1:
        raise ValueError(f"mesh must be NAME=SIZE with one axis and SIZE >= 1 (e.g. data=8), "
                         f"got {spec!r}")
    return match.group(1), int(match.group(2))


def build_mesh(spec: str) -> Mesh:
    """A one-axis ``Auto`` mesh over the first SIZE of ``jax.devices()`` (SIZE must divide
    ``jax.device_count()``). ``Auto``, not ``Explicit``: the models' ``table[ids]`` gathers then
    compile unchanged (``sevo_jax.sharding``)."""
    name, size = parse_mesh_spec(spec)
    count = jax.device_count()
    if count % size:
        raise ValueError(f"mesh {spec!r}: SIZE {size} must equal or divide the number of "
                         f"devices, jax.device_count() = {count}")
    if jax.process_count() > 1 and size != count:
        raise ValueError(f"mesh {spec!r}: on several processes SIZE must equal "
                         f"jax.device_count() = {count} (every process needs devices in it)")
    return jax.make_mesh((size,), (name,), axis_types=(AxisType.Auto,),
                         devices=jax.devices()[:size])


def to_host(tree: Any) -> Any:
    """``jax.device_get``; on several processes, gathers every (global) array to each host."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    def get(x):  # a global array: its whole value on every host; anything local: as is
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return jax.device_get(x)

    return jax.tree_util.tree_map(get, tree)


class StepShardings(NamedTuple):
    """Shardings of a train step: params and state keep theirs, the batch is split by examples,
    the dropout key and the loss are replicated."""

    params: Any
    opt_state: Any
    batch: NamedSharding
    replicated: NamedSharding


@dataclasses.dataclass(frozen=True)
class MeshPlan:
    """Where each array of a sharded run lives, on a one-axis mesh of size ``P``.

    * the tables selected by ``table_mask`` (the trainer passes ``models.sevo_mask``: the
      SASRec/GRU4Rec item table, both MF-BPR tables), padded with zero rows to a multiple of
      ``P``: ``P(axis, None)`` (by rows);
    * their optimizer-state leaves (Adam moments...): the sharding of the param they mirror
      (matched by key path); the SEvo ``ShardedGraph`` keeps its own ``P(axis)`` layout;
    * batches: ``P(axis)`` on the leading (example) dimension; everything else replicated.
    """

    mesh: Mesh
    table_mask: Callable[[Any], Any]  # params -> pytree of bools: the row-sharded tables

    @property
    def axis(self) -> str:
        return self.mesh.axis_names[0]

    @property
    def size(self) -> int:
        return int(self.mesh.shape[self.axis])

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PSpec())

    @property
    def rows(self) -> NamedSharding:
        return NamedSharding(self.mesh, PSpec(self.axis, None))

    @property
    def batch(self) -> NamedSharding:
        return NamedSharding(self.mesh, PSpec(self.axis))

    def table_rows(self, params: Any) -> list[int]:
        """Row counts of the sharded tables, in pytree-flatten order (the graph's segments)."""
        flags = jax.tree_util.tree_leaves(self.table_mask(params))
        return [int(x.shape[0]) for x, f in zip(jax.tree_util.tree_leaves(params), flags) if f]

    def pad_params(self, params: Any) -> Any:
        """Append zero rows to each table up to a multiple of ``P`` (a no-op if it divides)."""
        def pad(x, is_table):
            extra = pad_rows(x.shape[0], self.size) - x.shape[0] if is_table else 0
            return jnp.pad(x, ((0, extra),) + ((0, 0),) * (x.ndim - 1)) if extra else x
        return jax.tree_util.tree_map(pad, params, self.table_mask(params))

    def pad_adjacency(self, adjacency: Any, params: Any) -> sp.csr_matrix:
        """The raw graph with isolated nodes for the padding rows ``pad_params`` adds."""
        return pad_adjacency(adjacency, self.table_rows(params), self.size)

    def param_shardings(self, params: Any) -> Any:
        return jax.tree_util.tree_map(lambda f: self.rows if f else self.replicated,
                                      self.table_mask(params))

    def state_shardings(self, opt_state: Any, params: Any) -> Any:
        """A leaf whose key path ENDS with a param's path and has its shape gets that param's
        sharding; arrays already laid out on this mesh (the ``ShardedGraph``) keep theirs."""
        param_sh = self.param_shardings(params)
        by_path = {tuple(path): (np.shape(leaf), sh) for (path, leaf), sh in zip(
            jax.tree_util.tree_flatten_with_path(params)[0], jax.tree_util.tree_leaves(param_sh))}

        def pick(path, leaf):
            for k in range(len(path)):
                hit = by_path.get(tuple(path[k:]))
                if hit is not None and hit[0] == np.shape(leaf):
                    return hit[1]
            sh = getattr(leaf, "sharding", None)
            if isinstance(sh, NamedSharding) and sh.mesh == self.mesh:
                return sh
            return self.replicated

        return jax.tree_util.tree_map_with_path(pick, opt_state)

    def step_shardings(self, params: Any, opt_state: Any) -> "StepShardings":
        """The layout of a train step's arguments and results under this plan."""
        return StepShardings(self.param_shardings(params), self.state_shardings(opt_state, params),
                             self.batch, self.replicated)

    def put(self, tree: Any, shardings: Any) -> Any:
        """Place host or device arrays with ``shardings`` (a matching tree or one sharding).
        Host data goes through ``jax.make_array_from_callback``: each process uploads only its
        own devices' pieces, so this also works on several hosts (same values on each)."""
        def put(x, sh):
            if isinstance(x, jax.Array):
                if x.sharding.is_equivalent_to(sh, x.ndim):
                    return x
                if not x.is_fully_addressable:
                    return jax.device_put(x, sh)
            host = np.asarray(x)
            return jax.make_array_from_callback(host.shape, sh, lambda idx: host[idx])

        if isinstance(shardings, jax.sharding.Sharding):
            return jax.tree_util.tree_map(lambda x: put(x, shardings), tree)
        return jax.tree_util.tree_map(put, tree, shardings)
