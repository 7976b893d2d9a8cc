"""Recommendation models of the SEvo paper (spec §4) in ``flax.linen``, and their losses.

Item ids are ``1..num_items`` and ``0`` is padding, so item tables have ``num_items + 1`` rows
(row 0 unused). Embedding tables are initialised Xavier normal. Scores are dot products with
the (tied) item table, so ``score_all`` returns ``(B, num_items + 1)`` whose column 0 the
metrics ignore.

The tables SEvo smooths sit at fixed parameter paths, selected by :func:`sevo_mask`:

* ``SASRec``, ``GRU4Rec``: ``params["item_embedding"]["embedding"]`` ``(num_items + 1, d)``.
* ``MFBPR``: ``params["table_0_users"]["embedding"]`` ``(num_users, d)`` and
  ``params["table_1_items"]["embedding"]`` ``(num_items + 1, d)`` (the user-item form smooths
  both on the user-item graph; the item-item form only the item table).
* ``BERT4Rec``: ``params["item_embedding"]["embedding"]`` and the output layer's
  ``params["output_embedding"]["embedding"]``, both ``(num_items + 2, d)`` (row
  ``num_items + 1`` is the mask token), each smoothed on its own by the same graph.
* ``STOSA``: ``params["mean_embedding"]["embedding"]`` and
  ``params["covariance_embedding"]["embedding"]``, both ``(num_items + 1, d)``, each smoothed on
  its own by the same graph.

Two tables smoothed "each on its own by the same graph ``A``" are one signal on the
block-diagonal graph ``diag(A, A)`` (psi acts on each block alone), which is how the trainer
passes them to ``sevo_smooth`` (``sevo_jax.training.build_graph``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from sevo_jax import masks

__all__ = [
    "SEVO_TABLES",
    "BERT4Rec",
    "BERT4RecBlock",
    "BiasFreeGRU",
    "Dropout",
    "GRU4Rec",
    "LayerNorm",
    "MFBPR",
    "SASRec",
    "SASRecBlock",
    "STOSA",
    "STOSALayer",
    "bias_free_gru_step",
    "bpr_loss",
    "cloze_loss",
    "dropout_keep",
    "masked_gru",
    "right_aligned_positions",
    "same_segment",
    "sasrec_loss",
    "sevo_mask",
    "stosa_loss",
    "table_cross_entropy",
    "threefry_bits",
    "wasserstein_distance",
    "wasserstein_distance_matrix",
]

SEVO_TABLES = ("item_embedding", "table_0_users", "table_1_items", "output_embedding",
               "mean_embedding", "covariance_embedding")

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


_THREEFRY_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def _rotate_left(x: jax.Array, bits: int) -> jax.Array:
    return lax.bitwise_or(lax.shift_left(x, np.uint32(bits)),
                          lax.shift_right_logical(x, np.uint32(32 - bits)))


def _threefry_hash(key_words: jax.Array, size: int) -> tuple[jax.Array, jax.Array]:
    """Threefry-2x32 (20 rounds, unrolled) of the counters ``(0, i)``, ``i < size``, under
    each key ``key_words (..., 2)``: the two output words, each ``(..., size)``."""
    shape = key_words.shape[:-1] + (size,)
    k0, k1 = (lax.broadcast_in_dim(key_words[..., j].astype(jnp.uint32), shape,
                                   tuple(range(len(shape) - 1))) for j in range(2))
    ks = (k0, k1, lax.bitwise_xor(lax.bitwise_xor(k0, k1), np.uint32(0x1BD11BDA)))
    x0 = ks[0]
    x1 = lax.add(lax.broadcasted_iota(jnp.uint32, shape, len(shape) - 1), ks[1])
    for i in range(5):  # lax, not jnp operators: tracing the 20 rounds is 2-3x quicker
        for r in _THREEFRY_ROTATIONS[i % 2]:
            x0 = lax.add(x0, x1)
            x1 = lax.bitwise_xor(x0, _rotate_left(x1, r))
        x0 = lax.add(x0, ks[(i + 1) % 3])
        x1 = lax.add(lax.add(x1, ks[(i + 2) % 3]), np.uint32(i + 1))
    return x0, x1


def _unrolled_threefry(key: jax.Array, size: int) -> bool:
    """Whether :func:`_threefry_hash` computes JAX's bits and splits of ``key``: a threefry key
    in JAX's partitionable mode (``jax_threefry_partitionable``, the default)."""
    typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
    flags: Any = jax.config  # its flags are attributes that mypy does not see
    impl = str(jax.random.key_impl(key)) if typed else str(flags.jax_default_prng_impl)
    return "threefry2x32" in impl and flags.jax_threefry_partitionable and size < 2**32


def _key_words(key: jax.Array) -> jax.Array:
    return jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key


def threefry_bits(key: jax.Array, size: int) -> jax.Array:
    """``jax.random.bits(key, (size,), jnp.uint32)``, bit for bit, for a threefry key.

    Threefry-2x32 (20 rounds) of the counters ``(0, i)``, ``i < size``, words XOR-ed: JAX's
    partitionable threefry (``jax_threefry_partitionable``, the default). JAX lowers the
    hash on CPU as a rolled 5-step loop that writes every intermediate array to memory; here
    the rounds are unrolled so that XLA fuses them into the consumer (about 10x faster on
    XLA:CPU, BENCHMARKS.md). Keys of another implementation, or the non-partitionable
    setting, fall back to ``jax.random.bits``.

    Examples:
      >>> key = jax.random.PRNGKey(0)
      >>> bool((threefry_bits(key, 5) == jax.random.bits(key, (5,), jnp.uint32)).all())
      True
    """
    if not _unrolled_threefry(key, size):
        return jax.random.bits(key, (size,), jnp.uint32)
    return lax.bitwise_xor(*_threefry_hash(_key_words(key), size))


