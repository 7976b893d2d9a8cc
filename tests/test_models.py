"""Shape, masking, parameter-layout and loss checks for the recommendation models."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sevo_jax.models import (
    MFBPR,
    STOSA,
    BERT4Rec,
    Dropout,
    GRU4Rec,
    SASRec,
    attention_with_dropout,
    bias_free_gru_step,
    bpr_loss,
    cloze_loss,
    dropout_keep,
    masked_gru,
    same_segment,
    sasrec_loss,
    sevo_mask,
    split_key_grid,
    stosa_loss,
    table_cross_entropy,
    threefry_bits,
    wasserstein_distance,
    wasserstein_distance_matrix,
)

NUM_ITEMS, D = 30, 16


def left_pad(items, length):
    return jnp.array([[0] * (length - len(row)) + list(row) for row in items], jnp.int32)


def right_pad(items, length):
    return jnp.array([list(row) + [0] * (length - len(row)) for row in items], jnp.int32)


def paths(tree):
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return ["/".join(str(getattr(k, "key", k)) for k in path) for path, _ in flat]


def build(model, example):
    """(model, params, forward): jitted init and deterministic forward keep the tests fast."""
    params = jax.jit(functools.partial(model.init, deterministic=True))(jax.random.key(0), example)
    apply = jax.jit(functools.partial(model.apply, deterministic=True))
    return model, params["params"], lambda p, seqs: apply({"params": p}, seqs)


@pytest.fixture(scope="module")
def sasrec():
    model = SASRec(NUM_ITEMS, maxlen=20, features=D, num_blocks=2, num_heads=2, dropout=0.3)
    return build(model, jnp.ones((2, 20), jnp.int32))


@pytest.fixture(scope="module")
def gru4rec():
    return build(GRU4Rec(NUM_ITEMS, features=D, dropout=0.4), jnp.ones((2, 6), jnp.int32))


# ------------------------------------------------------------------------------------ SASRec


def test_sasrec_shapes_and_param_paths(sasrec):
    model, params, forward = sasrec
    assert params["item_embedding"]["embedding"].shape == (NUM_ITEMS + 1, D)
    assert params["position_embedding"]["embedding"].shape == (20, D)
    assert sum("item_embedding" in p for p in paths(params)) == 1

    seqs = left_pad([[1, 2, 3], [4, 5, 6, 7, 8]], 20)
    hidden = forward(params, seqs)
    assert hidden.shape == (2, 20, D)
    scores = model.apply({"params": params}, hidden[:, -1], method=SASRec.score_all)
    assert scores.shape == (2, NUM_ITEMS + 1)
    items = jnp.array([[3, 9, 1], [2, 2, 30]])
    picked = model.apply({"params": params}, hidden[:, -1], items, method=SASRec.score)
    np.testing.assert_allclose(picked, jnp.take_along_axis(scores, items, 1), rtol=1e-5)
    per_position = model.apply(
        {"params": params}, hidden, seqs[..., None], method=SASRec.score
    )
    assert per_position.shape == (2, 20, 1)


def test_sasrec_is_causal(sasrec):
    model, params, forward = sasrec
    a = left_pad([[1, 2, 3, 4, 5, 6]], 20)
    b = a.at[0, -1].set(17).at[0, -2].set(23)
    ha = forward(params, a)
    hb = forward(params, b)
    np.testing.assert_allclose(ha[:, :-2], hb[:, :-2], atol=1e-6)
    assert not np.allclose(ha[:, -1], hb[:, -1])


def test_sasrec_padding_invariance(sasrec):
    model, params, forward = sasrec
    items = [[3, 1, 4, 1, 5], [9, 2, 6]]
    short = forward(params, left_pad(items, 10))
    full = forward(params, left_pad(items, 20))
    np.testing.assert_allclose(short[:, -1], full[:, -1], atol=1e-5)
    np.testing.assert_allclose(short[:, -5:], full[:, -5:], atol=1e-5)


@pytest.mark.parametrize("name", ["sasrec", "bert4rec", "stosa"])
def test_packed_rows_give_each_item_its_unpacked_state(name):
    """Two sequences packed into one row (``positions``: their columns before packing,
    ``segments``: which sequence) get the states they have alone, left-padded to the row."""
    model = {"sasrec": SASRec(NUM_ITEMS, maxlen=12, features=D, num_heads=2),
             "bert4rec": BERT4Rec(NUM_ITEMS, maxlen=12, features=D, num_heads=2),
             "stosa": STOSA(NUM_ITEMS, maxlen=12, features=D, num_heads=2)}[name]
    example = jnp.ones((2, 8), jnp.int32)
    params = model.init(jax.random.key(0), example, deterministic=True)
    alone = model.apply(params, left_pad([[3, 1, 4], [9, 2, 6, 5]], 8), deterministic=True)
    packed = jnp.array([[0, 3, 1, 4, 9, 2, 6, 5]], jnp.int32)
    positions = jnp.array([[0, 5, 6, 7, 4, 5, 6, 7]], jnp.int32)
    segments = jnp.array([[0, 1, 1, 1, 2, 2, 2, 2]], jnp.int32)
    got = model.apply(params, packed, deterministic=True, positions=positions, segments=segments)
    np.testing.assert_allclose(got[0, 1:4], alone[0, 5:], atol=2e-6)
    np.testing.assert_allclose(got[0, 4:], alone[1, 4:], atol=2e-6)
    unmasked = model.apply(params, packed, deterministic=True, positions=positions)
    assert not np.allclose(unmasked[0, 4:], alone[1, 4:], atol=1e-3)  # the segments matter


def test_same_segment_mask():
    mask = same_segment(jnp.array([[0, 1, 1, 2], [3, 3, 3, 3]]))
    assert mask.shape == (2, 1, 4, 4)
    assert mask[0, 0].astype(int).tolist() == [[1, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 0],
                                                [0, 0, 0, 1]]
    assert bool(mask[1].all())


def test_sasrec_reference_mask_lets_items_attend_to_padding(sasrec):
    """mask_padding_keys=False (the reference's causal-only mask) equals the default on rows
    without padding; on padded rows the padding keys contribute, so the output depends on how
    much left padding there is (which the default avoids)."""
    model, params, _ = sasrec
    reference = model.clone(mask_padding_keys=False)
    run = lambda m, x: m.apply({"params": params}, x, deterministic=True)  # noqa: E731
    full = jnp.asarray(np.arange(1, 21)[None, :] % 30 + 1)
    np.testing.assert_array_equal(run(reference, full), run(model, full))
    items = [[3, 1, 4, 1, 5]]
    short, padded = run(reference, left_pad(items, 10)), run(reference, left_pad(items, 20))
    assert np.abs(short[:, -1] - padded[:, -1]).max() > 1e-2
    assert np.abs(padded[:, -1] - run(model, left_pad(items, 20))[:, -1]).max() > 1e-2


def test_sasrec_rejects_sequences_longer_than_maxlen(sasrec):
    _, params, forward = sasrec
    with pytest.raises(ValueError, match="maxlen"):
        forward(params, jnp.ones((1, 21), jnp.int32))


def test_sasrec_all_padding_row_is_finite(sasrec):
    _, params, forward = sasrec
    seqs = jnp.concatenate([jnp.zeros((1, 20), jnp.int32), left_pad([[1, 2]], 20)])
    assert np.isfinite(forward(params, seqs)).all()


def test_sasrec_dropout_only_in_training(sasrec):
    model, params, forward = sasrec
    seqs = left_pad([[1, 2, 3, 4], [5, 6]], 20)
    train = jax.jit(
        lambda key: model.apply(
            {"params": params}, seqs, deterministic=False, rngs={"dropout": key}
        )
    )
    assert not np.allclose(train(jax.random.key(0)), forward(params, seqs))
    assert not np.allclose(train(jax.random.key(0)), train(jax.random.key(1)))


def test_dropout_keep_32_bits_is_bernoulli_and_16_bits_splits_each_word():
    key = jax.random.key(3)
    shape = (7, 9)  # odd size: the last word's second half is unused
    np.testing.assert_array_equal(dropout_keep(key, 0.7, shape, 32),
                                  jax.random.bernoulli(key, 0.7, shape))
    words = np.asarray(jax.random.bits(key, (32,), jnp.uint32))
    halves = np.concatenate([words >> 16, words & 0xFFFF])[:63]
    expected = (halves < round(0.7 * 65536)).reshape(shape)
    np.testing.assert_array_equal(dropout_keep(key, 0.7, shape, 16), expected)
    big = dropout_keep(jax.random.key(4), 0.8, (200_000,), 16)
    assert abs(float(big.mean()) - 0.8) < 4 * math.sqrt(0.8 * 0.2 / 200_000)
    with pytest.raises(ValueError, match="must be 16 or 32, got 8"):
        dropout_keep(key, 0.7, shape, 8)


@pytest.mark.parametrize("size", [1, 2, 7, 1000, 100_003])
def test_threefry_bits_are_jax_random_bits(size):
    keys = [jax.random.PRNGKey(0), jax.random.PRNGKey(2**31 + 5), jax.random.key(7),
            jax.random.fold_in(jax.random.key(1), 3)]
    for key in keys:
        np.testing.assert_array_equal(threefry_bits(key, size),
                                      jax.random.bits(key, (size,), jnp.uint32))
        np.testing.assert_array_equal(jax.jit(threefry_bits, static_argnums=1)(key, size),
                                      jax.random.bits(key, (size,), jnp.uint32))
    batched = jax.random.split(jax.random.key(9), 3)  # as the GRU's per-step keys
    np.testing.assert_array_equal(jax.vmap(lambda k: threefry_bits(k, size))(batched),
                                  jax.vmap(lambda k: jax.random.bits(k, (size,), jnp.uint32))(
                                      batched))


def test_threefry_bits_of_another_key_implementation_or_layout_are_jaxs():
    key = jax.random.key(4, impl="rbg")
    np.testing.assert_array_equal(threefry_bits(key, 33), jax.random.bits(key, (33,), jnp.uint32))
    np.testing.assert_array_equal(dropout_keep(key, 0.6, (3, 11), 32),
                                  jax.random.bernoulli(key, 0.6, (3, 11)))
    key = jax.random.PRNGKey(4)
    with jax.threefry_partitionable(False):  # JAX's other threefry counter layout
        np.testing.assert_array_equal(threefry_bits(key, 33),
                                      jax.random.bits(key, (33,), jnp.uint32))


@pytest.mark.parametrize("keep", [0.5, 0.6, 0.8, 0.9])
def test_dropout_keep_32_bits_is_bernoulli_for_every_rate(keep):
    for key in (jax.random.PRNGKey(1), jax.random.key(2)):
        np.testing.assert_array_equal(dropout_keep(key, keep, (4, 5, 50), 32),
                                      jax.random.bernoulli(key, keep, (4, 5, 50)))


@pytest.mark.parametrize("bits", [16, 32])
def test_dropout_module_matches_flax_dropout_with_its_masks(bits):
    x = jnp.arange(1.0, 41.0).reshape(5, 8)
    rngs = {"dropout": jax.random.key(5)}
    ours = Dropout(0.3, bits).apply({}, x, False, rngs=rngs)
    if bits == 32:  # flax's own masks from the same rng stream
        np.testing.assert_allclose(ours, nn.Dropout(0.3).apply({}, x, False, rngs=rngs))
    kept = np.asarray(ours) != 0
    assert 0 < kept.sum() < kept.size
    np.testing.assert_allclose(ours, np.where(kept, x / 0.7, 0.0), rtol=1e-6)
    grad = jax.grad(lambda v: Dropout(0.3, bits).apply({}, v, False, rngs=rngs).sum())(x)
    np.testing.assert_allclose(grad, np.where(kept, 1 / 0.7, 0.0), rtol=1e-6)


class _DropoutKey(nn.Module):
    """The key that a top-level module's first ``make_rng("dropout")`` gives."""

    @nn.compact
    def __call__(self) -> jax.Array:
        return self.make_rng("dropout")


@pytest.mark.parametrize("shape", [(1,), (7, 9), (4, 2, 5, 5), (3, 50, 16)])
def test_16_bit_dropout_scales_by_the_dropout_keep_mask_bit_for_bit(shape):
    """16-bit Dropout is ``x * keep / (1 - rate)`` with ``dropout_keep``'s mask of the key
    that ``make_rng`` gives, and its gradient the same factors, bit for bit, odd sizes
    included."""
    x = jax.random.normal(jax.random.key(0), shape)
    rngs = {"dropout": jax.random.key(6)}
    key = _DropoutKey().apply({}, rngs=rngs)
    factor = jnp.where(dropout_keep(key, 0.8, shape, 16), jnp.float32(1 / 0.8), jnp.float32(0))
    dropped = jax.jit(lambda v: Dropout(0.2, 16).apply({}, v, False, rngs=rngs))
    np.testing.assert_array_equal(dropped(x), x * factor)
    grad = jax.jit(jax.grad(lambda v: (Dropout(0.2, 16).apply({}, v, False, rngs=rngs) * v).sum()))
    np.testing.assert_array_equal(grad(x), 2 * x * factor)


def test_attention_with_dropout_32_bits_is_flax_attention():
    x = jax.random.normal(jax.random.key(0), (3, 6, 8))
    mask = nn.make_causal_mask(jnp.ones((3, 6)))
    make = functools.partial(nn.MultiHeadDotProductAttention, num_heads=2, dropout_rate=0.4,
                             broadcast_dropout=False)
    params = make().init(jax.random.key(1), x, x, x, mask=mask, deterministic=True)
    rngs = {"dropout": jax.random.key(2)}
    flax_out = make().apply(params, x, x, x, mask=mask, deterministic=False, rngs=rngs)
    ours = make(attention_fn=attention_with_dropout(32)).apply(
        params, x, x, x, mask=mask, deterministic=False, rngs=rngs)
    np.testing.assert_allclose(ours, flax_out, rtol=1e-6, atol=1e-6)
    fast = make(attention_fn=attention_with_dropout(16)).apply(
        params, x, x, x, mask=mask, deterministic=False, rngs=rngs)
    assert not np.allclose(fast, flax_out)
    with pytest.raises(ValueError, match="broadcast_dropout=False"):
        make(attention_fn=attention_with_dropout(16), broadcast_dropout=True).apply(
            params, x, x, x, mask=mask, deterministic=False, rngs=rngs)


# ----------------------------------------------------------------------------------- GRU4Rec


def test_gru4rec_shapes_and_param_paths(gru4rec):
    model, params, forward = gru4rec
    assert params["item_embedding"]["embedding"].shape == (NUM_ITEMS + 1, D)
    assert sum("item_embedding" in p for p in paths(params)) == 1
    user = forward(params, left_pad([[1, 2], [3, 4, 5]], 6))
    assert user.shape == (2, D)
    scores = model.apply({"params": params}, user, method=GRU4Rec.score_all)
    assert scores.shape == (2, NUM_ITEMS + 1)
    picked = model.apply({"params": params}, user, jnp.array([[1], [7]]), method=GRU4Rec.score)
    np.testing.assert_allclose(picked[:, 0], scores[jnp.arange(2), jnp.array([1, 7])], rtol=1e-5)


def test_gru4rec_gru_has_no_bias(gru4rec):
    _, params, _ = gru4rec
    gru_paths = paths(params["gru"])
    assert gru_paths and not any("bias" in p for p in gru_paths)


def test_gru4rec_left_and_right_padding_agree(gru4rec):
    model, params, forward = gru4rec
    items = [[5, 3, 8], [1], [2, 9, 4, 4, 7, 6]]
    left = forward(params, left_pad(items, 6))
    right = forward(params, right_pad(items, 6))
    longer = forward(params, left_pad(items, 9))
    np.testing.assert_allclose(left, right, atol=1e-6)
    np.testing.assert_allclose(left, longer, atol=1e-6)


def test_gru4rec_matches_reference_gru(gru4rec):
    """The bias-free GRU equations of torch.nn.GRU(bias=False), then the dense layer."""
    model, params, forward = gru4rec
    seq = [4, 2, 7]
    emb = np.asarray(params["item_embedding"]["embedding"])
    w_i = np.asarray(params["gru"]["input_kernel"])
    w_h = np.asarray(params["gru"]["recurrent_kernel"])
    sigmoid = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    h = np.zeros(D)
    for item in seq:
        xr, xz, xn = np.split(emb[item] @ w_i, 3)
        hr, hz, hn = np.split(h @ w_h, 3)
        r, z = sigmoid(xr + hr), sigmoid(xz + hz)
        h = (1 - z) * np.tanh(xn + r * hn) + z * h
    expected = h @ np.asarray(params["dense"]["kernel"]) + np.asarray(params["dense"]["bias"])
    got = forward(params, left_pad([seq, seq], 6))
    np.testing.assert_allclose(got[0], expected, atol=1e-5)


def _gru_problem(batch=11, steps=7, d_in=5, d=4):
    """Kernels, time-major inputs and a validity mask mixing left/right/gapped padding."""
    k = jax.random.split(jax.random.key(1), 3)
    w_i = jax.random.normal(k[0], (d_in, 3 * d)) * 0.5
    w_h = jax.random.normal(k[1], (d, 3 * d)) * 0.5
    x = jax.random.normal(k[2], (steps, batch, d_in))
    valid = np.random.default_rng(0).random((steps, batch)) < 0.5
    valid[:, 0] = False           # an all-padding row
    valid[:, 1] = True            # a full row
    valid[-2:, 2:5] = False       # right padding
    return w_i, w_h, x, jnp.asarray(valid)


def _reference_gru(w_i, w_h, x, valid):
    def step(h, inputs):
        x_t, valid_t = inputs
        return jnp.where(valid_t[:, None], bias_free_gru_step(w_i, w_h, h, x_t), h), None
    return jax.lax.scan(step, jnp.zeros((x.shape[1], w_h.shape[0])), (x, valid))[0]


@pytest.mark.parametrize("row_groups", [1, 3, 4, 11])
def test_masked_gru_value_and_gradients_match_a_plain_scan(row_groups):
    """The skipping row groups and the hand-written backward pass change nothing."""
    w_i, w_h, x, valid = _gru_problem()
    probe = jax.random.normal(jax.random.key(2), (x.shape[1], w_h.shape[0]))

    def loss(f):
        return lambda *a: (f(*a) * probe).sum()

    got = masked_gru(w_i, w_h, x, valid, row_groups)
    np.testing.assert_allclose(got, _reference_gru(w_i, w_h, x, valid), atol=1e-6)
    grouped = loss(lambda *a: masked_gru(*a, row_groups))
    grads = jax.grad(grouped, argnums=(0, 1, 2))(w_i, w_h, x, valid)
    expected = jax.grad(loss(_reference_gru), argnums=(0, 1, 2))(w_i, w_h, x, valid)
    for g, e in zip(grads, expected, strict=True):
        np.testing.assert_allclose(g, e, atol=1e-5)


def test_masked_gru_backward_with_dropout_matches_autodiff():
    """With dropout the custom backward (masks redrawn from their keys) equals JAX's autodiff
    of a plain scan over inputs dropped with the same masks: one key per (step, row group)."""
    w_i, w_h, x, valid = _gru_problem(batch=12)
    key, groups, rate = jax.random.key(3), 3, 0.4
    steps, batch, d_in = x.shape
    keys = jax.vmap(lambda k: jax.random.split(k, groups))(jax.random.split(key, steps))
    masks = jnp.stack([
        jnp.concatenate([dropout_keep(keys[t, g], 1.0 - rate, (batch // groups, d_in))
                         for g in range(groups)])
        for t in range(steps)])

    def ours(w_i, w_h, x):
        return masked_gru(w_i, w_h, x, valid, groups, rate, key).sum()

    def autodiff(w_i, w_h, x):
        return _reference_gru(w_i, w_h, x * masks / (1.0 - rate), valid).sum()

    np.testing.assert_allclose(ours(w_i, w_h, x), autodiff(w_i, w_h, x), rtol=1e-6)
    ours_grads = jax.grad(ours, (0, 1, 2))(w_i, w_h, x)
    for g, e in zip(ours_grads, jax.grad(autodiff, (0, 1, 2))(w_i, w_h, x), strict=True):
        np.testing.assert_allclose(g, e, atol=1e-5)


def test_masked_gru_dropout_drops_the_rate_of_valid_inputs_only():
    w_i, w_h, x, valid = _gru_problem(batch=64, steps=20, d_in=32)
    dx = jax.grad(lambda x: masked_gru(w_i, w_h, x, valid, 4, 0.4, jax.random.key(4)).sum())(x)
    dropped = np.asarray(dx == 0).all(axis=-1, keepdims=False)  # whole rows never drop by chance
    zeros = np.asarray(dx == 0)
    assert not dropped[np.asarray(valid)].any()
    assert zeros[~np.asarray(valid)].all()                       # padding steps are never read
    assert abs(zeros[np.asarray(valid)].mean() - 0.4) < 0.02


@pytest.mark.parametrize("key", [jax.random.PRNGKey(5), jax.random.key(7),
                                 jax.random.key(7, impl="rbg")])
def test_split_key_grid_is_jax_split_twice(key):
    expected = jax.vmap(lambda k: jax.random.split(k, 8))(jax.random.split(key, 50))
    got = jax.jit(split_key_grid, static_argnums=(1, 2))(key, 50, 8)
    assert got.dtype == expected.dtype
    data = jax.random.key_data if jnp.issubdtype(got.dtype, jax.dtypes.prng_key) else np.asarray
    np.testing.assert_array_equal(data(got), data(expected))
    assert split_key_grid(key, 0, 3).shape[:2] == (0, 3)
    for rows in (-1, 2.5, True):
        with pytest.raises(ValueError, match="non-negative integer rows"):
            split_key_grid(key, rows, 3)


def test_masked_gru_holds_one_gru_step_whatever_the_row_groups():
    """The program does not grow with ``row_groups`` (one loop over the groups, not a copy of
    the step per group: GRU4Rec's compile time), and a group with no valid step is skipped
    with zero gradients for its inputs."""
    w_i, w_h, x, valid = _gru_problem(batch=12)
    valid = valid.at[:, 8:].set(False)                   # the last of 3 groups is all padding

    def dots(row_groups):
        grad = jax.grad(lambda *a: masked_gru(*a, valid, row_groups, 0.4, jax.random.key(0))
                        .sum(), (0, 1, 2))
        return jax.jit(grad).lower(w_i, w_h, x).as_text().count("stablehlo.dot_general")

    assert dots(1) == dots(3) == dots(12) == 8           # 2 forward, 6 in the reverse step
    dx = jax.grad(lambda x: masked_gru(w_i, w_h, x, valid, 3, 0.4, jax.random.key(0)).sum())(x)
    assert not np.asarray(dx[:, 8:]).any()
    np.testing.assert_allclose(masked_gru(w_i, w_h, x, valid, 3)[8:], 0.0)


def test_masked_gru_rejects_bad_arguments():
    w_i, w_h, x, valid = _gru_problem()
    for row_groups in (0, 2.5, True):
        with pytest.raises(ValueError, match="row_groups must be a positive integer"):
            masked_gru(w_i, w_h, x, valid, row_groups)
    with pytest.raises(ValueError, match=r"valid \(T, B\), got \(7, 11, 5\) and \(7, 10\)"):
        masked_gru(w_i, w_h, x, valid[:, :10], 3)
    with pytest.raises(ValueError, match="w_recurrent \\(d, 3d\\)"):
        masked_gru(w_i, w_h[:, :9], x, valid, 3)
    with pytest.raises(ValueError, match="d_in = 5"):
        masked_gru(w_i[:4], w_h, x, valid, 3)
    with pytest.raises(ValueError, match="dropout must be in"):
        masked_gru(w_i, w_h, x, valid, dropout=1.0, dropout_key=jax.random.key(0))
    with pytest.raises(ValueError, match="needs a dropout_key"):
        masked_gru(w_i, w_h, x, valid, dropout=0.4)


def test_gru4rec_all_padding_row_is_finite(gru4rec):
    model, params, forward = gru4rec
    user = forward(params, jnp.zeros((2, 6), jnp.int32))
    assert np.isfinite(user).all()
    np.testing.assert_allclose(user[0], params["dense"]["bias"], atol=1e-7)


# ------------------------------------------------------------------------------------- MFBPR


def test_mfbpr_tables_and_flatten_order():
    model = MFBPR(num_users=7, num_items=NUM_ITEMS, features=D)
    params = model.init(jax.random.key(2), jnp.array([0, 3]))["params"]
    assert params["table_0_users"]["embedding"].shape == (7, D)
    assert params["table_1_items"]["embedding"].shape == (NUM_ITEMS + 1, D)
    leaves = jax.tree_util.tree_leaves(params)
    assert [leaf.shape for leaf in leaves] == [(7, D), (NUM_ITEMS + 1, D)]

    users = model.apply({"params": params}, jnp.array([0, 3]))
    np.testing.assert_array_equal(users, params["table_0_users"]["embedding"][jnp.array([0, 3])])
    scores = model.apply({"params": params}, users, method=MFBPR.score_all)
    expected = users @ params["table_1_items"]["embedding"].T
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-6)
    picked = model.apply({"params": params}, users, jnp.array([[1, 2], [3, 4]]), method=MFBPR.score)
    np.testing.assert_allclose(picked, expected[:, 1:3].at[1].set(expected[1, 3:5]), rtol=1e-5)


# ---------------------------------------------------------------------------------- sevo_mask


def test_sevo_mask_selects_only_the_tables(sasrec, gru4rec):
    for _, params, _ in (sasrec, gru4rec):
        mask = sevo_mask(params)
        flags = jax.tree_util.tree_leaves(mask)
        selected = [p for p, m in zip(paths(params), flags, strict=True) if m]
        assert selected == ["item_embedding/embedding"]
        assert sevo_mask({"params": params})["params"]["item_embedding"]["embedding"]

    mf = MFBPR(num_users=3, num_items=4, features=2)
    mf_mask = sevo_mask(mf.init(jax.random.key(0), jnp.array([0]))["params"])
    assert jax.tree_util.tree_leaves(mf_mask) == [True, True]


def test_sevo_mask_drives_optax_masked(sasrec):
    _, params, _ = sasrec
    opt = optax.masked(optax.sgd(1.0), sevo_mask(params))
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    updates, _ = opt.update(grads, opt.init(params), params)
    assert (updates["item_embedding"]["embedding"] == -1).all()
    assert (updates["position_embedding"]["embedding"] == 1).all()  # passed through untouched


# -------------------------------------------------------------------------------------- losses


def log_sigmoid(x):
    return -math.log1p(math.exp(-x))


def test_sasrec_loss_hand_computed():
    pos = jnp.array([[0.0, 2.0, 5.0]])
    neg = jnp.array([[0.0, -1.0, 5.0]])
    only_first = sasrec_loss(pos, neg, jnp.array([[True, False, False]]))
    assert float(only_first) == pytest.approx(2 * math.log(2), rel=1e-6)
    two = sasrec_loss(pos, neg, jnp.array([[True, True, False]]))
    second = -log_sigmoid(2.0) - log_sigmoid(1.0)
    assert float(two) == pytest.approx((2 * math.log(2) + second) / 2, rel=1e-6)
    assert float(sasrec_loss(pos, neg, jnp.zeros((1, 3), bool))) == 0.0
    # Stable for large logits.
    big = sasrec_loss(jnp.array([-100.0]), jnp.array([100.0]), jnp.array([True]))
    assert float(big) == pytest.approx(200.0, rel=1e-6)


def test_bpr_loss_hand_computed():
    pos, neg = jnp.array([1.0, 0.0, 3.0]), jnp.array([0.0, 0.0, 0.0])
    expected = (-log_sigmoid(1.0) + math.log(2) - log_sigmoid(3.0)) / 3
    assert float(bpr_loss(pos, neg)) == pytest.approx(expected, rel=1e-6)
    masked = bpr_loss(pos, neg, jnp.array([True, True, False]))
    assert float(masked) == pytest.approx((-log_sigmoid(1.0) + math.log(2)) / 2, rel=1e-6)


# ------------------------------------------------------------------------------ toy training


def _fit(loss_fn, params, steps=25, lr=1e-2):
    """Runs Adam; returns the losses, after checking every gradient is finite."""
    opt = optax.adam(lr)

    @jax.jit
    def step(params, state, key):
        loss, grads = jax.value_and_grad(loss_fn)(params, key)
        leaves = jax.tree_util.tree_leaves(grads)
        finite = jnp.all(jnp.array([jnp.isfinite(g).all() for g in leaves]))
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss, finite

    state, losses = opt.init(params), []
    for i in range(steps):
        params, state, loss, finite = step(params, state, jax.random.key(i))
        assert finite
        losses.append(float(loss))
    return losses


def test_sasrec_trains_on_toy_task(sasrec):
    model, params, _ = sasrec
    # The last row is all padding: it must contribute nothing and keep gradients finite.
    inputs = left_pad([[1, 2, 3, 4], [5, 6, 7], [8, 9, 10, 11, 12], []], 20)
    targets = left_pad([[2, 3, 4, 5], [6, 7, 8], [9, 10, 11, 12, 13], []], 20)
    negatives = jnp.where(targets != 0, 20 + targets % 10, 0)

    def loss_fn(p, key):
        h = model.apply({"params": p}, inputs, deterministic=False, rngs={"dropout": key})
        both = jnp.stack([targets, negatives], -1)
        logits = model.apply({"params": p}, h, both, method=SASRec.score)
        return sasrec_loss(logits[..., 0], logits[..., 1], targets != 0)

    losses = _fit(loss_fn, params)
    assert losses[-1] < 0.5 * losses[0]


def test_gru4rec_trains_on_toy_task(gru4rec):
    model, params, forward = gru4rec
    seqs = right_pad([[1, 2], [3, 4, 5], [6], [7, 8, 9, 10]], 6)
    pos, neg = jnp.array([3, 6, 7, 11]), jnp.array([20, 21, 22, 23])

    def loss_fn(p, key):
        user = model.apply({"params": p}, seqs, deterministic=False, rngs={"dropout": key})
        both = model.apply({"params": p}, user, jnp.stack([pos, neg], -1), method=GRU4Rec.score)
        return bpr_loss(both[:, 0], both[:, 1])

    losses = _fit(loss_fn, params)
    assert losses[-1] < 0.5 * losses[0]


def test_mfbpr_trains_on_toy_task():
    model = MFBPR(num_users=4, num_items=NUM_ITEMS, features=D)
    params = model.init(jax.random.key(3), jnp.array([0]))["params"]
    users, pos, neg = jnp.arange(4), jnp.array([1, 2, 3, 4]), jnp.array([5, 6, 7, 8])

    def loss_fn(p, _key):
        u = model.apply({"params": p}, users)
        both = model.apply({"params": p}, u, jnp.stack([pos, neg], -1), method=MFBPR.score)
        return bpr_loss(both[:, 0], both[:, 1])

    losses = _fit(loss_fn, params, lr=5e-2)
    assert losses[-1] < 0.5 * losses[0]


# ----------------------------------------------------------------------------------- BERT4Rec


@pytest.fixture(scope="module")
def bert4rec():
    model = BERT4Rec(NUM_ITEMS, maxlen=8, features=D, num_blocks=2, num_heads=2, dropout=0.2)
    return build(model, jnp.ones((2, 8), jnp.int32))


def test_bert4rec_tables_have_a_mask_token_row(bert4rec):
    model, params, _ = bert4rec
    assert model.mask_id == NUM_ITEMS + 1
    assert params["item_embedding"]["embedding"].shape == (NUM_ITEMS + 2, D)
    assert params["output_embedding"]["embedding"].shape == (NUM_ITEMS + 2, D)
    assert params["output_bias"].shape == (NUM_ITEMS + 2,)
    selected = [p for p, m in zip(paths(params), jax.tree_util.tree_leaves(sevo_mask(params)),
                                  strict=True) if m]
    assert selected == ["item_embedding/embedding", "output_embedding/embedding"]
    # the reference's init: Xavier normal clipped to +-0.02
    table = np.asarray(params["item_embedding"]["embedding"])
    assert np.abs(table).max() <= 0.02 and (np.abs(table) == 0.02).any()


def test_bert4rec_is_bidirectional_and_ignores_padding(bert4rec):
    _, params, forward = bert4rec
    seqs = left_pad([[3, 4, 5, 6]], 8)
    hidden = forward(params, seqs)
    later_changed = forward(params, seqs.at[0, -1].set(9))
    assert not np.allclose(hidden[0, 4], later_changed[0, 4], atol=1e-5)  # sees the future
    # shorter input, same right-aligned positions: padding keys are masked
    np.testing.assert_allclose(forward(params, seqs[:, 4:])[0], hidden[0, 4:], atol=1e-5)


def test_bert4rec_logits_are_the_output_layer(bert4rec):
    model, params, forward = bert4rec
    params = dict(params, output_bias=jnp.arange(NUM_ITEMS + 2, dtype=jnp.float32) / 10)
    hidden = forward(params, left_pad([[3, 4, model.mask_id]], 8))[:, -1]
    logits = model.apply({"params": params}, hidden, method=BERT4Rec.score_all)
    want = hidden @ params["output_embedding"]["embedding"].T + params["output_bias"]
    np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-6)
    picked = model.apply({"params": params}, hidden, jnp.array([[2, 7]]), method=BERT4Rec.score)
    np.testing.assert_allclose(picked, want[:, [2, 7]], rtol=1e-5, atol=1e-6)


def test_bert4rec_padding_rows_of_a_mesh_get_no_probability():
    model = BERT4Rec(5, maxlen=4, features=8, num_heads=2, table_rows=10)
    params = model.init(jax.random.key(0), jnp.ones((1, 4), jnp.int32), deterministic=True)
    assert params["params"]["output_bias"].shape == (7,)
    logits = model.apply(params, jnp.ones((1, 8)), method=BERT4Rec.score_all)
    assert logits.shape == (1, 10) and (logits[0, 7:] < -1e8).all()


def test_cloze_loss_hand_computed():
    logits = jnp.array([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0], [5.0, 1.0, 0.0]])
    labels = jnp.array([1, 0, 2])  # the middle one is padding
    want = ((math.log(3) - 0.0) + (math.log(math.exp(5) + math.exp(1) + 1) - 0.0)) / 2
    assert float(cloze_loss(logits, labels)) == pytest.approx(want, rel=1e-6)
    assert float(cloze_loss(logits, jnp.zeros(3, jnp.int32))) == 0.0


