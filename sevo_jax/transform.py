"""``sevo_smooth``: SEvo's psi as an Optax ``GradientTransformation`` over selected tables.

SEvo (Structure-aware Embedding Evolution, arXiv 2310.03032) replaces the update ``X`` of the
embedding tables chosen by ``mask`` by ``psi(X)`` (``sevo_jax.psi``), the L-layer approximation
of ``(1-beta)(I - beta Ã)^-1 X``. The chosen tables are stacked row-wise (pytree-flatten order)
as one signal over the graph's nodes, so one graph can span several tables (users then items).

State. ``SEvoSmoothState.graph`` is the ``GraphOperator``, carried so that ``jax.jit``
receives it as an argument; it is a device cache of the host graph that ``update`` validates
and repairs (``sevo_jax.operator``): a ``zeros_like`` reset, an ``optax.tree.cast`` or a
donated state all behave like a fresh ``init``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sevo_jax.operator import (
    GraphOperator,
    NormalizedGraph,
    as_normalized_graph,
    check_impl,
    memo_by_adjacency,
    normalized_scipy,
)
from sevo_jax.operator_sharded import ShardedGraph, check_axis, shard_normalized
from sevo_jax.psi import check_hyperparameters, is_concrete, propagate

__all__ = [
    "MaskOrFn",
    "SEvoSmoothState",
    "check_mask_argument",
    "check_selection",
    "has_leaves",
    "mask_flags",
    "mask_tree",
    "sevo_smooth",
    "smoothness",
]

MaskOrFn = Any  # a pytree of bools matching (a prefix of) the params, or a callable returning one


class SEvoSmoothState(NamedTuple):
    """State of ``sevo_smooth``: the graph operator (a device cache, module docstring).

    A ``NormalizedGraph``, or a ``ShardedGraph`` when row-sharded.
    """

    graph: GraphOperator


def has_leaves(tree: Any) -> bool:
    """False for a tree with no array leaves (e.g. Optax's params placeholder in
    ``optax.tree_utils.tree_map_params``), where ``init`` can only give the state's structure.

    Examples:
      >>> has_leaves({"a": jnp.ones(2)}), has_leaves({})
      (True, False)
    """
    return bool(jax.tree_util.tree_leaves(tree))


def check_mask_argument(name: str, mask: Any) -> None:
    """Raise ``TypeError`` on a mask argument that is one bool or one array.

    A mask is a pytree of bools over the params (or a prefix of it), a callable returning one,
    or None. Optax reads a lone bool as a prefix for every leaf, but here a lone bool is what
    ``optax.inject_hyperparams`` makes of a callable mask: it takes every callable for a
    schedule and calls it with the step count, so ``lambda p: jax.tree.map(..., p)`` returns one
    bool for the count and silently selects every leaf or none. None selects every leaf;
    ``weight_decay=0`` or an all-False pytree, none.

    Examples:
      >>> check_mask_argument("decay_mask", {"emb": True, "bias": False})
      >>> check_mask_argument("decay_mask", False)
      Traceback (most recent call last):
      ...
      TypeError: decay_mask is one bool (False), not a pytree of bools or a callable: under optax.inject_hyperparams a callable decay_mask is called with the step count (a schedule), so name it in static_args, e.g. inject_hyperparams(sevo_adamw, static_args=('decay_mask',)); for every leaf pass None
    """  # noqa: E501
    if isinstance(mask, (bool, np.bool_, np.ndarray, jax.Array)):
        kind = "bool" if isinstance(mask, (bool, np.bool_)) or mask.dtype == bool else "array"
        shown = mask if isinstance(mask, (bool, np.bool_)) else f"shape {np.shape(mask)}"
        raise TypeError(
            f"{name} is one {kind} ({shown}), not a pytree of bools or a callable: under "
            f"optax.inject_hyperparams a callable {name} is called with the step count (a "
            f"schedule), so name it in static_args, e.g. inject_hyperparams(sevo_adamw, "
            f"static_args=('{name}',)); for every leaf pass None")


def mask_flags(mask: MaskOrFn, tree: Any) -> list[bool]:
    """One static bool per leaf of ``tree``: the Optax-style ``mask`` broadcast over it.

    ``mask`` is a pytree of bools with the structure of ``tree`` or a prefix of it, a callable
    ``tree -> mask``, or None (every leaf).

    Examples:
      >>> params = {"emb": jnp.ones((3, 2)), "mlp": [jnp.ones(2)] * 2}
      >>> mask_flags({"emb": True, "mlp": False}, params)
      [True, False, False]
      >>> mask_flags(None, [jnp.ones(1), jnp.ones(1)])
      [True, True]
    """
    leaves = jax.tree_util.tree_leaves(tree)
    if mask is None:
        return [True] * len(leaves)
    tree_of_masks = mask(tree) if callable(mask) else mask
    try:
        full = jax.tree_util.tree_map(
            lambda m, sub: jax.tree_util.tree_map(lambda _: m, sub), tree_of_masks, tree
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


def mask_tree(mask: MaskOrFn, tree: Any) -> Any:
    """``mask_flags`` as a pytree with the structure of ``tree`` (one bool per leaf).

    Examples:
      >>> mask_tree({"a": False}, {"a": (jnp.ones(1), jnp.ones(1))})
      {'a': (False, False)}
    """
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(tree), mask_flags(mask, tree))


def check_selection(tree: Any, flags: list[bool], num_nodes: int) -> None:
    """Raise unless the flagged leaves stack into a (num_nodes, d) signal (2-D, equal widths).

    Examples:
      >>> check_selection({"u": jnp.ones((2, 4)), "i": jnp.ones((3, 4))}, [True, True], 5)
      >>> check_selection({"u": jnp.ones((2, 4))}, [True], 5)
      Traceback (most recent call last):
      ...
      ValueError: adjacency has 5 nodes but the masked tables stack to 2 rows [['u'] (2 rows)];
      the graph must have one node per stacked row, in pytree-flatten order
    """
    leaves_with_paths = jax.tree_util.tree_flatten_with_path(tree)[0]
    chosen = [(jax.tree_util.keystr(p), leaf)
              for (p, leaf), f in zip(leaves_with_paths, flags, strict=True) if f]
    if not chosen:
        raise ValueError("mask selects no parameter; SEvo needs at least one embedding table "
                         "(under optax.inject_hyperparams name a callable mask in static_args)")
    for p, leaf in chosen:
        if jnp.ndim(leaf) != 2:
            raise ValueError(
                f"mask selects {p or 'the params'} of shape {jnp.shape(leaf)}; SEvo smooths "
                "2-D embedding tables (rows = graph nodes)"
            )
    widths = {jnp.shape(leaf)[1] for _, leaf in chosen}
    if len(widths) > 1:
        raise ValueError(
            "masked tables must share their embedding width to be stacked, got widths "
            f"{sorted(widths)}"
        )
    rows = sum(jnp.shape(leaf)[0] for _, leaf in chosen)
    if rows != num_nodes:
        names = ", ".join(f"{p or 'params'} ({jnp.shape(leaf)[0]} rows)" for p, leaf in chosen)
        raise ValueError(
            f"adjacency has {num_nodes} nodes but the masked tables stack to {rows} rows "
            f"[{names}]; the graph must have one node per stacked row, in pytree-flatten order"
        )


def sevo_smooth(
    adjacency: Any,
    beta: Any = 0.99,
    num_layers: Any = 3,
    *,
    approx: str = "neumann",
    mask: MaskOrFn | None = None,
    mesh: jax.sharding.Mesh | None = None,
    axis_name: str | None = None,
    impl: str | None = None,
    repair: bool = True,
) -> optax.GradientTransformation:
    """Structure-aware embedding evolution: replace the masked tables' update ``X`` by psi(X).

    ``psi(X) = c Y_L`` with ``Y_0 = X``, ``Y_l = a X + beta Ã Y_{l-1}`` and
    ``Ã = D^-1/2 A D^-1/2`` (``sevo_jax.psi``; neumann: ``a = 1``,
    ``c = (1-beta)/(1-beta^(L+1))``). The masked leaves (2-D tables of equal width) are stacked
    row-wise in pytree-flatten order, smoothed as one signal and split back; unmasked leaves pass
    through unchanged. The update keeps its dtype; the products run in at least float32. A
    non-finite row of ``X`` is kept out of the propagation and passed through as is.

    Args:
      adjacency: the RAW symmetric non-negative adjacency (scipy sparse, numpy array, BCOO),
        or a prebuilt ``NormalizedGraph``/``ShardedGraph``; normalised once, here (and cached by
        identity, so ``optax.inject_hyperparams`` re-calling this factory costs nothing). Under
        ``inject_hyperparams`` pass a scipy matrix or a ``NormalizedGraph``: Optax injects
        numpy arrays as hyperparameters (or name it in ``static_args``).
      beta: smoothing strength in [0, 1); 0 is the identity. May be an array or, inside
        ``optax.inject_hyperparams``, traced (a schedule, or ``state.hyperparams["beta"]``);
        the range is checked when the value is concrete; a traced value out of range makes
        the smoothed tables' updates NaN (it cannot raise under ``jax.jit``).
      num_layers: number L >= 0 of sparse products; 0 is the identity for ``neumann``. May be
        traced like ``beta`` (the loop then becomes a ``while_loop``: not reverse-differentiable
        through the optimizer, which nothing here needs).
      approx: ``"neumann"`` (SEvo), ``"iterative"`` or ``"nsa"``.
      mask: Optax-style pytree of bools (or a callable of the params returning one) choosing
        the tables to smooth; None selects every leaf.
      mesh, axis_name: row-shard psi over the axis ``axis_name`` of a ``jax.sharding.Mesh``
        (``sevo_jax.operator_sharded``); None (the default) runs psi on one device. Under
        ``optax.inject_hyperparams`` name ``"mesh"`` in ``static_args`` (a ``Mesh`` is
        callable, so Optax would take it for a schedule; so is a callable ``mask``).
      impl: the sparse product (``sevo_jax.operator.sparse_matmul``): ``"chunked"``,
        ``"segment_sum"`` or ``"bcoo"``; None (the default) picks by backend.
      repair: True (the default): ``update`` repairs a state's graph that a generic tree
        operation broke, through a host callback. False: no repair branch, so the compiled
        update holds no host callback and JAX's persistent compilation cache can store it; a
        graph of the wrong shape or dtype is then a ``ValueError`` when traced, and one whose
        tag is wrong at run time (e.g. zeroed) turns the smoothed tables' updates into NaN
        rather than use it (for trainers that only pass states from ``init`` or restored into
        its template, as ``sevo_jax.training`` does).

    Returns:
      An ``optax.GradientTransformation`` with state ``SEvoSmoothState(graph)``. ``init``
      uploads FRESH device arrays each call (donating a state is safe); with ``repair=True``
      ``update`` repairs a graph that a generic tree operation changed (``sevo_jax.operator``).
      For the sharded operator, the ``ShardedGraph`` is built at the first ``init`` for the
      masked tables' row counts; with parameters without leaves (Optax's placeholder) ``init``
      returns the last built layout's structure.

    Examples:
      >>> import optax
      >>> a = np.array([[0.0, 1.0], [1.0, 0.0]])
      >>> tx = sevo_smooth(a, beta=0.5, num_layers=1, mask={"emb": True, "b": False})
      >>> params = {"emb": jnp.array([[1.0], [0.0]]), "b": jnp.ones(1)}
      >>> updates, state = jax.jit(tx.update)(params, tx.init(params))
      >>> np.asarray(updates["emb"], float).round(4).tolist()
      [[0.6667], [0.3333]]
      >>> reset = jax.tree.map(jnp.zeros_like, state)   # behaves like a fresh init
      >>> bool(jnp.all(jax.jit(tx.update)(params, reset)[0]["emb"] == updates["emb"]))
      True
    """
    check_hyperparameters(beta, num_layers, approx)
    check_impl(impl)
    check_mask_argument("mask", mask)
    own_fingerprint = None  # the unsharded graph's: a state must hold this very graph
    if mesh is not None or axis_name is not None or isinstance(adjacency, ShardedGraph):
        num_nodes, make_graph = sharded_graph_factory(adjacency, mesh, axis_name)
    else:
        local = as_normalized_graph(adjacency)
        num_nodes, own_fingerprint = local.num_nodes, local.fingerprint

        def make_graph(segments):
            del segments
            return local

    def segments_of(tree: Any, flags: list[bool]) -> tuple[int, ...]:
        leaves = jax.tree_util.tree_leaves(tree)
        return tuple(int(jnp.shape(x)[0]) for x, f in zip(leaves, flags, strict=True) if f)

    def init_fn(params):
        if not has_leaves(params):  # Optax's placeholder: the structure only, no upload
            return SEvoSmoothState(graph=make_graph(None).abstract())
        flags = mask_flags(mask, params)
        check_selection(params, flags, num_nodes)
        graph = make_graph(segments_of(params, flags))
        # under jax.jit(init) the graph comes through a callback, not as a program constant
        return SEvoSmoothState(graph=graph.fresh() if is_concrete(params) else graph.uploaded())

    def update_fn(updates, state, params=None):
        del params
        flags = mask_flags(mask, updates)
        graph = state.graph
        if not isinstance(graph, GraphOperator):
            raise TypeError(
                "SEvoSmoothState.graph must be a GraphOperator (from init), got "
                f"{type(graph).__name__}"
            )
        expected = own_fingerprint
        if expected is None and isinstance(graph, ShardedGraph):  # this adjacency, its layout
            expected = make_graph(graph.segments).fingerprint
        if expected is not None and graph.fingerprint != expected:
            raise ValueError(
                f"the state holds another graph than this transform's (fingerprint "
                f"{graph.fingerprint[:12]}, not {expected[:12]}): pass a state from this "
                "transform's init, or restored into it"
            )
        check_selection(updates, flags, graph.num_nodes)
        if repair:
            graph = graph.repaired()
        elif not graph.has_layout():
            raise ValueError(
                "SEvoSmoothState.graph's arrays do not have the graph's shapes and dtypes "
                "(repair=False does not re-upload them; use repair=True or a state from init)"
            )
        leaves, treedef = jax.tree_util.tree_flatten(updates)
        chosen = [x for x, f in zip(leaves, flags, strict=True) if f]
        if isinstance(graph, ShardedGraph) and tuple(x.shape[0] for x in chosen) != graph.segments:
            raise ValueError(
                f"the masked tables have {[x.shape[0] for x in chosen]} rows but the state's "
                f"ShardedGraph was built (at init) for {list(graph.segments)}"
            )
        smoothed = propagate(graph, chosen, beta, num_layers, approx, impl=impl)
        if not repair:  # a broken cache must not be used silently
            intact = graph.is_intact()
            smoothed = [jnp.where(intact, y, jnp.nan).astype(y.dtype) for y in smoothed]
        smoothed = iter(smoothed)
        out = [next(smoothed) if f else x for x, f in zip(leaves, flags, strict=True)]
        return jax.tree_util.tree_unflatten(treedef, out), SEvoSmoothState(graph=graph)

    return optax.GradientTransformation(init_fn, update_fn)


def sharded_graph_factory(adjacency: Any, mesh: Any, axis_name: Any):
    """``(num_nodes, segments -> ShardedGraph)`` for ``sevo_smooth(mesh=, axis_name=)``.

    Each layout is built once.

    A prebuilt ``ShardedGraph`` fixes the mesh, axis and segments; otherwise the graph is
    normalised on the host here and blocked at the first ``init`` for the tables' row counts.
    ``segments=None`` (a leafless ``init``) returns the last layout built.
    """
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
        prebuilt = adjacency

        def from_prebuilt(segments):
            if segments is not None and prebuilt.segments != tuple(segments):
                raise ValueError(
                    f"the ShardedGraph was built for tables of {list(prebuilt.segments)} rows, "
                    f"the masked tables have {list(segments)}"
                )
            return prebuilt

        return prebuilt.num_nodes, from_prebuilt
    # one host copy and one layout per segments for this adjacency, mesh and axis, however
    # often the factory runs (optax.inject_hyperparams runs it at every update); layouts are
    # kept abstract (host blocks only), as init uploads fresh arrays from them anyway
    memo: tuple[Any, dict[Any, Any]] = memo_by_adjacency(
        adjacency, (ShardedGraph, mesh, axis_name), lambda: (normalized_scipy(adjacency), {}))
    host, built = memo

    def build(segments):
        if segments is None:
            segments = built.get("last", (host.shape[0],))
        segments = tuple(segments)
        if segments not in built:
            built[segments] = shard_normalized(host, mesh, axis_name, segments).abstract()
        built["last"] = segments
        return built[segments]

    return host.shape[0], build


def smoothness(x: jax.Array, adjacency: Any) -> jax.Array:
    """``J(X) = trace(X^T (I - Ã) X)``, the graph smoothness of a signal (lower = smoother).

    Equals ``1/2 sum_ij w_ij ||x_i/sqrt(d_i) - x_j/sqrt(d_j)||^2`` plus ``||x_i||^2`` for each
    isolated node. ``adjacency`` is raw (normalised here) or a ``NormalizedGraph``.

    Examples:
      >>> a = np.array([[0.0, 1.0], [1.0, 0.0]])
      >>> float(smoothness(jnp.array([1.0, 1.0]), a)), float(smoothness(jnp.array([1.0, -1.0]), a))
      (0.0, 4.0)
    """
    graph: NormalizedGraph = as_normalized_graph(adjacency)
    x = jnp.asarray(x)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2 or x.shape[0] != graph.num_nodes:
        raise ValueError(
            f"x must have one row per graph node ({graph.num_nodes}), got shape {x.shape}"
        )
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    return jnp.sum(x * x) - jnp.sum(x * graph.matmul(x))