def split_key_grid(key: jax.Array, rows: int, cols: int) -> jax.Array:
    """``(rows, cols)`` keys, ``vmap(lambda k: split(k, cols))(split(key, rows))``, bit for bit.

    For a threefry key (partitionable mode) both levels of splits are the unrolled hash of
    :func:`threefry_bits`: JAX's rolled split loops compile slowly on XLA:CPU (0.5-0.75 s
    each, BENCHMARKS.md). Typed keys give typed keys, raw ``uint32`` keys raw ones.

    Examples:
      >>> key = jax.random.PRNGKey(0)
      >>> expected = jax.vmap(lambda k: jax.random.split(k, 3))(jax.random.split(key, 2))
      >>> bool((split_key_grid(key, 2, 3) == expected).all())
      True
    """
    for name, count in (("rows", rows), ("cols", cols)):
        if isinstance(count, (bool, np.bool_)) or not isinstance(count, (int, np.integer)) \
                or count < 0:
            raise ValueError(f"split_key_grid needs a non-negative integer {name}, got {count!r}")
    if not _unrolled_threefry(key, max(rows, cols)):
        return jax.vmap(lambda k: jax.random.split(k, cols))(jax.random.split(key, rows))
    rows_keys = jnp.stack(_threefry_hash(_key_words(key), rows), axis=-1)
    grid = jnp.stack(_threefry_hash(rows_keys, cols), axis=-1)
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jax.random.wrap_key_data(grid, impl=jax.random.key_impl(key))
    return grid


