"""Optimizers with SEvo, built as Optax chains (spec §3).

``sevo_adamw`` is the paper's recommended optimizer::

    chain(scale_by_adam_corrected, sevo_smooth, add_decayed_weights, scale_by_learning_rate)

which gives ``p <- p(1 - lr wd) - lr psi(delta)`` with ``delta`` the corrected Adam direction.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sevo_jax.smoothing import MaskOrFn, _broadcast_mask, sevo_smooth

__all__ = [
    "ScaleByAdamCorrectedState",
    "scale_by_adam_corrected",
    "adamw_corrected",
    "sevo_adamw",
    "sevo_adam",
    "sevo_sgd",
]


class ScaleByAdamCorrectedState(NamedTuple):
    """State of ``scale_by_adam_corrected``: step count and the two moment estimates."""

    count: jax.Array  # int32 scalar, number of steps taken
    mu: optax.Updates
    nu: optax.Updates


def _zero_rows(g: jax.Array) -> jax.Array:
    """Bool mask broadcastable to ``g``: True where the whole row (leading-axis slice) is zero."""
    if g.ndim == 0:
        return g == 0
    flat = g.reshape(g.shape[0], -1)
    return jnp.all(flat == 0, axis=1).reshape((g.shape[0],) + (1,) * (g.ndim - 1))


def scale_by_adam_corrected(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    mask: MaskOrFn | None = None,
) -> optax.GradientTransformation:
    """Adam's direction with SEvo's moment-estimate correction on the masked leaves.

    At step ``t`` (1-based) with ``s = max(1, t-1)``, rows of a masked leaf's gradient that are
    entirely zero (rows absent from the batch, flag ``z``) feed the moments their own
    bias-corrected previous value instead of the zero gradient::

        m_in = where(z, m / (1 - b1^s), g)        v_in = where(z, v / (1 - b2^s), g^2)
        m <- b1 m + (1 - b1) m_in                 v <- b2 v + (1 - b2) v_in
        update = (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)

    Unmasked leaves take plain Adam (``m_in = g``, ``v_in = g^2``). A row is a slice along the
    leading axis. ``mask`` follows Optax (pytree of bools or callable); None = every leaf.
    """

    def init_fn(params):
        _broadcast_mask(mask, params)
        mu = optax.tree.zeros_like(params)
        nu = optax.tree.zeros_like(params)
        return ScaleByAdamCorrectedState(count=jnp.zeros([], jnp.int32), mu=mu, nu=nu)

    def update_fn(updates, state, params=None):
        del params
        flags = _broadcast_mask(mask, updates)
        count = optax.safe_increment(state.count)
        t = count.astype(jnp.float32)
        s = jnp.maximum(t - 1.0, 1.0)
        leaves, treedef = jax.tree_util.tree_flatten(updates)
        mus = treedef.flatten_up_to(state.mu)
        nus = treedef.flatten_up_to(state.nu)
        new_mu, new_nu, out = [], [], []
        for g, m, v, corrected in zip(leaves, mus, nus, flags):
            m_in, v_in = g, jnp.square(g)
            if corrected:
                z = _zero_rows(g)
                m_in = jnp.where(z, m / (1.0 - b1**s).astype(m.dtype), m_in)
                v_in = jnp.where(z, v / (1.0 - b2**s).astype(v.dtype), v_in)
            m = b1 * m + (1.0 - b1) * m_in
            v = b2 * v + (1.0 - b2) * v_in
            m_hat = m / (1.0 - b1**t).astype(m.dtype)
            v_hat = v / (1.0 - b2**t).astype(v.dtype)
            new_mu.append(m)
            new_nu.append(v)
            out.append((m_hat / (jnp.sqrt(v_hat) + eps)).astype(g.dtype))
        unflatten = lambda xs: jax.tree_util.tree_unflatten(treedef, xs)
        return unflatten(out), ScaleByAdamCorrectedState(count, unflatten(new_mu), unflatten(new_nu))

    return optax.GradientTransformation(init_fn, update_fn)


def adamw_corrected(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-4,
    mask: MaskOrFn | None = None,
) -> optax.GradientTransformation:
    """AdamW with the moment-estimate correction on the masked leaves (no smoothing).

    ``p <- p (1 - lr wd) - lr delta`` with ``delta`` from ``scale_by_adam_corrected``.
    """
    return optax.chain(
        scale_by_adam_corrected(b1, b2, eps, mask=mask),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(learning_rate),
    )


def sevo_adamw(
    learning_rate: optax.ScalarOrSchedule,
    adjacency: Any,
    beta: float = 0.99,
    num_layers: int = 3,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-4,
    mask: MaskOrFn | None = None,
    approx: str = "neumann",
    mesh: jax.sharding.Mesh | None = None,
    axis_name: str | None = None,
) -> optax.GradientTransformation:
    """AdamW + SEvo with moment-estimate correction, the paper's optimizer (spec §3).

    ``p <- p (1 - lr wd) - lr psi(delta)``: psi smooths the corrected Adam direction of the
    masked tables, before the decoupled decay and the learning rate. Other leaves take plain
    AdamW. ``mesh``/``axis_name`` row-shard psi across a mesh axis (``sevo_smooth``,
    ``sevo_jax.sharding``); likewise in ``sevo_adam`` and ``sevo_sgd``.
    """
    return optax.chain(
        scale_by_adam_corrected(b1, b2, eps, mask=mask),
        sevo_smooth(
            adjacency, beta, num_layers, approx=approx, mask=mask, mesh=mesh, axis_name=axis_name
        ),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(learning_rate),
    )


def sevo_adam(
    learning_rate: optax.ScalarOrSchedule,
    adjacency: Any,
    beta: float = 0.99,
    num_layers: int = 3,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    mask: MaskOrFn | None = None,
    approx: str = "neumann",
    mesh: jax.sharding.Mesh | None = None,
    axis_name: str | None = None,
) -> optax.GradientTransformation:
    """Adam + SEvo with L2 decay and no correction: ``g <- g + wd p``; ``p <- p - lr psi(delta)``."""
    return optax.chain(
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_adam(b1, b2, eps),
        sevo_smooth(
            adjacency, beta, num_layers, approx=approx, mask=mask, mesh=mesh, axis_name=axis_name
        ),
        optax.scale_by_learning_rate(learning_rate),
    )


def sevo_sgd(
    learning_rate: optax.ScalarOrSchedule,
    adjacency: Any,
    beta: float = 0.99,
    num_layers: int = 3,
    *,
    momentum: float | None = None,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    mask: MaskOrFn | None = None,
    approx: str = "neumann",
    mesh: jax.sharding.Mesh | None = None,
    axis_name: str | None = None,
) -> optax.GradientTransformation:
    """SGD + SEvo: ``d = g + wd p``; with momentum ``b = mu b + d`` (first step ``b = d``) and
    ``d = d + mu b`` (Nesterov) or ``d = b``; then ``p <- p - lr psi(d)``.
    """
    return optax.chain(
        optax.add_decayed_weights(weight_decay),
        optax.trace(decay=momentum, nesterov=nesterov) if momentum else optax.identity(),
        sevo_smooth(
            adjacency, beta, num_layers, approx=approx, mask=mask, mesh=mesh, axis_name=axis_name
        ),
        optax.scale_by_learning_rate(learning_rate),
    )