@pytest.mark.parametrize("labels", [[3, 0, 7, 1, 0, 9], [0] * 6], ids=["some masked", "none"])
def test_table_cross_entropy_equals_the_cloze_loss_of_the_logits(labels):
    """The output layer's fused loss: the value and every gradient of ``cloze_loss(hidden @
    table.T + bias)``, JAX autodiff, to float32 rounding (mesh padding rows at -1e9 included)."""
    k = jax.random.split(jax.random.key(3), 3)
    hidden = jax.random.normal(k[0], (6, 8))
    table = 0.5 * jax.random.normal(k[1], (12, 8))
    bias = jnp.concatenate([0.3 * jax.random.normal(k[2], (10,)), jnp.full((2,), -1e9)])
    labels = jnp.array(labels, jnp.int32)

    def reference(h, t, b):
        return cloze_loss(h @ t.T + b, labels)

    def fused(h, t, b):
        return table_cross_entropy(h, t, b, labels)

    (want, want_grads), (got, got_grads) = (jax.value_and_grad(f, argnums=(0, 1, 2))(
        hidden, table, bias) for f in (reference, fused))
    assert float(got) == pytest.approx(float(want), rel=1e-6, abs=1e-7)
    for g, w in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)
    if not labels.any():
        assert float(got) == 0.0 and not any(np.asarray(g).any() for g in got_grads)


