"""Where a training run's arrays live on a one-axis mesh (the trainer's placement).

``MeshPlan`` row-shards the embedding tables SEvo smooths (``P(axis, None)``) and their
optimizer-state moments, splits batches by examples and replicates the rest; ``build_mesh`` /
``parse_mesh_spec`` turn ``--mesh NAME=SIZE`` into a ``jax.sharding.Mesh``; ``pad_rows`` /
``pad_adjacency`` pad tables (and their graph) to a multiple of the axis size. The row-sharded
psi itself lives in the library core (``sevo_jax.operator_sharded.ShardedGraph``, used by
``sevo_smooth(mesh=, axis_name=)``); this module only imports from it.

One host, several GPUs (``Auto`` axes let the model's own ``table[ids]`` gathers compile
unchanged; ``Explicit`` axes, ``jax.make_mesh``'s default, work too but make JAX ask the model
code for output shardings of such gathers)::

    mesh = jax.make_mesh((jax.device_count(),), ("x",), axis_types=(AxisType.Auto,))
    table = jax.device_put(table, row_sharding(mesh, "x"))   # rows a multiple of the axis size
    opt = sj.sevo_adamw(1e-3, adjacency, mesh=mesh, axis_name="x", mask=mask)
    state = opt.init(params)                                 # builds the ShardedGraph once

Several hosts: call ``jax.distributed.initialize()`` first on every process, build the same
``adjacency`` on every process and use a global mesh over ``jax.devices()``
(``jax.make_mesh`` does that); the tables are global ``jax.Array`` s created with
``row_sharding(mesh, axis)``. Nothing in the update fetches a global array to the host.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.sparse as sp
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as PSpec

from sevo_jax.operator_sharded import check_axis

__all__ = [
    "MeshPlan",
    "StepShardings",
    "build_mesh",
    "pad_adjacency",
    "pad_rows",
    "parse_mesh_spec",
    "row_sharding",
]


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
        [np.zeros(0, np.int64)]
        + [np.arange(s) + ns for s, ns in zip(segments, new_start, strict=True)]
    ).astype(np.int64)
    coo = a.tocoo()
    n_new = int(sum(new_sizes))
    return sp.csr_matrix(
        (coo.data, (mapping[coo.row], mapping[coo.col])), shape=(n_new, n_new)
    )


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
        leaves = jax.tree_util.tree_leaves(params)
        return [int(x.shape[0]) for x, f in zip(leaves, flags, strict=True) if f]

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

    def state_shardings(self, opt_state: Any, params: Any, optimizer: Any = None) -> Any:
        """Shardings of ``opt_state``: every copy of the params in it (Adam moments...) gets the
        params' shardings, found by ``optax.tree_utils.tree_map_params(optimizer, ...)``;
        other leaves keep a ``NamedSharding`` they already have on this mesh (the SEvo
        ``ShardedGraph``) or are replicated.

        Without ``optimizer`` (older callers), a leaf whose key path ENDS with a param's path
        and has its shape gets that param's sharding."""
        param_sh = self.param_shardings(params)

        def own_or_replicated(leaf):
            sh = getattr(leaf, "sharding", None)
            if isinstance(sh, NamedSharding) and sh.mesh == self.mesh:
                return sh
            return self.replicated

        if optimizer is not None:
            return optax.tree_utils.tree_map_params(
                optimizer, lambda _, sh: sh, opt_state, param_sh,
                transform_non_params=lambda x: jax.tree.map(own_or_replicated, x))
        by_path = {tuple(path): (np.shape(leaf), sh) for (path, leaf), sh in zip(
            jax.tree_util.tree_flatten_with_path(params)[0], jax.tree_util.tree_leaves(param_sh),
            strict=True)}

        def pick(path, leaf):
            for k in range(len(path)):
                hit = by_path.get(tuple(path[k:]))
                if hit is not None and hit[0] == np.shape(leaf):
                    return hit[1]
            return own_or_replicated(leaf)

        return jax.tree_util.tree_map_with_path(pick, opt_state)

    def step_shardings(self, params: Any, opt_state: Any, optimizer: Any = None) -> StepShardings:
        """The layout of a train step's arguments and results under this plan."""
        return StepShardings(self.param_shardings(params),
                             self.state_shardings(opt_state, params, optimizer),
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
