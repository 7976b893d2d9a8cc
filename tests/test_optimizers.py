"""The optimizers against the float64 oracle of spec §3, side by side for 50 steps."""

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.sparse as sp

import sevo_jax as sj
from tests import oracle

N_USERS, N_ITEMS, D = 4, 9, 5


def awkward_graph(n: int, seed: int = 0) -> sp.csr_matrix:
    """Random weighted graph with two isolated nodes (0 and n-1) and a self-loop on node 2."""
    rng = np.random.default_rng(seed)
    a = rng.random((n, n)) * (rng.random((n, n)) < 0.35)
    a = np.triu(a, 1)
    a = a + a.T
    a[0, :] = a[:, 0] = 0.0
    a[-1, :] = a[:, -1] = 0.0
    a[2, 2] = 1.5
    return sp.csr_matrix(a)


def random_grads(rng, params, zero_row_prob=0.4):
    grads = {}
    for k, v in params.items():
        g = rng.standard_normal(v.shape)
        if v.ndim == 2:
            g[rng.random(v.shape[0]) < zero_row_prob] = 0.0
        grads[k] = g
    return grads


def run_side_by_side(make_opt, kind, approx, beta, num_layers, oracle_kw, steps=50, lr_at=None):
    """``lr_at(t)``: the learning rate of 1-based step ``t`` when ``make_opt`` uses a schedule."""
    rng = np.random.default_rng(1)
    n = N_USERS + N_ITEMS
    a = awkward_graph(n)
    params64 = {
        "table_0_users": rng.standard_normal((N_USERS, D)),
        "table_1_items": rng.standard_normal((N_ITEMS, D)),
        "dense": rng.standard_normal((3, 2)),
    }
    mask = {"table_0_users": True, "table_1_items": True, "dense": False}
    ref = oracle.Oracle(kind, params64, ["table_0_users", "table_1_items"],
                        oracle.normalize(a.toarray()), beta=beta, num_layers=num_layers,
                        approx=approx, **oracle_kw)
    opt = make_opt(a, mask)
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params64)
    state = opt.init(params)

    @jax.jit
    def step(params, state, grads):
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for t in range(1, steps + 1):
        grads = random_grads(rng, params64)
        if lr_at is not None:
            ref.lr = lr_at(t)
        expected = ref.step(grads)
        params, state = step(params, state, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), grads))
    for k in params:
        np.testing.assert_allclose(np.asarray(params[k]), expected[k], rtol=2e-5, atol=2e-5, err_msg=k)


@pytest.mark.parametrize("approx", sj.APPROXIMATIONS)
@pytest.mark.parametrize("beta,num_layers", [(0.99, 3), (0.5, 1), (0.9, 5), (0.0, 2)])
def test_sevo_adamw_matches_oracle(approx, beta, num_layers):
    kw = dict(lr=1e-2, b1=0.9, b2=0.98, eps=1e-8, wd=0.1)
    run_side_by_side(
        lambda a, mask: sj.sevo_adamw(kw["lr"], a, beta, num_layers, b1=0.9, b2=0.98, eps=1e-8,
                                      weight_decay=0.1, mask=mask, approx=approx),
        "adamw", approx, beta, num_layers, kw)


@pytest.mark.parametrize("approx", sj.APPROXIMATIONS)
@pytest.mark.parametrize("beta,num_layers", [(0.99, 3), (0.7, 2)])
def test_sevo_adam_matches_oracle(approx, beta, num_layers):
    kw = dict(lr=1e-2, wd=1e-2)
    run_side_by_side(
        lambda a, mask: sj.sevo_adam(kw["lr"], a, beta, num_layers, weight_decay=1e-2,
                                     mask=mask, approx=approx),
        "adam", approx, beta, num_layers, kw)


