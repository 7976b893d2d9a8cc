"""Full-ranking top-k metrics (HR@k, NDCG@k) for next-item recommendation.

Scores cover the whole catalogue, ``scores[b, i]`` for item ids ``i = 0..N-1``;
column 0 is the padding id and never competes with the target. All functions
are pure and jit-able; :class:`MetricAccumulator` gathers results on the host.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["MetricAccumulator", "ranking_metrics", "target_ranks"]


def target_ranks(
    scores: jax.Array,
    targets: jax.Array,
    exclude: jax.Array | None = None,
) -> jax.Array:
    """0-based rank of each target among the candidate items.

    The candidates of row ``b`` are all ids except padding (0) and the items with
    ``exclude[b, i] = True`` (e.g. the user's earlier items); the target itself is
    always a candidate, even when it is marked in ``exclude``.

    Ties are broken pessimistically: every other candidate scoring *equal* to the
    target is ranked above it, i.e.::

        rank = #{i candidate, i != target : scores[b, i] >= scores[b, target]}

    so a model that outputs a constant score ranks every target last. NaN scores are
    pessimistic too: a NaN target score ranks last, a NaN candidate ranks above the target.

    Args:
        scores: ``(B, N)`` float scores over item ids ``0..N-1``.
        targets: ``(B,)`` integer target ids in ``1..N-1``.
        exclude: optional ``(B, N)`` bool mask of items to drop from the ranking.

    Returns:
        ``(B,)`` int32 ranks in ``0..N-2``.
    """
    if jnp.ndim(scores) != 2 or jnp.shape(targets) != jnp.shape(scores)[:1]:
        raise ValueError(f"target_ranks needs scores (B, N) and targets (B,), got "
                         f"{jnp.shape(scores)} and {jnp.shape(targets)}")
    if not jnp.issubdtype(jnp.result_type(targets), jnp.integer):
        raise TypeError(f"targets must be integer item ids, got {jnp.result_type(targets)}")
    if exclude is not None and jnp.shape(exclude) != jnp.shape(scores):
        raise ValueError(f"exclude must have the shape of scores {jnp.shape(scores)}, got "
                         f"{jnp.shape(exclude)}")
    ids = jnp.arange(scores.shape[-1])
    is_target = ids[None, :] == targets[:, None]
    others = (ids[None, :] != 0) & ~is_target
    if exclude is not None:
        others = others & ~exclude.astype(bool)
    target_score = jnp.take_along_axis(scores, targets[:, None], axis=-1)
    # ~(s < t) is s >= t for numbers, and also true when either side is NaN.
    beaten_or_tied = others & ~(scores < target_score)
    return beaten_or_tied.sum(axis=-1, dtype=jnp.int32)


def ranking_metrics(ranks: jax.Array, ks: Sequence[int] = (1, 5, 10)) -> dict[str, jax.Array]:
    """Per-example HR@k and NDCG@k from 0-based target ranks.

    ``HR@k = [rank < k]`` and ``NDCG@k = [rank < k] / log2(rank + 2)`` (a single
    relevant item, so the ideal DCG is 1). HR is returned for every ``k``, NDCG
    for every ``k > 1`` (NDCG@1 equals HR@1).

    Returns:
        A dict such as ``{"HR@1", "HR@5", "HR@10", "NDCG@5", "NDCG@10"}`` of
        ``(B,)`` float32 arrays.
    """
    ks = tuple(ks)
    if not ks or any(isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer))
                     or k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {ks}")
    ranks = jnp.asarray(ranks)
    discount = 1.0 / jnp.log2(ranks.astype(jnp.float32) + 2.0)
    out = {}
    for k in ks:
        out[f"HR@{k}"] = (ranks < k).astype(jnp.float32)
    for k in ks:
        if k > 1:
            out[f"NDCG@{k}"] = jnp.where(ranks < k, discount, 0.0)
    return out


class MetricAccumulator:
    """Running means of per-example metrics over many batches.

    Example::

        acc = MetricAccumulator()
        for batch in loader:
            acc.update(ranking_metrics(target_ranks(scores, targets, seen)))
        acc.compute()  # {"HR@1": 0.01, ...}
    """

    def __init__(self) -> None:
        self._sums: dict[str, float] = {}
        self._count = 0.0

    def update(self, metrics: Mapping[str, jax.Array],
               mask: jax.Array | np.ndarray | None = None) -> None:
        """Adds a batch of ``(B,)`` per-example values.

        ``mask`` (``(B,)`` bool) drops rows, e.g. the filler rows of a padded last
        batch; every metric must have the same batch size.
        """
        values = {name: np.asarray(v, dtype=np.float64) for name, v in metrics.items()}
        shapes = {name: v.shape for name, v in values.items()}
        if any(len(shape) != 1 for shape in shapes.values()) or len(set(shapes.values())) > 1:
            raise ValueError(f"metrics must be (B,) arrays of one batch size, got shapes {shapes}")
        if self._sums and set(values) != set(self._sums):
            raise ValueError(f"metrics {sorted(values)} differ from the earlier batches' "
                             f"{sorted(self._sums)}")
        if not values:
            return
        batch_shape = next(iter(shapes.values()))
        weight = None if mask is None else np.asarray(mask, dtype=np.float64)
        if weight is not None and weight.shape != batch_shape:
            raise ValueError(f"mask has shape {weight.shape}, the metrics {batch_shape}")
        for name, v in values.items():
            total = v.sum() if weight is None else (v * weight).sum()
            self._sums[name] = self._sums.get(name, 0.0) + float(total)
        self._count += float(batch_shape[0] if weight is None else weight.sum())

    @property
    def count(self) -> float:
        """Number of examples accumulated so far."""
        return self._count

    def compute(self) -> dict[str, float]:
        """Mean of every metric over all accumulated examples (0.0 if none)."""
        denom = max(self._count, 1.0)
        return {name: total / denom for name, total in self._sums.items()}

    def reset(self) -> None:
        self._sums = {}
        self._count = 0.0
