"""Recommendation models of the SEvo paper (spec §4) in ``flax.linen``, and their losses.

Item ids are ``1..num_items`` and ``0`` is padding, so item tables have ``num_items + 1`` rows
(row 0 unused). Embedding tables are initialised Xavier normal. Scores are dot products with
the (tied) item table, so ``score_all`` returns ``(B, num_items + 1)`` whose column 0 the
metrics ignore.

The tables SEvo smooths sit at fixed parameter paths, selected by :func:`sevo_mask`:

* ``SASRec``, ``GRU4Rec``: ``params["item_embedding"]["embedding"]`` ``(num_items + 1, d)``.
* ``MFBPR``: ``params["table_0_users"]["embedding"]`` ``(num_users, d)`` and
  ``params["table_1_items"]["embedding"]`` ``(num_items + 1, d)``.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sevo_jax import masks

__all__ = [
    "SEVO_TABLES",
    "BiasFreeGRU",
    "Dropout",
    "GRU4Rec",
    "LayerNorm",
    "MFBPR",
    "SASRec",
    "SASRecBlock",
    "bias_free_gru_step",
    "bpr_loss",
    "masked_gru",
    "sasrec_loss",
    "sevo_mask",
]

SEVO_TABLES = ("item_embedding", "table_0_users", "table_1_items")

_xavier_normal = nn.initializers.xavier_normal()


def _dot_scores(table: nn.Embed, hidden: jax.Array, items: jax.Array) -> jax.Array:
    """``hidden (..., d)`` . ``table[items] (..., K, d)`` -> ``(..., K)``."""
    return jnp.einsum("...d,...kd->...k", hidden, table(items))


# --------------------------------------------------------------------------------------------
# SASRec
# --------------------------------------------------------------------------------------------


@jax.custom_vjp
def _scale_by(x: jax.Array, scale: jax.Array) -> jax.Array:
    return x * scale


def _scale_by_fwd(x, scale):
    return x * scale, scale


def _scale_by_bwd(scale, g):
    return g * scale, jnp.zeros_like(scale)


_scale_by.defvjp(_scale_by_fwd, _scale_by_bwd)


class Dropout(nn.Module):
    """``flax.linen.Dropout`` (same masks from the same keys) whose backward pass reuses the
    forward's ``keep / (1 - rate)`` factors.

    With ``nn.Dropout`` XLA:CPU recomputes each mask from its random bits inside the backward
    fusions; keeping the factors is 7% of SASRec's training step (BENCHMARKS.md). The class is
    named ``Dropout`` so that Flax names its instances ``Dropout_0``, ... as before, which keeps
    their rng streams (``make_rng`` folds in the module path) and so the masks unchanged.
    """

    rate: float

    @nn.compact
    def __call__(self, inputs: jax.Array, deterministic: bool) -> jax.Array:
        if self.rate == 0.0 or deterministic:
            return inputs
        keep_prob = 1.0 - self.rate
        keep = jax.random.bernoulli(self.make_rng("dropout"), p=keep_prob, shape=inputs.shape)
        scale = jnp.where(keep, jnp.asarray(1.0 / keep_prob, inputs.dtype),
                          jnp.zeros((), inputs.dtype))
        return _scale_by(inputs, scale)


@jax.custom_vjp
def _matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    return x @ w


def _matmul_fwd(x, w):
    return x @ w, (x, w)


def _matmul_bwd(res, g):
    x, w = res
    return g @ w.T, jax.lax.dot_general(x, g, (((0,), (0,)), ((), ())))


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def _dense_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """``lax.dot_general`` for Dense layers (contract lhs's last dims with rhs's first)."""
    (lc, rc), (lb, rb) = dimension_numbers
    k = len(lc)
    if (lb or rb or tuple(lc) != tuple(range(lhs.ndim - k, lhs.ndim))
            or tuple(rc) != tuple(range(k))):
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                                   preferred_element_type=preferred_element_type)
    batch, out = lhs.shape[:lhs.ndim - k], rhs.shape[k:]
    size = 1
    for n in rhs.shape[:k]:
        size *= n
    y = _matmul(lhs.reshape(-1, size), rhs.reshape(size, -1))
    return y.reshape(batch + out)


@jax.custom_vjp
def _layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    return _layer_norm_fwd(x, scale, bias, eps)[0]


def _layer_norm_fwd(x, scale, bias, eps):
    mean = x.mean(-1, keepdims=True)
    var = jnp.maximum((x * x).mean(-1, keepdims=True) - mean * mean, 0.0)
    rstd = jax.lax.rsqrt(var + eps)
    normed = (x - mean) * rstd
    return normed * scale + bias, (normed, rstd, scale)


def _layer_norm_bwd(res, g):
    normed, rstd, scale = res
    dnormed = g * scale
    dx = rstd * (dnormed - dnormed.mean(-1, keepdims=True)
                 - normed * (dnormed * normed).mean(-1, keepdims=True))
    axes = tuple(range(g.ndim - 1))
    return dx, (g * normed).sum(axes), g.sum(axes), None


_layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class LayerNorm(nn.Module):
    """``flax.linen.LayerNorm`` over the last axis (same parameters ``scale``, ``bias``, same
    ``E[x^2] - E[x]^2`` variance) with a hand-written backward pass::

        n = (x - mean) / sqrt(var + eps);  dx = (dn - mean(dn) - n mean(dn n)) / sqrt(var + eps)

    with ``dn = g * scale``; XLA:CPU's autodiff version costs 9% more of SASRec's step
    (BENCHMARKS.md).
    """

    epsilon: float = 1e-6

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],))
        return _layer_norm(x, scale, bias, self.epsilon)


class SASRecBlock(nn.Module):
    """One pre-LayerNorm SASRec block, laid out as in the SEvo reference implementation::

        q = LN1(x);  x = x + MHA(q, x, x; mask);  x = LN2(x);  x = x + FFN(x)

    with ``FFN(x) = Dropout(Dense(Dropout(ReLU(Dense(x)))))`` applied position-wise.
    """

    features: int
    num_heads: int
    dropout: float

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, *, deterministic: bool) -> jax.Array:
        q = LayerNorm(epsilon=1e-8, name="attention_norm")(x)
        attn = nn.MultiHeadDotProductAttention(
            num_heads=self.num_heads,
            qkv_features=self.features,
            out_features=self.features,
            dropout_rate=self.dropout,
            broadcast_dropout=False,  # independent masks per example and head, as in PyTorch
            qkv_dot_general=_dense_dot_general,
            out_dot_general=_dense_dot_general,
            name="attention",
        )(q, x, x, mask=mask, deterministic=deterministic)
        x = LayerNorm(epsilon=1e-8, name="ffn_norm")(x + attn)
        y = nn.Dense(self.features, dot_general=_dense_dot_general, name="ffn_in")(x)
        y = Dropout(self.dropout)(y, deterministic=deterministic)
        y = nn.Dense(self.features, dot_general=_dense_dot_general, name="ffn_out")(nn.relu(y))
        y = Dropout(self.dropout)(y, deterministic=deterministic)
        return x + y


class SASRec(nn.Module):
    """Self-attentive sequential recommendation (Kang & McAuley, 2018), pre-LN variant.

    Input: left-padded item sequences ``(B, T)`` int, ``T <= maxlen``, most recent item last.
    ``h_0 = Dropout(sqrt(d) * E[seq] + P)`` with learned positions ``P``, then ``num_blocks``
    causal blocks (:class:`SASRecBlock`) and a final LayerNorm. Hidden states of padding
    positions are zeroed after the embedding and after every block. Positions are right-aligned
    (the last input column always uses position ``maxlen - 1``), so inputs shorter than
    ``maxlen`` behave as if left-padded to ``maxlen``.

    ``mask_padding_keys`` (default True): query ``i`` attends to keys ``j <= i`` that are not
    padding. The SEvo reference implementation (MTandHJ/SEvo ``SASRec/main.py``) applies only
    the causal mask, so there a real item also attends to the left padding, whose zeroed states
    contribute the key/value biases; ``mask_padding_keys=False`` computes exactly that. The
    default is kept because every result in RESULTS.md was trained with it and the two differ by
    less than the seed noise on the synthetic set (validation NDCG@10, RESULTS.md "SASRec:
    padding keys").
    """

    num_items: int
    maxlen: int = 50
    features: int = 64
    num_blocks: int = 2
    num_heads: int = 1
    dropout: float = 0.3
    mask_padding_keys: bool = True

    def setup(self) -> None:
        self.item_embedding = nn.Embed(
            self.num_items + 1, self.features, embedding_init=_xavier_normal
        )
        self.position_embedding = nn.Embed(
            self.maxlen, self.features, embedding_init=_xavier_normal
        )
        self.embedding_dropout = Dropout(self.dropout)
        self.blocks = [
            SASRecBlock(self.features, self.num_heads, self.dropout)
            for _ in range(self.num_blocks)
        ]
        self.final_norm = LayerNorm(epsilon=1e-8)

    def __call__(self, seqs: jax.Array, *, deterministic: bool) -> jax.Array:
        """Returns the hidden state of every position, ``(B, T, d)``."""
        length = seqs.shape[-1]
        if length > self.maxlen:
            raise ValueError(f"sequence length {length} exceeds maxlen {self.maxlen}")
        valid = seqs != 0
        keep = valid[..., None].astype(jnp.float32)

        positions = jnp.arange(self.maxlen - length, self.maxlen)
        x = self.item_embedding(seqs) * jnp.sqrt(float(self.features))
        x = x + self.position_embedding(positions)
        x = self.embedding_dropout(x, deterministic=deterministic) * keep

        # Query i sees keys j <= i that are not padding. Padding queries may see no key at
        # all; Flax fills masked logits with the dtype's minimum (not -inf), so such rows get
        # a finite uniform softmax and are zeroed by `keep` right after.
        mask = nn.make_causal_mask(seqs, dtype=bool)
        if self.mask_padding_keys:
            mask = mask & valid[:, None, None, :]
        for block in self.blocks:
            x = block(x, mask, deterministic=deterministic) * keep
        return self.final_norm(x)

    def score(self, hidden: jax.Array, items: jax.Array) -> jax.Array:
        """Dot products ``(..., K)`` of ``hidden (..., d)`` with items ``(..., K)``."""
        return _dot_scores(self.item_embedding, hidden, items)

    def score_all(self, hidden: jax.Array) -> jax.Array:
        """Scores ``(B, num_items + 1)`` of ``hidden (B, d)`` against every item id."""
        return self.item_embedding.attend(hidden)


def sasrec_loss(pos_logits: jax.Array, neg_logits: jax.Array, mask: jax.Array) -> jax.Array:
    """Binary cross-entropy of each position's next item vs. one sampled negative.

    ``mean over mask of [-log sigmoid(pos) - log(1 - sigmoid(neg))]``, where ``mask`` (usually
    ``targets != 0``) selects the non-padding positions. Returns 0 when the mask is empty.
    """
    per_position = -jax.nn.log_sigmoid(pos_logits) - jax.nn.log_sigmoid(-neg_logits)
    mask = mask.astype(per_position.dtype)
    return (per_position * mask).sum() / jnp.maximum(mask.sum(), 1.0)


# --------------------------------------------------------------------------------------------
# GRU4Rec
# --------------------------------------------------------------------------------------------


def _gru_gates(w_input, w_recurrent, h, x):
    x_r, x_z, x_n = jnp.split(x @ w_input, 3, axis=-1)
    h_r, h_z, h_n = jnp.split(h @ w_recurrent, 3, axis=-1)
    r = jax.nn.sigmoid(x_r + h_r)
    z = jax.nn.sigmoid(x_z + h_z)
    n = jnp.tanh(x_n + r * h_n)
    return r, z, n, h_n


def bias_free_gru_step(w_input: jax.Array, w_recurrent: jax.Array, h: jax.Array,
                       x: jax.Array) -> jax.Array:
    """One step of a GRU without biases (PyTorch ``nn.GRU(bias=False)``)::

        r = sigmoid(W_ir x + W_hr h),  z = sigmoid(W_iz x + W_hz h)
        n = tanh(W_in x + r * (W_hn h)),  h' = (1 - z) * n + z * h

    ``w_input (d_in, 3d)`` and ``w_recurrent (d, 3d)`` hold the three gates side by side.
    """
    _, z, n, _ = _gru_gates(w_input, w_recurrent, h, x)
    return (1.0 - z) * n + z * h


def _bias_free_gru_step_vjp(w_input, w_recurrent, h, x, dh_new):
    """``(dW_input, dW_recurrent, dh, dx)`` of :func:`bias_free_gru_step` given ``dh_new``."""
    r, z, n, h_n = _gru_gates(w_input, w_recurrent, h, x)
    dn = dh_new * (1.0 - z) * (1.0 - n * n)       # through tanh
    dz = dh_new * (h - n) * z * (1.0 - z)          # through sigmoid
    dr = dn * h_n * r * (1.0 - r)
    d_xgates = jnp.concatenate([dr, dz, dn], axis=-1)
    d_hgates = jnp.concatenate([dr, dz, dn * r], axis=-1)
    dh = dh_new * z + d_hgates @ w_recurrent.T
    return x.T @ d_xgates, h.T @ d_hgates, dh, d_xgates @ w_input.T


def _dropped(x, key, rate):
    """Inverted dropout of ``x`` with the mask drawn from ``key`` (identity at rate 0)."""
    if rate == 0.0:
        return x, 1.0
    scale = jax.random.bernoulli(key, 1.0 - rate, x.shape) / (1.0 - rate)
    return x * scale, scale


def _group_keys(key, steps, groups):
    """One dropout key per (time step, group): ``(T, G)`` keys."""
    return jax.vmap(lambda k: jax.random.split(k, groups))(jax.random.split(key, steps))


def _groups_scan(w_input, w_recurrent, x, valid, key, rate):
    """Forward: final state ``(G, S, d)`` and the state before every step ``(T, G, S, d)``."""
    steps, groups, size = valid.shape
    features = w_recurrent.shape[0]

    def group_step(h, x_g, valid_g, key_g):
        x_g, _ = _dropped(x_g, key_g, rate)
        return jnp.where(valid_g[:, None], bias_free_gru_step(w_input, w_recurrent, h, x_g), h)

    def time_step(h, inputs):
        x_t, valid_t, keys_t = inputs
        new_h = jnp.stack([
            jax.lax.cond(valid_t[g].any(), group_step, lambda h, *_: h,
                         h[g], x_t[g], valid_t[g], keys_t[g])
            for g in range(groups)
        ])
        return new_h, h

    h0 = jnp.zeros((groups, size, features), x.dtype)
    return jax.lax.scan(time_step, h0, (x, valid, _group_keys(key, steps, groups)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _masked_gru_groups(w_input, w_recurrent, x, valid, key, rate):
    return _groups_scan(w_input, w_recurrent, x, valid, key, rate)[0]


def _masked_gru_groups_fwd(w_input, w_recurrent, x, valid, key, rate):
    last, before = _groups_scan(w_input, w_recurrent, x, valid, key, rate)
    return last, (w_input, w_recurrent, x, valid, key, before)


def _masked_gru_groups_bwd(rate, residuals, d_last):
    # Hand-written reverse pass: a group skips every step at which none of its rows is valid
    # (JAX's own transpose of the forward scan does the full work at every step), and the
    # dropout masks are redrawn from their keys instead of stored.
    w_input, w_recurrent, x, valid, key, before = residuals
    steps, groups, _ = valid.shape

    def group_vjp(carry, h, x_g, valid_g, key_g, dh_g):
        dw_i, dw_h = carry
        x_g, scale = _dropped(x_g, key_g, rate)
        dh_new = jnp.where(valid_g[:, None], dh_g, 0.0)
        gw_i, gw_h, dh, dx = _bias_free_gru_step_vjp(w_input, w_recurrent, h, x_g, dh_new)
        return (dw_i + gw_i, dw_h + gw_h), jnp.where(valid_g[:, None], dh, dh_g), dx * scale

    def skip(carry, h, x_g, valid_g, key_g, dh_g):
        return carry, dh_g, jnp.zeros_like(x_g)

    def time_step(carry, inputs):
        dws, dh = carry
        x_t, valid_t, keys_t, h_t = inputs
        dh_out, dx_out = [], []
        for g in range(groups):
            dws, dh_g, dx_g = jax.lax.cond(valid_t[g].any(), group_vjp, skip, dws, h_t[g],
                                           x_t[g], valid_t[g], keys_t[g], dh[g])
            dh_out.append(dh_g)
            dx_out.append(dx_g)
        return (dws, jnp.stack(dh_out)), jnp.stack(dx_out)

    init = ((jnp.zeros_like(w_input), jnp.zeros_like(w_recurrent)), d_last)
    inputs = (x, valid, _group_keys(key, steps, groups), before)
    ((dw_i, dw_h), _), dx = jax.lax.scan(time_step, init, inputs, reverse=True)
    return dw_i, dw_h, dx, None, None


_masked_gru_groups.defvjp(_masked_gru_groups_fwd, _masked_gru_groups_bwd)


def masked_gru(w_input: jax.Array, w_recurrent: jax.Array, x: jax.Array, valid: jax.Array,
               row_groups: int = 1, dropout: float = 0.0,
               dropout_key: jax.Array | None = None) -> jax.Array:
    """Final state ``(B, d)`` of a bias-free GRU over time-major ``x (T, B, d_in)`` from
    ``h = 0``, where steps with ``valid (T, B)`` false leave a row's state unchanged.

    ``dropout`` drops input entries (inverted dropout, masks from ``dropout_key``) of valid
    steps, which is elementwise dropout on ``x`` (the padding steps' inputs are never read).

    The batch is split into ``row_groups`` consecutive groups of rows, and a group skips
    (``lax.cond``, forward and backward, dropout masks included) every step at which none of
    its rows is valid. The function does not depend on ``row_groups`` (nor do the dropout
    masks' distribution); with rows sorted by length and left-padded sequences of very
    different lengths (GRU4Rec's prefixes: mean 8 of 50 positions on Beauty) skipping saves
    most of the work.
    """
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if dropout and dropout_key is None:
        raise ValueError("dropout > 0 needs a dropout_key")
    steps, batch, d_in = x.shape
    pad = -batch % row_groups
    x = jnp.pad(x, ((0, 0), (0, pad), (0, 0))).reshape(steps, row_groups, -1, d_in)
    valid = jnp.pad(valid, ((0, 0), (0, pad))).reshape(steps, row_groups, -1)
    key = jax.random.PRNGKey(0) if dropout_key is None else dropout_key
    last = _masked_gru_groups(w_input, w_recurrent, x, valid, key, float(dropout))
    return last.reshape(batch + pad, -1)[:batch]


class BiasFreeGRU(nn.Module):
    """One bias-free GRU layer over padded sequences (:func:`masked_gru`) with dropout on its
    inputs (``dropout``, rng stream ``"dropout"``); both kernels are Xavier uniform like the
    reference implementation (``flax.linen.GRUCell`` always carries input biases, hence this
    layer). ``row_groups`` only changes speed."""

    features: int
    dropout: float = 0.0
    row_groups: int = 8
    kernel_init: nn.initializers.Initializer = nn.initializers.xavier_uniform()

    @nn.compact
    def __call__(self, x: jax.Array, valid: jax.Array, *, deterministic: bool = True) -> jax.Array:
        """Final states ``(B, d)`` of time-major ``x (T, B, d_in)`` (:func:`masked_gru`)."""
        w_input = self.param("input_kernel", self.kernel_init, (x.shape[-1], 3 * self.features))
        w_recurrent = self.param("recurrent_kernel", self.kernel_init,
                                 (self.features, 3 * self.features))
        rate = 0.0 if deterministic else self.dropout
        key = self.make_rng("dropout") if rate else None
        return masked_gru(w_input, w_recurrent, x, valid, self.row_groups, rate, key)


class GRU4Rec(nn.Module):
    """GRU4Rec (Hidasi et al., 2016) as in the SEvo reference implementation.

    ``Embed (Xavier normal) -> Dropout -> one bias-free GRU layer -> Dense``; the user vector is
    the Dense output at the last non-padding position. Padding steps leave the GRU state
    unchanged, so left- and right-padded inputs give the same user vector (and an all-padding
    row gives ``Dense(0)``). ``row_groups`` (:func:`masked_gru`) only changes speed: on Beauty's
    training prefixes the loss and gradient take 0.23x a plain scan's time on a CPU core
    (``benchmarks/bench_gru.py``).
    """

    num_items: int
    features: int = 64
    dropout: float = 0.4
    row_groups: int = 8

    def setup(self) -> None:
        self.item_embedding = nn.Embed(
            self.num_items + 1, self.features, embedding_init=_xavier_normal
        )
        # The embedding dropout of spec §4 is drawn inside the GRU, for valid steps only.
        self.gru = BiasFreeGRU(self.features, self.dropout, self.row_groups)
        self.dense = nn.Dense(self.features)

    def __call__(self, seqs: jax.Array, *, deterministic: bool) -> jax.Array:
        """Returns the user vectors ``(B, d)`` of item sequences ``(B, T)``."""
        # Longest rows first, so that the GRU's row groups skip the padding steps of short ones;
        # time-major ids, so that no float array is transposed.
        order = jnp.argsort(-(seqs != 0).sum(axis=1), stable=True)
        seqs = seqs[order].T
        last = self.gru(self.item_embedding(seqs), seqs != 0, deterministic=deterministic)
        return self.dense(last[jnp.argsort(order)])

    def score(self, hidden: jax.Array, items: jax.Array) -> jax.Array:
        """Dot products ``(..., K)`` of ``hidden (..., d)`` with items ``(..., K)``."""
        return _dot_scores(self.item_embedding, hidden, items)

    def score_all(self, hidden: jax.Array) -> jax.Array:
        """Scores ``(B, num_items + 1)`` of ``hidden (B, d)`` against every item id."""
        return self.item_embedding.attend(hidden)


def bpr_loss(
    pos_logits: jax.Array, neg_logits: jax.Array, mask: jax.Array | None = None
) -> jax.Array:
    """Bayesian personalised ranking loss, ``mean[-log sigmoid(pos - neg)]`` (over ``mask``)."""
    per_pair = -jax.nn.log_sigmoid(pos_logits - neg_logits)
    if mask is None:
        return per_pair.mean()
    mask = mask.astype(per_pair.dtype)
    return (per_pair * mask).sum() / jnp.maximum(mask.sum(), 1.0)


# --------------------------------------------------------------------------------------------
# MF-BPR
# --------------------------------------------------------------------------------------------


class MFBPR(nn.Module):
    """Matrix factorisation, ``score(u, i) = <U_u, V_i>``, trained with :func:`bpr_loss`.

    The tables are named ``table_0_users`` and ``table_1_items`` so that flattening the params
    (dict keys in sorted order) yields the user table before the item table: the node order of
    the user-item graph (users first, then items with padding), along which SEvo stacks the two
    tables before smoothing them jointly.
    """

    num_users: int
    num_items: int
    features: int = 64

    def setup(self) -> None:
        self.table_0_users = nn.Embed(
            self.num_users, self.features, embedding_init=_xavier_normal
        )
        self.table_1_items = nn.Embed(
            self.num_items + 1, self.features, embedding_init=_xavier_normal
        )

    def __call__(self, users: jax.Array) -> jax.Array:
        """Returns the user vectors ``(..., d)`` of user ids ``(...)``."""
        if self.is_initializing():
            self.table_1_items.attend(jnp.zeros((1, self.features)))  # create the item table
        return self.table_0_users(users)

    def score(self, hidden: jax.Array, items: jax.Array) -> jax.Array:
        """Dot products ``(..., K)`` of ``hidden (..., d)`` with items ``(..., K)``."""
        return _dot_scores(self.table_1_items, hidden, items)

    def score_all(self, hidden: jax.Array) -> jax.Array:
        """Scores ``(B, num_items + 1)`` of ``hidden (B, d)`` against every item id."""
        return self.table_1_items.attend(hidden)


# --------------------------------------------------------------------------------------------
# Optimizer masks
# --------------------------------------------------------------------------------------------


def sevo_mask(params: Any, tables: tuple[str, ...] = SEVO_TABLES) -> Any:
    """Pytree of bools over ``params``: True exactly for the embedding tables SEvo smooths.

    A leaf is selected when it is named ``embedding`` and a module on its path is one of
    ``tables`` (by default the item tables of SASRec/GRU4Rec and both MF-BPR tables; positional
    embeddings are not selected). Works on Linen ``params`` or the full ``{"params": ...}``
    dict, on Flax NNX state (``nnx.Optimizer``'s ``tx.init`` and ``tx.update`` arguments) and on
    plain dicts, and plugs into ``optax.masked``. Built on :func:`sevo_jax.masks.select_tables`
    with the paths ``{table}/embedding`` and ``{table}/*/embedding``.
    """
    patterns = [p for t in tables for p in (f"{t}/embedding", f"{t}/*/embedding")]
    return masks.select_tables(*patterns)(params)