def test_bert4rec_cloze_loss_method_is_cloze_loss_of_score_all():
    model = BERT4Rec(10, maxlen=4, features=8, num_heads=2, table_rows=14)
    params = model.init(jax.random.key(0), jnp.ones((1, 4), jnp.int32), deterministic=True)
    hidden = jax.random.normal(jax.random.key(1), (5, 8))
    labels = jnp.array([1, 11, 0, 4, 10], jnp.int32)  # 11: the mask token's id
    want = cloze_loss(model.apply(params, hidden, method=BERT4Rec.score_all), labels)
    got = model.apply(params, hidden, labels, method=BERT4Rec.cloze_loss)
    assert float(got) == pytest.approx(float(want), rel=1e-6)


# -------------------------------------------------------------------------------------- STOSA


@pytest.fixture(scope="module")
def stosa():
    model = STOSA(NUM_ITEMS, maxlen=8, features=D, num_blocks=2, num_heads=2)
    return build(model, jnp.ones((2, 8), jnp.int32))


def test_wasserstein_distance_hand_computed():
    m1, c1 = jnp.array([0.0, 0.0]), jnp.array([1.0, 4.0])
    m2, c2 = jnp.array([3.0, 4.0]), jnp.array([4.0, 1.0])
    # ||m1 - m2||^2 + ||sqrt(c1) - sqrt(c2)||^2 = 25 + 1 + 1
    assert float(wasserstein_distance(m1, c1, m2, c2)) == pytest.approx(27.0)
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, 3, 4)), rng.normal(size=(2, 5, 4))
    ca, cb = rng.uniform(0.1, 2, size=(2, 3, 4)), rng.uniform(0.1, 2, size=(2, 5, 4))
    pairwise = wasserstein_distance(a[:, :, None], ca[:, :, None], b[:, None], cb[:, None])
    np.testing.assert_allclose(wasserstein_distance_matrix(a, ca, b, cb), pairwise, rtol=1e-5)
    np.testing.assert_allclose(wasserstein_distance_matrix(a, ca, b, cb, scale=0.25),
                               0.25 * pairwise, rtol=1e-5)