@pytest.mark.parametrize("approx", sj.APPROXIMATIONS)
@pytest.mark.parametrize("momentum,nesterov", [(None, False), (0.9, False), (0.9, True)])
def test_sevo_sgd_matches_oracle(approx, momentum, nesterov):
    kw = dict(lr=1e-2, wd=1e-3, momentum=momentum, nesterov=nesterov)
    run_side_by_side(
        lambda a, mask: sj.sevo_sgd(kw["lr"], a, 0.9, 3, momentum=momentum, nesterov=nesterov,
                                    weight_decay=1e-3, mask=mask, approx=approx),
        "sgd", approx, 0.9, 3, kw)


@pytest.mark.parametrize("kind", ["adamw", "adam", "sgd"])
def test_learning_rate_schedule_matches_oracle(kind):
    """A schedule: Optax evaluates it at the step count before the step (0-based)."""
    sched = optax.linear_schedule(1e-2, 1e-3, 10)
    make = {"adamw": lambda a, mask: sj.sevo_adamw(sched, a, 0.9, 2, weight_decay=0.1, mask=mask),
            "adam": lambda a, mask: sj.sevo_adam(sched, a, 0.9, 2, weight_decay=1e-2, mask=mask),
            "sgd": lambda a, mask: sj.sevo_sgd(sched, a, 0.9, 2, weight_decay=1e-3, mask=mask)}[kind]
    wd = {"adamw": 0.1, "adam": 1e-2, "sgd": 1e-3}[kind]
    run_side_by_side(make, kind, "neumann", 0.9, 2, dict(lr=1e-2, wd=wd), steps=15,
                     lr_at=lambda t: float(sched(t - 1)))


def test_adamw_corrected_schedule_matches_oracle_with_beta_zero():
    sched = optax.linear_schedule(1e-2, 1e-3, 10)
    run_side_by_side(lambda a, mask: sj.adamw_corrected(sched, weight_decay=0.1, mask=mask),
                     "adamw", "neumann", 0.0, 2, dict(lr=1e-2, wd=0.1), steps=15,
                     lr_at=lambda t: float(sched(t - 1)))


def test_correction_keeps_absent_rows_moving_with_their_momentum():
    """A row absent from the batch keeps its moments instead of decaying them towards zero."""
    opt = sj.scale_by_adam_corrected(0.9, 0.999, 1e-8)
    params = {"emb": jnp.zeros((2, 3))}
    state = opt.init(params)
    g1 = {"emb": jnp.array([[1.0, 2.0, 3.0], [1.0, 1.0, 1.0]])}
    u1, state = opt.update(g1, state)
    g2 = {"emb": jnp.array([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])}
    u2, state = opt.update(g2, state)
    np.testing.assert_allclose(u2["emb"][0], u1["emb"][0], rtol=1e-4)
    plain = optax.scale_by_adam(0.9, 0.999, 1e-8)
    ps = plain.init(params)
    _, ps = plain.update(g1, ps)
    p2, _ = plain.update(g2, ps)
    assert np.abs(np.asarray(p2["emb"][0])).max() < np.abs(np.asarray(u2["emb"][0])).max()


def test_adamw_corrected_unmasked_leaf_is_plain_adamw():
    rng = np.random.default_rng(0)
    params = {"emb": jnp.asarray(rng.standard_normal((6, 3)), jnp.float32),
              "w": jnp.asarray(rng.standard_normal((6, 3)), jnp.float32)}
    ours = sj.adamw_corrected(1e-2, weight_decay=0.1, mask={"emb": True, "w": False})
    ref = optax.adamw(1e-2, weight_decay=0.1)
    s1, s2 = ours.init(params), ref.init(params)
    for step in range(5):
        g = jax.tree.map(lambda p: p.at[:2].set(0.0) if step else p, params)
        u1, s1 = ours.update(g, s1, params)
        u2, s2 = ref.update(g, s2, params)
        np.testing.assert_allclose(u1["w"], u2["w"], rtol=1e-6, atol=1e-8)
    assert not np.allclose(u1["emb"], u2["emb"])


