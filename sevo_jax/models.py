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

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = [
    "SEVO_TABLES",
    "BiasFreeGRUCell",
    "GRU4Rec",
    "MFBPR",
    "SASRec",
    "SASRecBlock",
    "bpr_loss",
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
        q = nn.LayerNorm(epsilon=1e-8, name="attention_norm")(x)
        attn = nn.MultiHeadDotProductAttention(
            num_heads=self.num_heads,
            qkv_features=self.features,
            out_features=self.features,
            dropout_rate=self.dropout,
            broadcast_dropout=False,  # independent masks per example and head, as in PyTorch
            name="attention",
        )(q, x, x, mask=mask, deterministic=deterministic)
        x = nn.LayerNorm(epsilon=1e-8, name="ffn_norm")(x + attn)
        y = nn.Dense(self.features, name="ffn_in")(x)
        y = nn.Dropout(self.dropout)(y, deterministic=deterministic)
        y = nn.Dense(self.features, name="ffn_out")(nn.relu(y))
        y = nn.Dropout(self.dropout)(y, deterministic=deterministic)
        return x + y


class SASRec(nn.Module):
    """Self-attentive sequential recommendation (Kang & McAuley, 2018), pre-LN variant.

    Input: left-padded item sequences ``(B, T)`` int, ``T <= maxlen``, most recent item last.
    ``h_0 = Dropout(sqrt(d) * E[seq] + P)`` with learned positions ``P``, then ``num_blocks``
    causal blocks (:class:`SASRecBlock`) and a final LayerNorm. Hidden states of padding
    positions are zeroed after the embedding and after every block, and padding keys are
    masked out of attention. Positions are right-aligned (the last input column always uses position
    ``maxlen - 1``), so inputs shorter than ``maxlen`` behave as if left-padded to ``maxlen``.
    """

    num_items: int
    maxlen: int = 50
    features: int = 64
    num_blocks: int = 2
    num_heads: int = 1
    dropout: float = 0.3

    def setup(self) -> None:
        self.item_embedding = nn.Embed(
            self.num_items + 1, self.features, embedding_init=_xavier_normal
        )
        self.position_embedding = nn.Embed(
            self.maxlen, self.features, embedding_init=_xavier_normal
        )
        self.embedding_dropout = nn.Dropout(self.dropout)
        self.blocks = [
            SASRecBlock(self.features, self.num_heads, self.dropout)
            for _ in range(self.num_blocks)
        ]
        self.final_norm = nn.LayerNorm(epsilon=1e-8)

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
        mask = nn.make_causal_mask(seqs, dtype=bool) & valid[:, None, None, :]
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


class BiasFreeGRUCell(nn.RNNCellBase):
    """A GRU cell without biases (PyTorch ``nn.GRU(bias=False)``)::

        r = sigmoid(W_ir x + W_hr h),  z = sigmoid(W_iz x + W_hz h)
        n = tanh(W_in x + r * (W_hn h)),  h' = (1 - z) * n + z * h

    ``nn.GRUCell`` in Flax always carries input biases, hence this cell. The three gates share
    one ``(d_in, 3d)`` input kernel and one ``(d, 3d)`` recurrent kernel, both Xavier uniform
    like the reference implementation.
    """

    features: int
    kernel_init: nn.initializers.Initializer = nn.initializers.xavier_uniform()

    @nn.compact
    def __call__(self, carry: jax.Array, inputs: jax.Array) -> tuple[jax.Array, jax.Array]:
        dense = lambda name: nn.Dense(  # noqa: E731
            3 * self.features, use_bias=False, kernel_init=self.kernel_init, name=name
        )
        x_r, x_z, x_n = jnp.split(dense("input")(inputs), 3, axis=-1)
        h_r, h_z, h_n = jnp.split(dense("recurrent")(carry), 3, axis=-1)
        r = nn.sigmoid(x_r + h_r)
        z = nn.sigmoid(x_z + h_z)
        n = jnp.tanh(x_n + r * h_n)
        new_h = (1.0 - z) * n + z * carry
        return new_h, new_h

    @nn.nowrap
    def initialize_carry(self, rng: jax.Array, input_shape: tuple[int, ...]) -> jax.Array:
        return jnp.zeros((*input_shape[:-1], self.features))

    @property
    def num_feature_axes(self) -> int:
        return 1


class _MaskedGRUStep(nn.Module):
    """One GRU step that leaves the state unchanged at padding positions."""

    features: int

    @nn.compact
    def __call__(
        self, h: jax.Array, inputs: tuple[jax.Array, jax.Array]
    ) -> tuple[jax.Array, jax.Array]:
        x, valid = inputs
        new_h, _ = BiasFreeGRUCell(self.features, name="cell")(h, x)
        h = jnp.where(valid[:, None], new_h, h)
        return h, h


class GRU4Rec(nn.Module):
    """GRU4Rec (Hidasi et al., 2016) as in the SEvo reference implementation.

    ``Embed (Xavier normal) -> Dropout -> one bias-free GRU layer -> Dense``; the user vector is
    the Dense output at the last non-padding position. Padding steps leave the GRU state
    unchanged, so left- and right-padded inputs give the same user vector (and an all-padding
    row gives ``Dense(0)``).
    """

    num_items: int
    features: int = 64
    dropout: float = 0.4

    def setup(self) -> None:
        self.item_embedding = nn.Embed(
            self.num_items + 1, self.features, embedding_init=_xavier_normal
        )
        self.embedding_dropout = nn.Dropout(self.dropout)
        self.gru = nn.scan(
            _MaskedGRUStep,
            variable_broadcast="params",
            split_rngs={"params": False},
            in_axes=1,
            out_axes=1,
        )(self.features)
        self.dense = nn.Dense(self.features)

    def __call__(self, seqs: jax.Array, *, deterministic: bool) -> jax.Array:
        """Returns the user vectors ``(B, d)`` of item sequences ``(B, T)``."""
        x = self.item_embedding(seqs)
        x = self.embedding_dropout(x, deterministic=deterministic)
        h0 = jnp.zeros((seqs.shape[0], self.features), x.dtype)
        # With masked steps the final carry is the state at the last non-padding position.
        last, _ = self.gru(h0, (x, seqs != 0))
        return self.dense(last)

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


def _key_name(entry: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def sevo_mask(params: Any, tables: tuple[str, ...] = SEVO_TABLES) -> Any:
    """Pytree of bools over ``params``: True exactly for the embedding tables SEvo smooths.

    A leaf is selected when it is named ``embedding`` and a module on its path is one of
    ``tables`` (by default the item tables of SASRec/GRU4Rec and both MF-BPR tables; positional
    embeddings are not selected). Works on ``params`` or on the full ``{"params": ...}`` dict,
    and plugs into ``optax.masked``.
    """

    def is_table(path, _leaf) -> bool:
        names = [_key_name(entry) for entry in path]
        return bool(names) and names[-1] == "embedding" and any(n in tables for n in names[:-1])

    return jax.tree_util.tree_map_with_path(is_table, params)