def test_stosa_loss_hand_computed():
    pos, neg, pvn = jnp.array([[-1.0, -2.0, 0.0]]), jnp.array([[-3.0, -1.0, 0.0]]), \
        jnp.array([[-0.5, -4.0, 9.0]])
    mask = jnp.array([[True, True, False]])
    bpr = (-log_sigmoid(2.0) - log_sigmoid(-1.0)) / 2
    pvn_term = (0.5 + 0.0) / 2  # max(pvn - pos, 0): 0.5 and 0
    got = float(stosa_loss(pos, neg, pvn, mask, 0.1))
    assert got == pytest.approx(bpr + 0.1 * pvn_term, rel=1e-6)


def test_stosa_means_skip_the_layers_as_in_the_reference(stosa):
    model, params, forward = stosa
    seqs = left_pad([[3, 4, 5]], 8)
    mean, cov = np.split(np.asarray(forward(params, seqs)), 2, axis=-1)
    # the reference's encoder never updates the means: M = ELU(LN(E_M[seq] + P_M))
    x = params["mean_embedding"]["embedding"][seqs] + params["mean_position"]["embedding"]
    ln = params["embedding_norm"]
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    want = jax.nn.elu((x - mu) / jnp.sqrt(var + 1e-12) * ln["scale"] + ln["bias"])
    np.testing.assert_allclose(mean, want, rtol=1e-4, atol=1e-5)
    assert (cov > 0).all()
    updated = STOSA(NUM_ITEMS, maxlen=8, features=D, num_blocks=2, num_heads=2, update_means=True)
    moved = updated.apply({"params": params}, seqs, deterministic=True)
    assert not np.allclose(np.split(np.asarray(moved), 2, axis=-1)[0], mean, atol=1e-4)