def test_design_card_composition_runs_and_smooths_the_gradient_first():
    a = awkward_graph(N_ITEMS)
    params = {"emb": jnp.asarray(np.random.default_rng(0).standard_normal((N_ITEMS, D)), jnp.float32)}
    literal = optax.chain(sj.sevo_smooth(a, 0.9, 2), sj.adamw_corrected(1e-3))
    state = literal.init(params)
    grads = jax.tree.map(lambda p: 0.1 * p, params)
    updates, state = jax.jit(literal.update)(grads, state, params)
    smoothed = sj.propagate(sj.as_normalized_graph(a), grads["emb"], 0.9, 2)
    manual = sj.adamw_corrected(1e-3)
    expected, _ = manual.update({"emb": smoothed}, manual.init(params), params)
    np.testing.assert_allclose(updates["emb"], expected["emb"], rtol=1e-5, atol=1e-9)


def test_bf16_params_keep_their_dtype():
    a = awkward_graph(N_ITEMS)
    params = {"emb": jnp.ones((N_ITEMS, D), jnp.bfloat16)}
    opt = sj.sevo_adamw(1e-3, a)
    state = opt.init(params)
    updates, _ = jax.jit(opt.update)(params, state, params)
    assert updates["emb"].dtype == jnp.bfloat16
    smooth = sj.sevo_smooth(a)
    out, _ = smooth.update(params, smooth.init(params))
    assert out["emb"].dtype == jnp.bfloat16


def test_state_is_a_checkpointable_pytree():
    a = awkward_graph(N_ITEMS)
    params = {"emb": jnp.ones((N_ITEMS, D)), "w": jnp.ones((2,))}
    opt = sj.sevo_adamw(1e-3, a, mask={"emb": True, "w": False})
    state = opt.init(params)
    _, state = opt.update(params, state, params)
    leaves, treedef = jax.tree_util.tree_flatten(state)
    restored = jax.tree_util.tree_unflatten(treedef, [np.asarray(x) for x in leaves])
    assert jax.tree.structure(restored) == treedef
    blob = flax.serialization.to_bytes(state)
    back = flax.serialization.from_bytes(opt.init(params), blob)
    for x, y in zip(jax.tree_util.tree_leaves(back), leaves):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert int(optax.tree_utils.tree_get(state, "count")) == 1


def test_mask_as_callable_matches_oracle():
    """A callable mask selects the same tables as the dict: the oracle's values, 50 steps."""
    kw = dict(lr=1e-2, b1=0.9, b2=0.98, eps=1e-8, wd=0.1)

    def make(a, mask):
        return sj.sevo_adamw(kw["lr"], a, 0.9, 3, b2=0.98, weight_decay=0.1,
                             mask=lambda params: {k: params[k].ndim == 2 and k != "dense" for k in params})

    run_side_by_side(make, "adamw", "neumann", 0.9, 3, kw)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(b1=1.0), ValueError, r"b1 must lie in \[0, 1\), got 1.0"),  # was: every update NaN
    (dict(b2=1.0), ValueError, r"b2 must lie in \[0, 1\)"),
    (dict(b1=1.5), ValueError, "b1 must lie"),  # was: finite, wrong updates
    (dict(b2=-0.5), ValueError, "b2 must lie"),
    (dict(eps=-1.0), ValueError, "eps must be a finite number >= 0"),
    (dict(eps=float("nan")), ValueError, "eps must be"),
    (dict(b1="0.9"), TypeError, "b1 must be a number"),
])
def test_bad_moment_decays_are_refused(kwargs, error, message):
    adjacency = np.array([[0.0, 1.0], [1.0, 0.0]])
    for make in (lambda: sj.sevo_adamw(1e-3, adjacency, **kwargs),
                 lambda: sj.sevo_adam(1e-3, adjacency, **kwargs),
                 lambda: sj.adamw_corrected(1e-3, **kwargs),
                 lambda: sj.scale_by_adam_corrected(**kwargs)):
        with pytest.raises(error, match=message):
            make()
    with pytest.raises(ValueError, match="momentum must lie"):
        sj.sevo_sgd(1e-3, adjacency, momentum=1.5)
