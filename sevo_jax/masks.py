"""Selecting embedding tables by name or path, for Linen params, Flax NNX state and plain dicts.

SEvo (arXiv 2310.03032) smooths only the embedding tables, so its transformations take an
Optax-style ``mask``: a pytree of bools over the params, or a callable returning one.
:func:`select_tables` builds such a callable from names or path patterns. It reads only the
tree's key paths, and it reads them the same way for

* Linen params, ``{"item_embedding": {"embedding": x}, ...}`` (with or without the outer
  ``{"params": ...}``), and plain dicts;
* Flax NNX state: ``nnx.Optimizer`` calls ``tx.init`` with ``nnx.state(model, wrt)``, whose
  leaves sit inside ``nnx.Variable`` nodes (key paths end in ``.value``), and ``tx.update`` with
  the pure state (no ``.value``). The ``.value`` of a Variable is not part of the path here, so
  the same selection picks the same tables in both.

The mask has exactly the structure of the tree it is given (for NNX state: ``Variable`` nodes
holding bools), so it plugs into ``sevo_adamw(mask=...)``, ``sevo_smooth(mask=...)`` and
``optax.masked``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["TableSelection", "path_names", "select_tables"]

_GLOB_CHARS = frozenset("*?[")


def path_names(path: tuple[Any, ...]) -> tuple[str, ...]:
    """The names along a ``jax.tree_util`` key path, without NNX's trailing ``.value``.

    ``(DictKey('item_embedding'), DictKey('embedding'), GetAttrKey('value'))`` ->
    ``('item_embedding', 'embedding')``; sequence indices become their decimal string.
    """
    names = []
    for entry in path:
        if isinstance(entry, jax.tree_util.DictKey):
            names.append(str(entry.key))
        elif isinstance(entry, jax.tree_util.GetAttrKey):
            names.append(entry.name)
        elif isinstance(entry, jax.tree_util.SequenceKey):
            names.append(str(entry.idx))
        elif isinstance(entry, jax.tree_util.FlattenedIndexKey):
            names.append(str(entry.key))
        else:
            names.append(str(entry))
    if len(path) > 1 and isinstance(path[-1], jax.tree_util.GetAttrKey) and names[-1] == "value":
        names.pop()  # an nnx.Variable's array; the Variable's own name is the leaf name
    return tuple(names)


@dataclasses.dataclass(frozen=True)
class TableSelection:
    """Callable ``tree -> pytree of bools`` made by :func:`select_tables`; see there."""

    patterns: tuple[str, ...]

    def matches(self, names: tuple[str, ...]) -> bool:
        """Whether a leaf with these path names (:func:`path_names`) is selected."""
        joined = "/".join(names)
        for pattern in self.patterns:
            if "/" not in pattern and not _GLOB_CHARS & set(pattern):
                if pattern in names:
                    return True
            elif any(fnmatch.fnmatchcase(joined, p) for p in (pattern, "*/" + pattern)):
                return True
        return False

    def __call__(self, tree: Any) -> Any:
        if hasattr(tree, "dtype") and not getattr(tree, "shape", None) and jnp.issubdtype(
                tree.dtype, jnp.integer):
            raise TypeError(
                f"select_tables{self.patterns!r} was called with a step count, not a params "
                "tree: optax.inject_hyperparams takes a callable mask for a schedule; name the "
                "mask in static_args, e.g. inject_hyperparams(sevo_adamw, static_args=('mask',))")
        return jax.tree_util.tree_map_with_path(
            lambda path, _leaf: self.matches(path_names(path)), tree)


def select_tables(*patterns: str) -> TableSelection:
    """A mask callable selecting the leaves that match any of ``patterns``.

    A pattern without ``/`` and without a glob character (``* ? [``) is a NAME: it selects
    every leaf with that name anywhere on its path (a module name selects all of the module's
    leaves, e.g. ``"item_embedding"`` selects ``item_embedding/embedding``). Any other pattern
    is a PATH: ``fnmatch`` against the ``/``-joined path, anchored at the leaf and at a
    component boundary, so ``"item_embedding/embedding"`` selects ``params/item_embedding/
    embedding`` but not ``my_item_embedding/embedding``; ``*`` also matches across ``/``.

    Args:
      *patterns: at least one non-empty name or path pattern.

    Returns:
      A callable ``tree -> tree of bools`` (same structure) for ``mask=`` arguments.

    Examples:
      >>> import jax.numpy as jnp
      >>> from sevo_jax.masks import select_tables
      >>> params = {"item_embedding": {"embedding": jnp.zeros((5, 2))},
      ...           "position_embedding": {"embedding": jnp.zeros((3, 2))}}
      >>> select_tables("item_embedding")(params)
      {'item_embedding': {'embedding': True}, 'position_embedding': {'embedding': False}}
      >>> select_tables("*_embedding/embedding")(params)["position_embedding"]
      {'embedding': True}
    """
    if not patterns:
        raise ValueError("select_tables needs at least one name or path pattern")
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern.strip("/"):
            raise ValueError(f"select_tables patterns must be non-empty strings, got {pattern!r}")
    return TableSelection(tuple(p.strip("/") for p in patterns))