def test_stosa_is_causal(stosa):
    _, params, forward = stosa
    seqs = left_pad([[3, 4, 5, 6]], 8)
    changed = forward(params, seqs.at[0, -1].set(9))
    # the items' positions 4..6 (padding queries see no valid key and average every position,
    # as in the reference; nothing reads them)
    np.testing.assert_allclose(forward(params, seqs)[0, 4:7], changed[0, 4:7], atol=1e-5)


def test_stosa_scores_are_negative_wasserstein_distances(stosa):
    model, params, forward = stosa
    hidden = forward(params, left_pad([[3, 4, 5]], 8))[:, -1]
    scores = model.apply({"params": params}, hidden, method=STOSA.score_all)
    mean, cov = np.split(np.asarray(hidden), 2, axis=-1)
    item_mean = np.asarray(params["mean_embedding"]["embedding"])
    item_cov = np.asarray(jax.nn.elu(params["covariance_embedding"]["embedding"]) + 1)
    # the reference's recommend_from_full: -W(user, every item), elementwise
    want = -(((mean - item_mean) ** 2).sum(-1) + ((np.sqrt(cov) - np.sqrt(item_cov)) ** 2).sum(-1))
    np.testing.assert_allclose(scores[0], want, rtol=1e-4, atol=1e-4)
    assert (np.argsort(-np.asarray(scores[0]))[:5] == np.argsort(-want)[:5]).all()
    picked = model.apply({"params": params}, hidden, jnp.array([[2, 7]]), method=STOSA.score)
    np.testing.assert_allclose(picked[0], want[[2, 7]], rtol=1e-4, atol=1e-4)


def test_mfbpr_starts_like_the_reference():
    params = MFBPR(num_users=50, num_items=400, features=D).init(
        jax.random.key(0), jnp.array([0]))["params"]
    for table in ("table_0_users", "table_1_items"):
        assert np.std(params[table]["embedding"]) == pytest.approx(1e-4, rel=0.05)
