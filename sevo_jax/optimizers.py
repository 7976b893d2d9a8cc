"""Optimizers with SEvo (arXiv 2310.03032, spec §3), built as Optax chains.

``sevo_adamw`` is the paper's recommended optimizer::

    chain(scale_by_adam_corrected, sevo_smooth, add_decayed_weights, scale_by_learning_rate)

which gives ``p <- p(1 - lr wd) - lr psi(delta)`` with ``delta`` the corrected Adam direction.

Two masks, not to be confused:

* ``mask`` selects the embedding TABLES (2-D, rows = graph nodes) that SEvo smooths and whose
  Adam moments get SEvo's correction (``sevo_smooth``'s mask);
* ``decay_mask`` selects the leaves that take weight decay (``optax.adamw``'s ``mask``), e.g.
  to exclude biases and LayerNorm scales; None decays every leaf.

Every numeric argument is an array-like, so ``optax.inject_hyperparams`` can schedule
``learning_rate``, ``beta``, ``num_layers``, ``b1``, ``b2``, ``eps`` and ``weight_decay``.
Two cautions there, as for any Optax alias: Optax takes every callable argument for a schedule,
so name a callable ``mask``/``decay_mask`` (and ``mesh``) in ``static_args`` (else it comes back
as one bool, which these functions refuse: ``transform.check_mask_argument``); and it casts the
injected floats to the params' dtype, so with bfloat16 params pass
``hyperparam_dtype=jnp.float32`` (``beta`` 0.99 in bfloat16 is 0.98828: ``1 - beta`` 17% off;
``b2`` 0.999 is 1, refused by ``check_decay_rates``).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np  # noqa: F401  (the Examples use it)
import optax

from sevo_jax.psi import is_concrete
from sevo_jax.transform import (
    MaskOrFn,
    check_mask_argument,
    has_leaves,
    mask_flags,
    mask_tree,
    sevo_smooth,
)

__all__ = [
    "ScaleByAdamCorrectedState",
    "adamw_corrected",
    "scale_by_adam_corrected",
    "sevo_adam",
    "sevo_adamw",
    "sevo_sgd",
]


class ScaleByAdamCorrectedState(NamedTuple):
    """State of ``scale_by_adam_corrected``: step count and the two moment estimates."""

    # optax's name for the step count (ScaleByAdamState.count); it shadows tuple.count
    count: jax.Array  # type: ignore[assignment]  # int32 scalar, number of steps taken
    mu: optax.Updates
    nu: optax.Updates


def check_decay_rates(**values: Any) -> None:
    """Raise unless each concrete value is a number in [0, 1) (``b1``, ``b2``, ``momentum``)
    or, for ``eps``, a finite number >= 0; None and traced values are skipped.

    ``b1 = 1`` or ``b2 = 1`` made every update NaN (bias correction ``1 - 1^t = 0``), and a
    rate above 1 or below 0 gave finite, wrong updates.

    Examples:
      >>> check_decay_rates(b1=0.9, b2=0.999, eps=1e-8)
      >>> check_decay_rates(b2=1.0)
      Traceback (most recent call last):
      ...
      ValueError: b2 must lie in [0, 1), got 1.0
    """
    for name, value in values.items():
        if value is None or callable(value) or not is_concrete(value):
            continue
        try:
            if isinstance(value, (str, bytes)):
                raise TypeError
            number = float(value)
        except (TypeError, ValueError):
            raise TypeError(f"{name} must be a number, got {value!r}") from None
        if name == "eps":
            if not (math.isfinite(number) and number >= 0.0):
                raise ValueError(f"eps must be a finite number >= 0, got {value!r}")
        elif not 0.0 <= number < 1.0:
            dtype = getattr(value, "dtype", None)
            rounded = (f" ({name} rounded to {dtype}: under optax.inject_hyperparams pass "
                       "hyperparam_dtype=jnp.float32)"
                       if dtype is not None and jnp.finfo(dtype).bits < 32 and number == 1.0
                       else "")
            raise ValueError(f"{name} must lie in [0, 1), got {value!r}{rounded}")


def zero_rows(g: jax.Array) -> jax.Array:
    """Bool mask broadcastable to ``g``: True where the whole row (leading-axis slice) is zero.

    Examples:
      >>> zero_rows(jnp.array([[0.0, 0.0], [0.0, 1.0]]))
      Array([[ True],
             [False]], dtype=bool)
    """
    if g.ndim == 0:
        return g == 0
    flat = g.reshape(g.shape[0], math.prod(g.shape[1:]))  # not -1: tables may have 0 rows
    return jnp.all(flat == 0, axis=1).reshape((g.shape[0],) + (1,) * (g.ndim - 1))


def squared_magnitude(g: jax.Array) -> jax.Array:
    """``|g|^2`` elementwise: ``g^2`` for real ``g``, ``Re(g conj(g))`` for complex (as Optax).

    Examples:
      >>> squared_magnitude(jnp.array([3.0 + 4.0j]))
      Array([25.], dtype=float32)
    """
    return jnp.real(g * jnp.conj(g)) if jnp.iscomplexobj(g) else jnp.square(g)


def scale_by_adam_corrected(
    b1: Any = 0.9,
    b2: Any = 0.999,
    eps: Any = 1e-8,
    *,
    mask: MaskOrFn | None = None,
    mu_dtype: Any | None = None,
) -> optax.GradientTransformation:
    """Adam's direction with SEvo's moment-estimate correction on the masked leaves.

    At step ``t`` (1-based) with ``s = max(1, t-1)``, rows of a masked leaf's gradient that are
    entirely zero (rows absent from the batch, flag ``z``) feed the moments their own
    bias-corrected previous value instead of the zero gradient::

        m_in = where(z, m / (1 - b1^s), g)        v_in = where(z, v / (1 - b2^s), g^2)
        m <- b1 m + (1 - b1) m_in                 v <- b2 v + (1 - b2) v_in
        update = (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)

    Unmasked leaves take plain Adam (``m_in = g``, ``v_in = g^2``), equal to
    ``optax.scale_by_adam``. A row is a slice along the leading axis. ``mask`` follows Optax
    (pytree of bools or callable); None = every leaf. ``mu_dtype``: dtype of the first moment
    as stored (as in ``optax.scale_by_adam``); None keeps the parameters' dtype.

    Examples:
      >>> tx = scale_by_adam_corrected()
      >>> params = {"emb": jnp.zeros((2, 1))}
      >>> state = tx.init(params)
      >>> u, state = tx.update({"emb": jnp.array([[1.0], [1.0]])}, state)
      >>> u, state = tx.update({"emb": jnp.array([[0.0], [1.0]])}, state)
      >>> np.asarray(u["emb"], float).round(4).tolist()  # absent row 0 keeps its moments' direction
      [[1.0], [1.0]]
    """
    check_mask_argument("mask", mask)
    check_decay_rates(b1=b1, b2=b2, eps=eps)
    mu_dtype = None if mu_dtype is None else jnp.dtype(mu_dtype)

    def init_fn(params):
        if has_leaves(params):
            mask_flags(mask, params)  # fail early on a mask that does not fit the params
        return ScaleByAdamCorrectedState(
            count=jnp.zeros([], jnp.int32),
            mu=optax.tree.zeros_like(params, dtype=mu_dtype),
            nu=optax.tree.zeros_like(params),
        )

    def update_fn(updates, state, params=None):
        del params
        corrected = mask_tree(mask, updates)
        count = optax.safe_increment(state.count)
        s = jnp.maximum(count - 1, 1)

        def moment_input(g, moment, decay, fresh, is_corrected):
            if not is_corrected:
                return fresh
            restored = optax.tree.bias_correction(moment, decay, s)
            return jnp.where(zero_rows(g), restored, fresh)

        m_in = jax.tree.map(lambda g, m, c: moment_input(g, m, b1, g, c),
                            updates, state.mu, corrected)
        v_in = jax.tree.map(lambda g, v, c: moment_input(g, v, b2, squared_magnitude(g), c),
                            updates, state.nu, corrected)
        mu = optax.tree.update_moment(m_in, state.mu, b1, 1)
        nu = optax.tree.update_moment(v_in, state.nu, b2, 1)
        mu_hat = optax.tree.bias_correction(mu, b1, count)
        nu_hat = optax.tree.bias_correction(nu, b2, count)
        out = jax.tree.map(lambda g, m, v: (m / (jnp.sqrt(v) + eps)).astype(g.dtype),
                           updates, mu_hat, nu_hat)
        return out, ScaleByAdamCorrectedState(count, optax.tree.cast(mu, mu_dtype), nu)

    return optax.GradientTransformation(init_fn, update_fn)


def adamw_corrected(
    learning_rate: optax.ScalarOrSchedule,
    b1: Any = 0.9,
    b2: Any = 0.999,
    eps: Any = 1e-8,
    weight_decay: Any = 1e-4,
    mask: MaskOrFn | None = None,
    *,
    decay_mask: MaskOrFn | None = None,
    mu_dtype: Any | None = None,
) -> optax.GradientTransformation:
    """AdamW with SEvo's moment-estimate correction on the ``mask`` tables (no smoothing).

    ``p <- p - lr (delta + wd p)`` with ``delta`` from ``scale_by_adam_corrected`` (the
    correction on the leaves ``mask`` selects) and the decay on the leaves ``decay_mask``
    selects (None: all; module docstring). With ``mask`` selecting nothing it is
    ``optax.adamw``.

    Examples:
      >>> params = {"emb": jnp.ones((3, 2)), "bias": jnp.ones(2)}
      >>> opt = adamw_corrected(0.1, weight_decay=0.5, mask={"emb": True, "bias": False},
      ...                       decay_mask={"emb": True, "bias": False})
      >>> u, _ = opt.update(jax.tree.map(jnp.zeros_like, params), opt.init(params), params)
      >>> round(float(u["emb"][0, 0]), 6), abs(float(u["bias"][0]))   # decay on the table only
      (-0.05, 0.0)
    """
    check_mask_argument("decay_mask", decay_mask)
    return optax.chain(
        scale_by_adam_corrected(b1, b2, eps, mask=mask, mu_dtype=mu_dtype),
        optax.add_decayed_weights(weight_decay, mask=decay_mask),
        optax.scale_by_learning_rate(learning_rate),
    )


def sevo_adamw(
    learning_rate: optax.ScalarOrSchedule,
    adjacency: Any,
    beta: Any = 0.99,
    num_layers: Any = 3,
    *,
    b1: Any = 0.9,
    b2: Any = 0.999,
    eps: Any = 1e-8,
    weight_decay: Any = 1e-4,
    mask: MaskOrFn | None = None,
    decay_mask: MaskOrFn | None = None,
    mu_dtype: Any | None = None,
    approx: str = "neumann",
    mesh: jax.sharding.Mesh | None = None,
    axis_name: str | None = None,
    repair: bool = True,
) -> optax.GradientTransformation:
    """AdamW + SEvo with moment-estimate correction, the paper's optimizer (spec §3).

    ``p <- p (1 - lr wd) - lr psi(delta)``: psi (``sevo_smooth``) smooths the corrected Adam
    direction ``delta`` of the ``mask`` tables, before the decoupled decay (on ``decay_mask``)
    and the learning rate. Other leaves take plain AdamW. ``mesh``/``axis_name`` row-shard psi
    across a mesh axis, and ``repair`` is ``sevo_smooth``'s; likewise in ``sevo_adam`` and
    ``sevo_sgd``.

    Examples:
      >>> import optax, scipy.sparse as sp
      >>> a = sp.csr_matrix(np.array([[0.0, 1.0], [1.0, 0.0]]))  # sparse: not a hyperparameter
      >>> opt = optax.inject_hyperparams(sevo_adamw)(learning_rate=0.1, adjacency=a, beta=0.5,
      ...                                            num_layers=1, weight_decay=0.0)
      >>> params = {"emb": jnp.zeros((2, 1))}
      >>> state = opt.init(params)
      >>> u, state = jax.jit(opt.update)({"emb": jnp.array([[1.0], [0.0]])}, state, params)
      >>> np.asarray(u["emb"], float).round(4).tolist()   # Adam: (-0.1, 0); psi mixes the rows
      [[-0.0667], [-0.0333]]
      >>> state.hyperparams["beta"] = 0.0   # psi is now the identity
      >>> u, state = jax.jit(opt.update)({"emb": jnp.array([[1.0], [0.0]])}, state, params)
      >>> np.asarray(u["emb"], float).round(4).tolist()
      [[-0.1], [-0.0]]
    """
    check_mask_argument("decay_mask", decay_mask)
    return optax.chain(
        scale_by_adam_corrected(b1, b2, eps, mask=mask, mu_dtype=mu_dtype),
        sevo_smooth(
            adjacency, beta, num_layers, approx=approx, mask=mask, mesh=mesh, axis_name=axis_name,
            repair=repair,
        ),
        optax.add_decayed_weights(weight_decay, mask=decay_mask),
        optax.scale_by_learning_rate(learning_rate),
    )


def sevo_adam(
    learning_rate: optax.ScalarOrSchedule,
    adjacency: Any,
    beta: Any = 0.99,
    num_layers: Any = 3,
    *,
    b1: Any = 0.9,
    b2: Any = 0.999,
    eps: Any = 1e-8,
    weight_decay: Any = 0.0,
    mask: MaskOrFn | None = None,
    decay_mask: MaskOrFn | None = None,
    mu_dtype: Any | None = None,
    approx: str = "neumann",
    mesh: jax.sharding.Mesh | None = None,
    axis_name: str | None = None,
    repair: bool = True,
) -> optax.GradientTransformation:
    """Adam + SEvo with L2 decay and no correction: ``g <- g + wd p``; ``p <- p - lr psi(delta)``.

    ``delta`` is ``optax.scale_by_adam``'s direction; the L2 term applies to ``decay_mask``.

    Examples:
      >>> opt = sevo_adam(0.1, np.array([[0.0, 1.0], [1.0, 0.0]]), beta=0.0)
      >>> params = {"emb": jnp.zeros((2, 1))}
      >>> u, _ = opt.update({"emb": jnp.array([[1.0], [-1.0]])}, opt.init(params), params)
      >>> np.asarray(u["emb"], float).round(4).tolist()
      [[-0.1], [0.1]]
    """
    check_decay_rates(b1=b1, b2=b2, eps=eps)
    check_mask_argument("decay_mask", decay_mask)
    return optax.chain(
        optax.add_decayed_weights(weight_decay, mask=decay_mask),
        optax.scale_by_adam(b1, b2, eps, mu_dtype=mu_dtype),
        sevo_smooth(
            adjacency, beta, num_layers, approx=approx, mask=mask, mesh=mesh, axis_name=axis_name,
            repair=repair,
        ),
        optax.scale_by_learning_rate(learning_rate),
    )


def sevo_sgd(
    learning_rate: optax.ScalarOrSchedule,
    adjacency: Any,
    beta: Any = 0.99,
    num_layers: Any = 3,
    *,
    momentum: float | None = None,
    nesterov: bool = False,
    weight_decay: Any = 0.0,
    mask: MaskOrFn | None = None,
    decay_mask: MaskOrFn | None = None,
    approx: str = "neumann",
    mesh: jax.sharding.Mesh | None = None,
    axis_name: str | None = None,
    repair: bool = True,
) -> optax.GradientTransformation:
    """SGD + SEvo: ``d = g + wd p`` (on ``decay_mask``); with momentum ``b = mu b + d`` (first
    step ``b = d``) and ``d = d + mu b`` (Nesterov) or ``d = b``; then ``p <- p - lr psi(d)``.

    Examples:
      >>> opt = sevo_sgd(1.0, np.array([[0.0, 1.0], [1.0, 0.0]]), beta=0.5, num_layers=1)
      >>> params = {"emb": jnp.zeros((2, 1))}
      >>> u, _ = opt.update({"emb": jnp.array([[3.0], [0.0]])}, opt.init(params), params)
      >>> np.asarray(u["emb"], float).round(4).tolist()
      [[-2.0], [-1.0]]
    """
    check_decay_rates(momentum=momentum)
    check_mask_argument("decay_mask", decay_mask)
    return optax.chain(
        optax.add_decayed_weights(weight_decay, mask=decay_mask),
        (optax.trace(decay=momentum, nesterov=nesterov) if momentum is not None
         else optax.identity()),
        sevo_smooth(
            adjacency, beta, num_layers, approx=approx, mask=mask, mesh=mesh, axis_name=axis_name,
            repair=repair,
        ),
        optax.scale_by_learning_rate(learning_rate),
    )