def dropout_keep(key: jax.Array, keep_prob: float, shape: tuple[int, ...], bits: int = 32
                 ) -> jax.Array:
    """Boolean keep mask, each entry True with probability ``keep_prob``.

    ``bits = 32``: ``jax.random.bernoulli(key, keep_prob, shape)``, the masks of Flax's
    dropout (the same uniform floats ``[1, 2) - 1`` from the 23 high bits of each word).
    ``bits = 16``: two uniform 16-bit integers per 32-bit random word, kept when below
    ``round(keep_prob * 2^16)``, so the keep probability is exact to 2^-17 and half as many
    random words are drawn; different masks from the same key. Both draw their words with
    :func:`threefry_bits` (the words of ``jax.random.bits``).
    """
    size = math.prod(shape)
    if bits == 32:
        words = threefry_bits(key, size)
        floats = jax.lax.bitcast_convert_type((words >> 9) | jnp.uint32(0x3F800000),
                                              jnp.float32) - 1.0
        return (floats < jnp.float32(keep_prob)).reshape(shape)
    if bits != 16:
        raise ValueError(f"dropout mask bits must be 16 or 32, got {bits}")
    words = threefry_bits(key, -(-size // 2))
    halves = jnp.concatenate([words >> 16, words & 0xFFFF])[:size]
    return (halves < jnp.uint32(round(keep_prob * 65536))).reshape(shape)


class Dropout(nn.Module):
    """``flax.linen.Dropout`` whose backward pass reuses the forward's ``keep / (1 - rate)``
    factors; ``mask_bits = 32`` draws the same masks from the same keys, 16 draws them faster
    (:func:`dropout_keep`).

    With ``nn.Dropout`` XLA:CPU recomputes each mask from its random bits inside the backward
    fusions; keeping the factors is 7% of SASRec's training step (BENCHMARKS.md). The class is
    named ``Dropout`` so that Flax names its instances ``Dropout_0``, ... as before, which keeps
    their rng streams (``make_rng`` folds in the module path).
    """

    rate: float
    mask_bits: int = 32

    @nn.compact
    def __call__(self, inputs: jax.Array, deterministic: bool) -> jax.Array:
        if self.rate == 0.0 or deterministic:
            return inputs
        return _dropout(inputs, self.make_rng("dropout"), self.rate, self.mask_bits)


def _dropout(x: jax.Array, key: jax.Array, rate: float, mask_bits: int = 32) -> jax.Array:
    """``x * keep / (1 - rate)`` with ``keep = dropout_keep(key, 1 - rate, x.shape,
    mask_bits)``; the backward pass multiplies by the stored factors."""
    keep_prob = 1.0 - rate
    keep = dropout_keep(key, keep_prob, x.shape, mask_bits)
    scale = jnp.where(keep, jnp.asarray(1.0 / keep_prob, x.dtype), jnp.zeros((), x.dtype))
    return _scale_by(x, scale)


def attention_with_dropout(mask_bits: int) -> Callable[..., jax.Array]:
    """An ``attention_fn`` for ``nn.MultiHeadDotProductAttention``: Flax's
    ``dot_product_attention`` (same weights, same rng) whose attention-weight dropout draws
    :func:`dropout_keep` masks of ``mask_bits`` and keeps the factors for the backward pass,
    as :class:`Dropout` (per example and head: ``broadcast_dropout=False`` only)."""

    def attention(query, key, value, mask=None, dropout_rng=None, dropout_rate=0.0,
                  broadcast_dropout=False, deterministic=False, dtype=None, precision=None):
        if broadcast_dropout and dropout_rate > 0.0 and not deterministic:
            raise ValueError("attention_with_dropout draws per-example masks: "
                             "set broadcast_dropout=False")
        weights = nn.dot_product_attention_weights(query, key, mask=mask, deterministic=True,
                                                   dtype=dtype, precision=precision)
        if not deterministic and dropout_rate > 0.0:
            weights = _dropout(weights, dropout_rng, dropout_rate, mask_bits)
        return jnp.einsum("...hqk,...khd->...qhd", weights, value, precision=precision)

    return attention


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
    size = math.prod(rhs.shape[:k])
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


def right_aligned_positions(maxlen: int, length: int,
                            columns: jax.Array | None = None) -> jax.Array:
    """Position ids of an input ``(B, length)``'s columns, right-aligned to ``maxlen``:
    ``maxlen - length + column``. ``columns``: each item's column before packing
    (``sevo_jax.training.pack_rows``' ``positions``); default every column in order.

    Examples:
      >>> right_aligned_positions(5, 3).tolist()
      [2, 3, 4]
      >>> right_aligned_positions(5, 3, jnp.array([[0, 2, 1]])).tolist()
      [[2, 4, 3]]
    """
    return maxlen - length + (jnp.arange(length) if columns is None else columns)


def same_segment(segments: jax.Array) -> jax.Array:
    """``(B, 1, T, T)`` attention mask of packed rows: query ``i`` may see key ``j`` iff both
    belong to the same sequence (``segments[b, i] == segments[b, j]``).

    Examples:
      >>> same_segment(jnp.array([[1, 1, 2]]))[0, 0].astype(int).tolist()
      [[1, 1, 0], [1, 1, 0], [0, 0, 1]]
    """
    return (segments[:, :, None] == segments[:, None, :])[:, None]


class SASRecBlock(nn.Module):
    """One pre-LayerNorm SASRec block, laid out as in the SEvo reference implementation::

        q = LN1(x);  x = x + MHA(q, x, x; mask);  x = LN2(x);  x = x + FFN(x)

    with ``FFN(x) = Dropout(Dense(Dropout(ReLU(Dense(x)))))`` applied position-wise.
    """

    features: int
    num_heads: int
    dropout: float
    dropout_bits: int = 32

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
            attention_fn=attention_with_dropout(self.dropout_bits),
            name="attention",
        )(q, x, x, mask=mask, deterministic=deterministic)
        x = LayerNorm(epsilon=1e-8, name="ffn_norm")(x + attn)
        y = nn.Dense(self.features, dot_general=_dense_dot_general, name="ffn_in")(x)
        y = Dropout(self.dropout, self.dropout_bits)(y, deterministic=deterministic)
        y = nn.Dense(self.features, dot_general=_dense_dot_general, name="ffn_out")(nn.relu(y))
        y = Dropout(self.dropout, self.dropout_bits)(y, deterministic=deterministic)
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

    ``dropout_bits``: random bits per dropout decision (:func:`dropout_keep`); 32 (the default
    here) draws flax's masks, 16 draws other masks faster (``sevo-train``'s default).
    """

    num_items: int
    maxlen: int = 50
    features: int = 64
    num_blocks: int = 2
    num_heads: int = 1
    dropout: float = 0.3
    mask_padding_keys: bool = True
    dropout_bits: int = 32

    def setup(self) -> None:
        self.item_embedding = nn.Embed(
            self.num_items + 1, self.features, embedding_init=_xavier_normal
        )
        self.position_embedding = nn.Embed(
            self.maxlen, self.features, embedding_init=_xavier_normal
        )
        self.embedding_dropout = Dropout(self.dropout, self.dropout_bits)
        self.blocks = [
            SASRecBlock(self.features, self.num_heads, self.dropout, self.dropout_bits)
            for _ in range(self.num_blocks)
        ]
        self.final_norm = LayerNorm(epsilon=1e-8)

    def __call__(self, seqs: jax.Array, *, deterministic: bool, positions: jax.Array | None = None,
                 segments: jax.Array | None = None) -> jax.Array:
        """Returns the hidden state of every position, ``(B, T, d)``.

        Packed rows (:func:`sevo_jax.training.pack_rows`): ``positions`` ``(B, T)`` gives the
        column each item had before packing (its position is then ``maxlen - T + column``) and
        ``segments`` ``(B, T)`` the sequence it belongs to; an item then attends only to
        earlier items of its own segment."""
        length = seqs.shape[-1]
        if length > self.maxlen:
            raise ValueError(f"sequence length {length} exceeds maxlen {self.maxlen}")
        valid = seqs != 0
        keep = valid[..., None].astype(jnp.float32)

        positions = right_aligned_positions(self.maxlen, length, positions)
        x = self.item_embedding(seqs) * jnp.sqrt(float(self.features))
        x = x + self.position_embedding(positions)
        x = self.embedding_dropout(x, deterministic=deterministic) * keep

        # Query i sees keys j <= i that are not padding. Padding queries may see no key at
        # all; Flax fills masked logits with the dtype's minimum (not -inf), so such rows get
        # a finite uniform softmax and are zeroed by `keep` right after.
        mask = nn.make_causal_mask(seqs, dtype=bool)
        if self.mask_padding_keys:
            mask = mask & valid[:, None, None, :]
        if segments is not None:
            mask = mask & same_segment(segments)
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
    """Inverted dropout of ``x`` with the mask drawn from ``key`` (identity at rate 0):
    ``(x * keep / (1 - rate), keep)``."""
    if rate == 0.0:
        return x, None
    keep = dropout_keep(key, 1.0 - rate, x.shape)
    return x * (keep / (1.0 - rate)), keep


def _active_steps(valid):
    """``(first, end)``, each ``(G,)``: every step at which some row of group ``g`` is valid
    lies in ``[first[g], end[g])`` (an empty range for a group with no valid step)."""
    any_valid = valid.any(axis=-1)                                   # (T, G)
    steps = valid.shape[0]
    has_any = any_valid.any(axis=0)
    first = jnp.where(has_any, jnp.argmax(any_valid, axis=0), 0)
    end = jnp.where(has_any, steps - jnp.argmax(any_valid[::-1], axis=0), 0)
    return first, end


def _groups_scan(w_input, w_recurrent, x, valid, key, rate):
    """Forward: final state ``(G, S, d)``, the state before every step ``(T, G, S, d)`` and
    the dropout keep mask of every input ``(T, G, S, d_in)`` (``None`` at rate 0); both are
    zeros outside each group's active steps.

    One loop over the groups, each running its own active steps (:func:`_active_steps`), so the
    program holds one copy of the GRU step however many groups there are."""
    steps, groups, size = valid.shape
    keys = split_key_grid(key, steps, groups)
    first, end = _active_steps(valid)
    h0 = jnp.zeros((size, w_recurrent.shape[0]), x.dtype)

    def group(saved, g):
        def step(t, carry):
            h, (before, kept) = carry
            x_t, keep = _dropped(x[t, g], keys[t, g], rate)
            new_h = bias_free_gru_step(w_input, w_recurrent, h, x_t)
            if keep is not None:
                kept = kept.at[t, g].set(keep)
            return jnp.where(valid[t, g][:, None], new_h, h), (before.at[t, g].set(h), kept)

        h, saved = jax.lax.fori_loop(first[g], end[g], step, (h0, saved))
        return saved, h

    before = jnp.zeros(valid.shape + h0.shape[-1:], x.dtype)
    kept = jnp.zeros(x.shape, bool) if rate else None
    (before, kept), last = jax.lax.scan(group, (before, kept), jnp.arange(groups))
    return last, before, kept


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _masked_gru_groups(w_input, w_recurrent, x, valid, key, rate):
    return _groups_scan(w_input, w_recurrent, x, valid, key, rate)[0]


def _masked_gru_groups_fwd(w_input, w_recurrent, x, valid, key, rate):
    last, before, kept = _groups_scan(w_input, w_recurrent, x, valid, key, rate)
    return last, (w_input, w_recurrent, x, valid, before, kept)


def _masked_gru_groups_bwd(rate, residuals, d_last):
    # Hand-written reverse pass over each group's active steps only (JAX's own transpose of a
    # scan does the full work at every step; a loop with dynamic bounds has no transpose),
    # reading the forward's dropout masks (1 byte per input, not redrawn).
    w_input, w_recurrent, x, valid, before, kept = residuals
    groups = valid.shape[1]
    first, end = _active_steps(valid)

    def group(carry, g):
        def step(i, carry):
            dw_i, dw_h, dh, dx = carry
            t = end[g] - 1 - i
            valid_t = valid[t, g][:, None]
            scale = 1.0 if kept is None else kept[t, g] / (1.0 - rate)
            gw_i, gw_h, dh_before, dx_t = _bias_free_gru_step_vjp(
                w_input, w_recurrent, before[t, g], x[t, g] * scale, jnp.where(valid_t, dh, 0.0))
            return (dw_i + gw_i, dw_h + gw_h, jnp.where(valid_t, dh_before, dh),
                    dx.at[t, g].set(dx_t * scale))

        dw_i, dw_h, dx = carry
        dw_i, dw_h, _, dx = jax.lax.fori_loop(0, end[g] - first[g], step,
                                              (dw_i, dw_h, d_last[g], dx))
        return (dw_i, dw_h, dx), None

    init = (jnp.zeros_like(w_input), jnp.zeros_like(w_recurrent), jnp.zeros_like(x))
    (dw_i, dw_h, dx), _ = jax.lax.scan(group, init, jnp.arange(groups))
    return dw_i, dw_h, dx, None, None


_masked_gru_groups.defvjp(_masked_gru_groups_fwd, _masked_gru_groups_bwd)


def masked_gru(w_input: jax.Array, w_recurrent: jax.Array, x: jax.Array, valid: jax.Array,
               row_groups: int = 1, dropout: float = 0.0,
               dropout_key: jax.Array | None = None) -> jax.Array:
    """Final state ``(B, d)`` of a bias-free GRU over time-major ``x (T, B, d_in)`` from
    ``h = 0``, where steps with ``valid (T, B)`` false leave a row's state unchanged.

    ``dropout`` drops input entries (inverted dropout, masks from ``dropout_key``) of valid
    steps, which is elementwise dropout on ``x`` (the padding steps' inputs are never read).

    The batch is split into ``row_groups`` consecutive groups of rows, and each group runs
    (forward and backward, dropout masks included) only the steps from its first to its last
    step with a valid row: one loop over the groups with one copy of the GRU step inside, so
    the program's size and compile time do not grow with ``row_groups``. The function does
    not depend on ``row_groups`` (nor does the dropout masks' distribution); with rows sorted
    by length and left-padded sequences of very different lengths (GRU4Rec's prefixes: mean 8
    of 50 positions on Beauty) skipping saves most of the work. The backward pass keeps the
    forward's states ``(T, B, d)`` and dropout masks (one byte per input).
    """
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if dropout and dropout_key is None:
        raise ValueError("dropout > 0 needs a dropout_key")
    if isinstance(row_groups, (bool, np.bool_)) or not isinstance(row_groups, (int, np.integer)) \
            or row_groups < 1:
        raise ValueError(f"row_groups must be a positive integer, got {row_groups!r}")
    if x.ndim != 3 or valid.shape != x.shape[:2]:
        raise ValueError(f"masked_gru needs time-major x (T, B, d_in) and valid (T, B), got "
                         f"{x.shape} and {valid.shape}")
    d = w_recurrent.shape[0]
    if w_recurrent.shape != (d, 3 * d) or w_input.shape != (x.shape[-1], 3 * d):
        raise ValueError(f"masked_gru needs w_input (d_in, 3d) and w_recurrent (d, 3d) with "
                         f"d_in = {x.shape[-1]}, got {w_input.shape} and {w_recurrent.shape}")
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
    training prefixes the loss and gradient take 0.16-0.20x a plain scan's time on a CPU core
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

    Both tables start ``Normal(0, 1e-4)``, as in the reference (MTandHJ/SEvo ``MF-BPR/main.py``
    ``reset_parameters``).
    """

    num_users: int
    num_items: int
    features: int = 64

    def setup(self) -> None:
        init = nn.initializers.normal(1e-4)
        self.table_0_users = nn.Embed(self.num_users, self.features, embedding_init=init)
        self.table_1_items = nn.Embed(self.num_items + 1, self.features, embedding_init=init)

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
# BERT4Rec
# --------------------------------------------------------------------------------------------


def clamped_xavier_normal(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32
                          ) -> jax.Array:
    """Xavier normal (fan-in ``prod(shape[:-1])``, fan-out ``shape[-1]``) clipped to
    ``[-0.02, 0.02]``: the reference BERT4Rec's init of every Linear and Embedding weight."""
    std = (2.0 / (math.prod(shape[:-1]) + shape[-1])) ** 0.5
    return jnp.clip(std * jax.random.normal(key, shape, dtype), -0.02, 0.02)


def _torch_in_projection(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32
                         ) -> jax.Array:
    """PyTorch ``MultiheadAttention``'s query/key/value init: Xavier uniform of the stacked
    ``(3d, d)`` projection, i.e. bound ``sqrt(6 / (d + 3d))`` for each ``(d, heads, d/heads)``."""
    bound = (6.0 / (4 * shape[0])) ** 0.5
    return jax.random.uniform(key, shape, dtype, -bound, bound)


class BERT4RecBlock(nn.Module):
    """One post-LayerNorm Transformer encoder layer (PyTorch ``nn.TransformerEncoderLayer``
    with GELU, ``dim_feedforward = 4d``)::

        x = LN1(x + Dropout(MHA(x, x, x; key padding mask)))
        x = LN2(x + Dropout(Dense(Dropout(GELU(Dense(x))))))
    """

    features: int
    num_heads: int
    dropout: float
    attention_dropout: float
    dropout_bits: int = 16

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, *, deterministic: bool) -> jax.Array:
        attn = nn.MultiHeadDotProductAttention(
            num_heads=self.num_heads,
            qkv_features=self.features,
            out_features=self.features,
            dropout_rate=self.attention_dropout,
            broadcast_dropout=False,
            kernel_init=_torch_in_projection,
            out_kernel_init=clamped_xavier_normal,
            qkv_dot_general=_dense_dot_general,
            out_dot_general=_dense_dot_general,
            attention_fn=attention_with_dropout(self.dropout_bits),
            name="attention",
        )(x, x, x, mask=mask, deterministic=deterministic)
        attn = Dropout(self.dropout, self.dropout_bits)(attn, deterministic=deterministic)
        x = LayerNorm(epsilon=1e-5, name="attention_norm")(x + attn)
        y = nn.Dense(4 * self.features, kernel_init=clamped_xavier_normal,
                     dot_general=_dense_dot_general, name="ffn_in")(x)
        y = nn.gelu(y, approximate=False)
        y = Dropout(self.dropout, self.dropout_bits)(y, deterministic=deterministic)
        y = nn.Dense(self.features, kernel_init=clamped_xavier_normal,
                     dot_general=_dense_dot_general, name="ffn_out")(y)
        y = Dropout(self.dropout, self.dropout_bits)(y, deterministic=deterministic)
        return LayerNorm(epsilon=1e-5, name="ffn_norm")(x + y)


class BERT4Rec(nn.Module):
    """BERT4Rec (Sun et al., 2019) as in the SEvo reference (MTandHJ/SEvo ``BERT4Rec/main.py``).

    Ids: ``0`` padding, ``1..num_items`` items, ``mask_id = num_items + 1`` the cloze mask
    token, so the item table and the output layer have ``num_items + 2`` rows (``table_rows``,
    more on a mesh: padding rows after the mask token). Input ``(B, T)``, ``T <= maxlen``::

        h_0 = Dropout(LN(E[seq] + P)),  h_l = BERT4RecBlock(h_{l-1}; keys that are not padding)
        logits = h_L W^T + b          (W: ``output_embedding`` (rows, d), b: ``output_bias``)

    Bidirectional: every position attends to every non-padding position. Positions are
    right-aligned as in :class:`SASRec`. Init as the reference: every Dense/Embed weight Xavier
    normal clipped to +-0.02 (:func:`clamped_xavier_normal`), attention in-projections PyTorch's
    Xavier uniform, biases 0. Training is cloze (:func:`cloze_loss`); a user is scored by
    appending ``mask_id`` to the sequence and reading the logits of that last position.
    Dropout masks take ``dropout_bits`` random bits per decision (:func:`dropout_keep`).

    SEvo (reference ``marked_params``): the item table and ``W`` are smoothed, each on its own,
    by the co-occurrence graph with two isolated nodes (padding and mask token); ``b`` is not.
    The output bias of ids past ``num_items + 1`` (a mesh's padding rows) is ``-1e9``, so they
    take no probability mass and no gradient.
    """

    num_items: int
    maxlen: int = 50
    features: int = 64
    num_blocks: int = 2
    num_heads: int = 4
    dropout: float = 0.2
    attention_dropout: float | None = None  # None: ``dropout`` (PyTorch uses one rate)
    table_rows: int | None = None  # None: num_items + 2
    dropout_bits: int = 16

    @property
    def mask_id(self) -> int:
        return self.num_items + 1

    def setup(self) -> None:
        rows = self.num_items + 2 if self.table_rows is None else self.table_rows
        if rows < self.num_items + 2:
            raise ValueError(f"table_rows {rows} < num_items + 2 = {self.num_items + 2}")
        self.item_embedding = nn.Embed(rows, self.features, embedding_init=clamped_xavier_normal)
        self.position_embedding = nn.Embed(self.maxlen, self.features,
                                           embedding_init=clamped_xavier_normal)
        self.embedding_norm = LayerNorm(epsilon=1e-5)
        self.embedding_dropout = Dropout(self.dropout, self.dropout_bits)
        attention = self.dropout if self.attention_dropout is None else self.attention_dropout
        self.blocks = [BERT4RecBlock(self.features, self.num_heads, self.dropout, attention,
                                     self.dropout_bits) for _ in range(self.num_blocks)]
        self.output_embedding = nn.Embed(rows, self.features, embedding_init=clamped_xavier_normal)
        self.output_bias = self.param("output_bias", nn.initializers.zeros, (self.num_items + 2,))

    def __call__(self, seqs: jax.Array, *, deterministic: bool, positions: jax.Array | None = None,
                 segments: jax.Array | None = None) -> jax.Array:
        """Returns the hidden state of every position, ``(B, T, d)``; packed rows as
        :meth:`SASRec.__call__` (an item attends to the items of its own segment)."""
        length = seqs.shape[-1]
        if length > self.maxlen:
            raise ValueError(f"sequence length {length} exceeds maxlen {self.maxlen}")
        positions = right_aligned_positions(self.maxlen, length, positions)
        x = self.item_embedding(seqs) + self.position_embedding(positions)
        x = self.embedding_dropout(self.embedding_norm(x), deterministic=deterministic)
        mask = (seqs != 0)[:, None, None, :]
        if segments is not None:
            mask = mask & same_segment(segments)
        for block in self.blocks:
            x = block(x, mask, deterministic=deterministic)
        if self.is_initializing():
            self.score_all(x[:, :1])  # create the output layer
        return x

    def _bias(self) -> jax.Array:
        extra = self.output_embedding.num_embeddings - self.output_bias.shape[0]
        return jnp.concatenate([self.output_bias, jnp.full((extra,), -1e9, self.output_bias.dtype)])

    def score(self, hidden: jax.Array, items: jax.Array) -> jax.Array:
        """Logits ``(..., K)`` of items ``(..., K)`` given ``hidden (..., d)``."""
        return _dot_scores(self.output_embedding, hidden, items) + self._bias()[items]

    def score_all(self, hidden: jax.Array) -> jax.Array:
        """Logits ``(..., table_rows)`` of ``hidden (..., d)`` over every id (padding and mask
        token included, as the reference's cross-entropy; rankers drop ids 0 and > num_items)."""
        return self.output_embedding.attend(hidden) + self._bias()

    def cloze_loss(self, hidden: jax.Array, labels: jax.Array) -> jax.Array:
        """``cloze_loss(score_all(hidden), labels)`` for ``hidden (K, d)``, through
        :func:`table_cross_entropy` (faster, the same value)."""
        return table_cross_entropy(hidden, self.output_embedding.embedding, self._bias(), labels)


def cloze_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Cross-entropy over the whole id range of the masked positions: ``mean over labels != 0
    of [logsumexp(logits) - logits[label]]`` (``logits (K, V)``, ``labels (K,)``, 0 = no
    position). Returns 0 when no position is masked."""
    per_position = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    mask = (labels != 0).astype(per_position.dtype)
    return (per_position * mask).sum() / jnp.maximum(mask.sum(), 1.0)


@jax.custom_vjp
def table_cross_entropy(hidden: jax.Array, table: jax.Array, bias: jax.Array,
                        labels: jax.Array) -> jax.Array:
    """``cloze_loss(hidden @ table.T + bias, labels)`` (``hidden (K, d)``, ``table (V, d)``,
    ``bias (V,)``), computed for speed on XLA:CPU (the same value and gradients to float32
    rounding, ``tests/test_models.py``): the bias rides in the matmul as a column of ``table``
    against a column of ones (no separate ``(K, V)`` add), and the backward pass forms
    ``d[table | bias] = ([hidden | 1]^T p)^T`` from the softmax ``p`` (XLA's own transpose
    of the logits' matmul contracts the ``(K, V)`` operand on its major axis, ~2x slower)."""
    return _table_cross_entropy_fwd(hidden, table, bias, labels)[0]


def _with_ones(hidden: jax.Array) -> jax.Array:
    return jnp.concatenate([hidden, jnp.ones((hidden.shape[0], 1), hidden.dtype)], axis=1)


def _table_cross_entropy_fwd(hidden, table, bias, labels):
    h1 = _with_ones(hidden)
    logits = h1 @ jnp.concatenate([table, bias[:, None].astype(table.dtype)], axis=1).T
    top = jnp.max(logits, axis=-1)
    lse = top + jnp.log(jnp.sum(jnp.exp(logits - top[:, None]), axis=-1))
    picked = jnp.sum(hidden * table[labels], axis=-1) + bias[labels]
    valid = (labels != 0).astype(logits.dtype)
    weight = valid / jnp.maximum(valid.sum(), 1.0)
    return jnp.sum(weight * (lse - picked)), (h1, table, labels, logits, lse, weight)


def _table_cross_entropy_bwd(residuals, g):
    h1, table, labels, logits, lse, weight = residuals
    gw = g * weight
    p = jnp.exp(logits - lse[:, None]) * gw[:, None]  # d loss / d logits, without the labels
    d = table.shape[1]
    d_hidden = p @ table - gw[:, None] * table[labels]
    d_table_bias = (h1.T @ p).at[:, labels].add(-gw[None, :] * h1.T)  # (d + 1, V)
    return d_hidden, d_table_bias[:d].T, d_table_bias[d], None


table_cross_entropy.defvjp(_table_cross_entropy_fwd, _table_cross_entropy_bwd)


# --------------------------------------------------------------------------------------------
# STOSA
# --------------------------------------------------------------------------------------------


def _stosa_init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    """``Normal(0.01, 0.02)``: the reference STOSA's init of every Linear and Embedding weight."""
    return 0.01 + 0.02 * jax.random.normal(key, shape, dtype)


def _stosa_dense(features: int, name: str) -> nn.Dense:
    return nn.Dense(features, kernel_init=_stosa_init, dot_general=_dense_dot_general, name=name)


def _root(cov: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.maximum(cov, 1e-24))


def wasserstein_distance(mean1: jax.Array, cov1: jax.Array, mean2: jax.Array, cov2: jax.Array
                         ) -> jax.Array:
    """Squared 2-Wasserstein distance of diagonal Gaussians, over the last axis (broadcast)::

        W(1, 2) = ||mu1 - mu2||^2 + ||sqrt(S1) - sqrt(S2)||^2
    """
    root = _root(cov1) - _root(cov2)
    return jnp.sum((mean1 - mean2) ** 2, -1) + jnp.sum(root * root, -1)


def wasserstein_distance_matrix(mean1: jax.Array, cov1: jax.Array, mean2: jax.Array,
                                cov2: jax.Array, scale: float = 1.0) -> jax.Array:
    """``scale`` times :func:`wasserstein_distance` of every row of ``(..., N, d)`` with every
    row of ``(..., M, d)``, ``(..., N, M)``, as one matmul (no ``N x M x d`` buffer)::

        x = sqrt(scale) [mu, sqrt(S)]:   scale W(1, 2) = ||x1||^2 + ||x2||^2 - 2 x1.x2

    The scale is applied to the ``(..., d)`` operands, not to the ``(..., N, M)`` result: XLA:CPU
    materialises a scalar broadcast of the result's size when it scales a matmul's output.
    """
    root = math.sqrt(scale)
    x1 = jnp.concatenate([mean1, _root(cov1)], -1) * root
    x2 = jnp.concatenate([mean2, _root(cov2)], -1) * root
    return (jnp.sum(x1 * x1, -1)[..., :, None] + jnp.sum(x2 * x2, -1)[..., None, :]
            - 2 * x1 @ jnp.swapaxes(x2, -1, -2))


class _DistFeedForward(nn.Module):
    """``LN(x + Dropout(Dense_d(ELU(Dense_4d(x)))))``, the reference's ``DistIntermediate``."""

    features: int
    dropout: float
    dropout_bits: int = 16

    @nn.compact
    def __call__(self, x: jax.Array, *, deterministic: bool) -> jax.Array:
        y = nn.elu(_stosa_dense(4 * self.features, "dense_in")(x))
        y = _stosa_dense(self.features, "dense_out")(y)
        y = Dropout(self.dropout, self.dropout_bits)(y, deterministic=deterministic)
        return LayerNorm(epsilon=1e-12, name="norm")(x + y)


class STOSALayer(nn.Module):
    """One STOSA layer (the reference's ``DistLayer``): Wasserstein self-attention over the
    means ``M`` and covariances ``S`` (positive), then a feed-forward block for each::

        q, k, v = Dense(M) (per head);   Sq, Sk, Sv = ELU(Dense(S)) + 1
        A = softmax(-W(q, Sq; k, Sk) / sqrt(d_head) + mask_bias);  A = Dropout_attn(A)
        M' = LN(M + Dropout(Dense(A v))),   S' = LN(S + Dropout(Dense(A^2 Sv)))  (one LN)
        M'' = FFN_M(M'),   S'' = ELU(FFN_S(S')) + 1
    """

    features: int
    num_heads: int
    dropout: float
    attention_dropout: float
    dropout_bits: int = 16

    @nn.compact
    def __call__(self, mean: jax.Array, cov: jax.Array, mask_bias: jax.Array, *,
                 deterministic: bool) -> tuple[jax.Array, jax.Array]:
        if self.features % self.num_heads:
            raise ValueError(f"features {self.features} is not a multiple of num_heads "
                             f"{self.num_heads}")
        head = self.features // self.num_heads

        def project(name, x, positive=False):
            y = _stosa_dense(self.features, name)(x)
            y = nn.elu(y) + 1 if positive else y
            return jnp.swapaxes(y.reshape(y.shape[:-1] + (self.num_heads, head)), -2, -3)

        def merge(x):
            x = jnp.swapaxes(x, -2, -3)
            return x.reshape(x.shape[:-2] + (self.features,))

        q, k, v = (project(f"mean_{n}", mean) for n in ("query", "key", "value"))
        sq, sk, sv = (project(f"cov_{n}", cov, True) for n in ("query", "key", "value"))
        logits = -wasserstein_distance_matrix(q, sq, k, sk, 1 / math.sqrt(head)) + mask_bias
        probs = Dropout(self.attention_dropout, self.dropout_bits)(
            jax.nn.softmax(logits, -1), deterministic=deterministic)
        norm = LayerNorm(epsilon=1e-12, name="attention_norm")

        def out(name, context, x):
            y = _stosa_dense(self.features, name)(merge(context))
            y = Dropout(self.dropout, self.dropout_bits)(y, deterministic=deterministic)
            return norm(x + y)

        mean = out("mean_out", probs @ v, mean)
        cov = out("cov_out", (probs * probs) @ sv, cov)
        mean = _DistFeedForward(self.features, self.dropout, self.dropout_bits, name="mean_ffn")(
            mean, deterministic=deterministic)
        cov = _DistFeedForward(self.features, self.dropout, self.dropout_bits, name="cov_ffn")(
            cov, deterministic=deterministic)
        return mean, nn.elu(cov) + 1


class STOSA(nn.Module):
    """STOSA (Fan et al., 2022) as in the SEvo reference (MTandHJ/SEvo ``STOSA/main.py``,
    ``STOSA/modules.py``): every item is a diagonal Gaussian, mean ``E_M[i]`` and covariance
    ``ELU(E_S[i]) + 1``; a sequence ``(B, T)`` (0 = padding, ``T <= maxlen``) becomes::

        M = ELU(Dropout(LN(E_M[seq] + P_M))),   S = ELU(Dropout(LN(E_S[seq] + P_S))) + 1
        S <- STOSALayer(M, S)  for each of num_blocks layers (causal, padding keys masked)

    and the score of item ``i`` at a position is ``-W((M, S), (E_M[i], ELU(E_S[i]) + 1))``
    (:func:`wasserstein_distance`). The LN is shared by means and covariances, as there.

    ``update_means=False`` (the default) keeps the reference's behaviour: its encoder loop
    assigns each layer's new means to a misspelt variable, so every layer receives the
    embedding means ``M`` and the output means are ``M`` itself; only the covariances go through
    the layers. ``update_means=True`` passes the means through the layers too (not what the
    published numbers were trained with). Dropout masks take ``dropout_bits`` random bits per
    decision (:func:`dropout_keep`).

    ``__call__`` returns ``concat([means, covariances], -1)``, ``(B, T, 2d)``, so that the
    trainer can slice the last position like SASRec's hidden states.

    SEvo (reference ``marked_params``): both item tables ``mean_embedding`` and
    ``covariance_embedding`` are smoothed, each on its own, by the co-occurrence graph; the
    positional tables and the layers are not. Init as the reference: every Dense/Embed weight
    ``Normal(0.01, 0.02)``, biases 0.
    """

    num_items: int
    maxlen: int = 100
    features: int = 64
    num_blocks: int = 1
    num_heads: int = 4
    dropout: float = 0.2
    attention_dropout: float = 0.5
    update_means: bool = False
    dropout_bits: int = 16

    def setup(self) -> None:
        rows = self.num_items + 1
        self.mean_embedding = nn.Embed(rows, self.features, embedding_init=_stosa_init)
        self.covariance_embedding = nn.Embed(rows, self.features, embedding_init=_stosa_init)
        self.mean_position = nn.Embed(self.maxlen, self.features, embedding_init=_stosa_init)
        self.covariance_position = nn.Embed(self.maxlen, self.features, embedding_init=_stosa_init)
        self.embedding_norm = LayerNorm(epsilon=1e-12)
        self.embedding_dropout = Dropout(self.dropout, self.dropout_bits)
        self.layers = [STOSALayer(self.features, self.num_heads, self.dropout,
                                  self.attention_dropout, self.dropout_bits)
                       for _ in range(self.num_blocks)]

    def __call__(self, seqs: jax.Array, *, deterministic: bool, positions: jax.Array | None = None,
                 segments: jax.Array | None = None) -> jax.Array:
        """``concat([means, covariances], -1)`` of every position, ``(B, T, 2d)``; packed rows
        as :meth:`SASRec.__call__`."""
        length = seqs.shape[-1]
        if length > self.maxlen:
            raise ValueError(f"sequence length {length} exceeds maxlen {self.maxlen}")
        positions = right_aligned_positions(self.maxlen, length, positions)

        def embed(table, position_table):
            x = self.embedding_norm(table(seqs) + position_table(positions))
            return nn.elu(self.embedding_dropout(x, deterministic=deterministic))

        mean = embed(self.mean_embedding, self.mean_position)
        cov = embed(self.covariance_embedding, self.covariance_position) + 1
        valid = seqs != 0
        mask = jnp.tril(jnp.ones((length, length), bool))[None, None] & valid[:, None, None, :]
        if segments is not None:
            mask = mask & same_segment(segments)
        mask_bias = jnp.where(mask, 0.0, -(2.0 ** 32) + 1)
        for layer in self.layers:
            new_mean, cov = layer(mean, cov, mask_bias, deterministic=deterministic)
            if self.update_means:
                mean = new_mean
        return jnp.concatenate([mean, cov], axis=-1)

    def item_gaussians(self, items: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(E_M[items], ELU(E_S[items]) + 1)``."""
        return self.mean_embedding(items), nn.elu(self.covariance_embedding(items)) + 1

    def score(self, hidden: jax.Array, items: jax.Array) -> jax.Array:
        """``-W`` of ``hidden (..., 2d)`` with items ``(..., K)``, ``(..., K)``."""
        mean, cov = jnp.split(hidden[..., None, :], 2, axis=-1)
        return -wasserstein_distance(mean, cov, *self.item_gaussians(items))

    def item_scores(self, items: jax.Array, others: jax.Array) -> jax.Array:
        """``-W`` between the items and the others (same shape): the reference's pvn logits."""
        return -wasserstein_distance(*self.item_gaussians(items), *self.item_gaussians(others))

    def score_all(self, hidden: jax.Array) -> jax.Array:
        """``-W`` of ``hidden (B, 2d)`` with every item id, ``(B, num_items + 1)``."""
        mean, cov = jnp.split(hidden, 2, axis=-1)
        table = self.mean_embedding.embedding
        items_cov = nn.elu(self.covariance_embedding.embedding) + 1
        return -wasserstein_distance_matrix(mean, cov, table, items_cov)


def stosa_loss(pos_logits: jax.Array, neg_logits: jax.Array, pvn_logits: jax.Array,
               mask: jax.Array, pvn_weight: float) -> jax.Array:
    """The reference STOSA objective over the positions of ``mask``::

        mean[-log sigmoid(pos - neg)] + pvn_weight * mean[max(pvn - pos, 0)]

    with ``pos = -W(h, target)``, ``neg = -W(h, negative)`` and ``pvn = -W(target,
    negative)``: the positive must be closer to the sequence than to the negative.
    """
    mask = mask.astype(pos_logits.dtype)
    count = jnp.maximum(mask.sum(), 1.0)
    bpr = (-jax.nn.log_sigmoid(pos_logits - neg_logits) * mask).sum() / count
    pvn = (jnp.maximum(pvn_logits - pos_logits, 0.0) * mask).sum() / count
    return bpr + pvn_weight * pvn


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
