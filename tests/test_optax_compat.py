"""Optax/Flax idioms on SEvo's optimizers, each under ``jax.jit`` and checked by VALUE (issue 13).

The reference is always another computation of the same update: the unwrapped optimizer, a
fresh state, ``adamw_corrected`` (psi = identity) or ``propagate`` on a known direction.
"""

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.sparse as sp

import sevo_jax as sj

N, D = 6, 3
LR, WD = 1e-2, 0.1


def path_graph(n: int) -> sp.csr_matrix:
    a = sp.diags([np.ones(n - 1), np.ones(n - 1)], [-1, 1], shape=(n, n))
    return sp.csr_matrix(a)


A = path_graph(N)
MASK = {"emb": True, "w": False}


def make_params():
    rng = np.random.default_rng(0)
    return {"emb": jnp.asarray(rng.standard_normal((N, D)), jnp.float32),
            "w": jnp.asarray(rng.standard_normal((D, 2)), jnp.float32)}


def make_grads(seed=1):
    rng = np.random.default_rng(seed)
    g = {"emb": rng.standard_normal((N, D)), "w": rng.standard_normal((D, 2))}
    g["emb"][[1, 4]] = 0.0  # rows absent from the batch
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), g)


def sevo(**kw):
    return sj.sevo_adamw(LR, A, **{"weight_decay": WD, "mask": MASK, **kw})


def first_update(opt, params, grads):
    return jax.jit(opt.update)(grads, opt.init(params), params)[0]


def close(a, b, tol=1e-6):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64),
                                   rtol=tol, atol=tol)


def equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ---- idioms that already worked: keep them working ------------------------------------------


def test_multi_steps_averages_the_micro_batches():
    params, g1, g2 = make_params(), make_grads(1), make_grads(2)
    opt = optax.MultiSteps(sevo(), every_k_schedule=2)
    step = jax.jit(opt.update)
    state = opt.init(params)
    u1, state = step(g1, state, params)
    u2, state = step(g2, state, params)
    equal(u1, jax.tree.map(jnp.zeros_like, params))
    close(u2, first_update(sevo(), params, jax.tree.map(lambda a, b: (a + b) / 2, g1, g2)))


@pytest.mark.parametrize("combine", ["multi_transform", "partition"])
def test_multi_transform_and_partition(combine):
    params, grads = make_params(), make_grads()
    labels = {"emb": "sevo", "w": "plain"}
    parts = {"sevo": sj.sevo_adamw(LR, A, weight_decay=WD), "plain": optax.adamw(LR, weight_decay=WD)}
    opt = getattr(optax, combine)(parts, labels)
    close(first_update(opt, params, grads), first_update(sevo(), params, grads))


def test_masked_passes_other_leaves_through():
    params, grads = make_params(), make_grads()
    opt = optax.masked(sj.sevo_smooth(A, 0.9, 2), MASK)
    out = first_update(opt, params, grads)
    equal(out["w"], grads["w"])
    close(out["emb"], sj.propagate(sj.as_normalized_graph(A), grads["emb"], 0.9, 2))


def test_apply_if_finite_skips_a_nan_step():
    params, grads = make_params(), make_grads()
    opt = optax.apply_if_finite(sevo(), max_consecutive_errors=3)
    step = jax.jit(opt.update)
    state = opt.init(params)
    bad = jax.tree.map(lambda g: g.at[0].set(jnp.nan), grads)
    u, state = step(bad, state, params)
    equal(u, jax.tree.map(jnp.zeros_like, params))
    u, state = step(grads, state, params)
    close(u, first_update(sevo(), params, grads))


def test_schedule_free_first_step_is_the_base_step():
    params, grads = make_params(), make_grads()
    opt = optax.contrib.schedule_free(sevo(), learning_rate=LR)
    close(first_update(opt, params, grads), first_update(sevo(), params, grads), 1e-5)


def test_reduce_on_plateau_scales_the_update():
    params, grads = make_params(), make_grads()
    opt = optax.chain(sevo(), optax.contrib.reduce_on_plateau(factor=0.5, patience=1))
    step = jax.jit(opt.update)
    state = opt.init(params)
    ref, ref_state = sevo(), sevo().init(params)
    scales = []
    for value in (1.0, 2.0):  # the second value is worse: a plateau
        u, state = step(grads, state, params, value=jnp.asarray(value))
        r, ref_state = ref.update(grads, ref_state, params)
        scales.append(float(optax.tree_utils.tree_get(state, "scale")))
        close(u, jax.tree.map(lambda x: scales[-1] * x, r))
    assert scales == [1.0, 0.5]


def test_lookahead_fast_step():
    params, grads = make_params(), make_grads()
    opt = optax.lookahead(sevo(), sync_period=2, slow_step_size=0.5)
    lp = optax.LookaheadParams.init_synced(params)
    u, _ = jax.jit(opt.update)(grads, opt.init(lp), lp)
    close(u.fast, first_update(sevo(), params, grads))


def test_tree_get_and_set():
    params, grads = make_params(), make_grads()
    opt = optax.inject_hyperparams(sj.sevo_adamw)(LR, A, weight_decay=WD, mask=MASK)
    state = opt.init(params)
    _, state = jax.jit(opt.update)(grads, state, params)
    assert int(state.count) == 1 and float(optax.tree_utils.tree_get(state, "beta")) == np.float32(0.99)
    graph = optax.tree_utils.tree_get(state, "graph")
    assert isinstance(graph, sj.GraphOperator) and graph.num_nodes == N
    state = optax.tree_utils.tree_set(state, beta=jnp.asarray(0.0))
    u, _ = jax.jit(opt.update)(grads, state, params)
    ref = optax.inject_hyperparams(sj.adamw_corrected)(LR, weight_decay=WD, mask=MASK)
    rs = ref.init(params)
    _, rs = ref.update(grads, rs, params)
    equal(u, jax.jit(ref.update)(grads, rs, params)[0])


def test_flax_train_state():
    from flax.training import train_state

    params, grads = make_params(), make_grads()
    ts = train_state.TrainState.create(apply_fn=None, params=params, tx=sevo())
    ts = jax.jit(lambda ts, g: ts.apply_gradients(grads=g))(ts, grads)
    close(ts.params, optax.apply_updates(params, first_update(sevo(), params, grads)))


def test_nnx_optimizer():
    from flax import nnx

    class Tables(nnx.Module):
        def __init__(self, rngs):
            self.emb = nnx.Embed(N, D, rngs=rngs)

    model = Tables(nnx.Rngs(0))
    before = jnp.array(model.emb.embedding[...])
    optimizer = nnx.Optimizer(model, sj.sevo_adamw(LR, A, weight_decay=WD), wrt=nnx.Param)
    g = make_grads()["emb"]

    @nnx.jit
    def step(model, optimizer):
        grads = jax.tree.map(lambda p: g, nnx.state(model, nnx.Param))
        optimizer.update(model, grads)

    step(model, optimizer)
    ref = sj.sevo_adamw(LR, A, weight_decay=WD)
    u = first_update(ref, {"e": before}, {"e": g})["e"]
    close(model.emb.embedding[...], before + u)


def test_flax_serialization_round_trip_without_the_graph():
    params, grads = make_params(), make_grads()
    opt = sevo()
    state = opt.init(params)
    _, state = jax.jit(opt.update)(grads, state, params)
    blob = flax.serialization.to_bytes(state)
    graph = state[1].graph
    assert flax.serialization.to_state_dict(state)["1"]["graph"] == {"fingerprint": graph.fingerprint}
    back = flax.serialization.from_bytes(opt.init(params), blob)
    equal(back, state)
    other = sj.sevo_adamw(LR, path_graph(N) * 2 + sp.eye(N), mask=MASK)
    with pytest.raises(ValueError, match="fingerprint"):
        flax.serialization.from_bytes(other.init(params), blob)


def test_orbax_round_trip(tmp_path):
    import orbax.checkpoint as ocp

    params, grads = make_params(), make_grads()
    opt = sevo()
    state = opt.init(params)
    _, state = jax.jit(opt.update)(grads, state, params)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp_path / "state", state)
    ckpt.wait_until_finished()
    restored = ckpt.restore(tmp_path / "state", jax.tree.map(ocp.utils.to_shape_dtype_struct, state))
    equal(restored, state)
    u1, _ = jax.jit(opt.update)(grads, restored, params)
    u2, _ = jax.jit(opt.update)(grads, state, params)
    equal(u1, u2)


# ---- idioms fixed by issue 13 ------------------------------------------------------------------


def test_injected_beta_zero_is_exactly_adamw_corrected():
    """Both injected, so their Adam hyperparameters are the same float32 arrays. Step by step
    (eager) the updates are bitwise equal; under jit, XLA fuses the Adam arithmetic differently
    on either side of psi's loop, which moves some entries by one float32 ulp, and psi itself
    (sevo_smooth with an injected beta of 0) is bitwise the identity."""
    params = make_params()
    opt = optax.inject_hyperparams(sj.sevo_adamw)(LR, A, beta=0.0, weight_decay=WD, mask=MASK)
    ref = optax.inject_hyperparams(sj.adamw_corrected)(LR, weight_decay=WD, mask=MASK)
    s, rs = opt.init(params), ref.init(params)
    js, jrs = s, rs
    step, ref_step = jax.jit(opt.update), jax.jit(ref.update)
    for seed in range(3):
        g = make_grads(seed)
        u, s = opt.update(g, s, params)
        r, rs = ref.update(g, rs, params)
        equal(u, r)
        ju, js = step(g, js, params)
        jr, jrs = ref_step(g, jrs, params)
        close(ju, jr, 3e-7)
    smooth = optax.inject_hyperparams(sj.sevo_smooth)(A, beta=0.0, mask=MASK)
    g = make_grads()
    equal(jax.jit(smooth.update)(g, smooth.init(params))[0], g)


def test_injected_beta_and_num_layers_take_effect():
    params, grads = make_params(), make_grads()
    opt = optax.inject_hyperparams(sj.sevo_adamw)(LR, A, weight_decay=WD, mask=MASK)
    state = opt.init(params)
    assert state.hyperparams["num_layers"].dtype == jnp.int32
    step = jax.jit(opt.update)
    close(step(grads, state, params)[0], first_update(sevo(), params, grads))
    state.hyperparams["beta"] = jnp.asarray(0.5)
    state.hyperparams["num_layers"] = jnp.asarray(1)
    close(step(grads, state, params)[0], first_update(sevo(beta=0.5, num_layers=1), params, grads))


def test_beta_schedule_on_sevo_smooth():
    params, grads = make_params(), make_grads()
    sched = optax.linear_schedule(0.0, 0.8, 4)
    opt = optax.inject_hyperparams(sj.sevo_smooth)(A, beta=sched, mask=MASK)
    state = opt.init(params)
    step = jax.jit(opt.update)
    graph = sj.as_normalized_graph(A)
    for t in range(3):
        u, state = step(grads, state)
        close(u["emb"], sj.propagate(graph, grads["emb"], float(sched(t)), 3), 1e-5)


@pytest.mark.parametrize("bad,needle", [({"beta": 1.5}, "beta"), ({"num_layers": -1}, "num_layers")])
def test_injected_values_are_validated_when_concrete(bad, needle):
    opt = optax.inject_hyperparams(sj.sevo_adamw)(LR, A, mask=MASK, **bad)
    with pytest.raises(ValueError, match=needle):
        opt.init(make_params())


@pytest.mark.parametrize("name,value", [("beta", 1.0), ("beta", 1.5), ("beta", -0.1),
                                        ("num_layers", -1)])
def test_injected_values_out_of_range_under_jit_give_nan_not_a_silent_update(name, value):
    """A traced setting cannot raise under jit: the smoothed table's update is NaN instead,
    the other leaves and an in-range setting are untouched."""
    params, grads = make_params(), make_grads()
    opt = optax.inject_hyperparams(sj.sevo_adamw)(LR, A, weight_decay=WD, mask=MASK)
    state = opt.init(params)
    step = jax.jit(opt.update)
    good = step(grads, state, params)[0]
    state.hyperparams[name] = jnp.asarray(value, state.hyperparams[name].dtype)
    bad = step(grads, state, params)[0]
    assert np.all(np.isnan(np.asarray(bad["emb"])))
    equal(bad["w"], good["w"])
    graph = sj.as_normalized_graph(A)
    traced = jax.jit(lambda x, b, n: sj.propagate(graph, x, b, n))
    assert np.all(np.isnan(np.asarray(traced(grads["emb"], *(
        (value, 3) if name == "beta" else (0.9, value))))))
    close(traced(grads["emb"], 0.9, 3), sj.propagate(graph, grads["emb"], 0.9, 3), 1e-6)


def test_zeros_like_reset_is_a_fresh_init():
    params, grads = make_params(), make_grads()
    opt = sevo()
    step = jax.jit(opt.update)
    state = opt.init(params)
    for seed in range(3):
        _, state = step(make_grads(seed), state, params)
    reset = jax.tree.map(jnp.zeros_like, state)
    u, repaired = step(grads, reset, params)
    equal(u, first_update(opt, params, grads))
    assert bool(repaired[1].graph.is_intact())


def test_without_repair_the_update_has_no_callback_and_never_uses_a_broken_graph():
    """repair=False (the trainer's setting): the same updates on an intact state, no host
    callback in the compiled update (so JAX's persistent cache can keep it), NaN on the
    smoothed table for a zeroed state, and a clear error for a cast one."""
    params, grads = make_params(), make_grads()
    smooth, plain = sj.sevo_smooth(A, mask=MASK, repair=False), sj.sevo_smooth(A, mask=MASK)
    state = smooth.init(params)
    u, _ = jax.jit(smooth.update)(grads, state)
    equal(u, jax.jit(plain.update)(grads, plain.init(params))[0])
    text = jax.jit(smooth.update).lower(grads, state).as_text()
    assert "callback" not in text and "callback" in jax.jit(plain.update).lower(
        grads, plain.init(params)).as_text()
    broken, _ = jax.jit(smooth.update)(grads, jax.tree.map(jnp.zeros_like, state))
    assert np.isnan(np.asarray(broken["emb"])).all()
    equal(broken["w"], grads["w"])  # unmasked leaves pass through
    with pytest.raises(ValueError, match="repair=False does not re-upload"):
        smooth.update(grads, optax.tree.cast(state, jnp.bfloat16))
    trusting = sevo(repair=False)
    close(trusting.update(grads, trusting.init(params), params)[0],
          first_update(sevo(), params, grads))


def test_cast_state_still_updates_right():
    params, grads = make_params(), make_grads()
    smooth = sj.sevo_smooth(A, mask=MASK)
    cast = optax.tree.cast(smooth.init(params), jnp.bfloat16)  # the graph's indices too
    u, state = jax.jit(smooth.update)(grads, cast)
    equal(u, first_update(smooth, params, grads))
    assert state.graph.indices.dtype == jnp.int32 and bool(state.graph.is_intact())
    # the floating leaves of the whole optimizer's state in bfloat16 (the usual memory saving)
    opt = sevo()
    to_bf16 = lambda x: x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x
    u, _ = jax.jit(opt.update)(grads, jax.tree.map(to_bf16, opt.init(params)), params)
    close(u, first_update(opt, params, grads))


def test_donated_state_leaves_other_optimizers_intact():
    params = make_params()
    graph = sj.as_normalized_graph(A)
    opt = sj.sevo_adamw(LR, graph, weight_decay=WD, mask=MASK)
    other = sj.sevo_adamw(LR, graph, weight_decay=WD, mask=MASK)
    kept = other.init(params)
    donated = jax.jit(opt.update, donate_argnums=1)
    plain = jax.jit(opt.update)
    s_don, s_ref = opt.init(params), opt.init(params)
    for seed in range(3):
        u_don, s_don = donated(make_grads(seed), s_don, params)
        u_ref, s_ref = plain(make_grads(seed), s_ref, params)
        equal(u_don, u_ref)
    equal(first_update(opt, params, make_grads()), first_update(other, params, make_grads()))
    equal(jax.jit(other.update)(make_grads(), kept, params)[0], first_update(opt, params, make_grads()))
    close(graph.matmul(jnp.ones((N, 1))), sj.as_normalized_graph(A).to_scipy() @ np.ones((N, 1)))


def test_a_nan_row_does_not_spread():
    """10-node path graph, L = 3: one NaN gradient row poisons that row only, like adamw."""
    n = 10
    a = path_graph(n)
    params = {"emb": jnp.ones((n, 2))}
    g = jnp.asarray(np.random.default_rng(0).standard_normal((n, 2)), jnp.float32)
    bad = {"emb": g.at[4, 0].set(jnp.nan)}
    plain, _ = jax.jit(optax.adamw(LR).update)(bad, optax.adamw(LR).init(params), params)
    opt = sj.sevo_adamw(LR, a, num_layers=3)
    u, state = jax.jit(opt.update)(bad, opt.init(params), params)
    nonfinite = lambda x: np.flatnonzero(~np.isfinite(np.asarray(x)).all(axis=1)).tolist()
    assert nonfinite(u["emb"]) == nonfinite(plain["emb"]) == [4]
    # finite rows: as if row 4 were absent from the batch (kept out of the propagation)
    ref = first_update(opt, params, {"emb": g.at[4].set(0.0)})
    rows = [i for i in range(n) if i != 4]
    close(np.asarray(u["emb"])[rows], np.asarray(ref["emb"])[rows])
    # and it stays confined on the next steps
    u, state = jax.jit(opt.update)({"emb": g}, state, params)
    assert nonfinite(u["emb"]) == [4]


def test_tree_map_params():
    params = make_params()
    opt = sevo()
    state = opt.init(params)
    shapes = optax.tree_utils.tree_map_params(opt, lambda p: p.shape, state)
    adam = shapes[0]
    assert adam.mu == adam.nu == {"emb": (N, D), "w": (D, 2)}
    assert isinstance(shapes[1].graph, sj.NormalizedGraph)
    specs = optax.tree_utils.tree_map_params(
        opt, lambda _, s: s, state, {"emb": "rows", "w": "replicated"},
        transform_non_params=lambda _: "other")
    assert specs[0].mu == {"emb": "rows", "w": "replicated"} and specs[0].count == "other"
    inj = optax.inject_hyperparams(sj.sevo_adamw)(LR, A, mask=MASK)
    mapped = optax.tree_utils.tree_map_params(inj, lambda p: p.shape, inj.init(params))
    assert mapped.inner_state[0].mu == {"emb": (N, D), "w": (D, 2)}


def test_decay_mask_and_mu_dtype():
    params, grads = make_params(), make_grads()
    opt = sevo(beta=0.0, decay_mask={"emb": False, "w": True}, mu_dtype=jnp.bfloat16)
    state = opt.init(params)
    assert state[0].mu["emb"].dtype == jnp.bfloat16 and state[0].nu["emb"].dtype == jnp.float32
    u, _ = jax.jit(opt.update)(grads, state, params)
    ref = optax.adamw(LR, weight_decay=WD, mask={"emb": False, "w": True}, mu_dtype=jnp.bfloat16)
    close(u["w"], first_update(ref, params, grads)["w"])
    no_decay = sj.adamw_corrected(LR, weight_decay=0.0, mask=MASK)
    close(u["emb"], first_update(no_decay, params, grads)["emb"])


def test_jitted_init_does_not_embed_the_graph():
    """``jax.jit(opt.init)``: the graph comes through a callback, not as a program constant."""
    big = sp.random(400, 400, density=0.05, random_state=0)
    big = sp.csr_matrix(big + big.T)
    params = {"emb": jnp.ones((400, D)), "w": jnp.ones((D, 2))}
    opt = sj.sevo_adamw(LR, big, mask=MASK)
    hlo = jax.jit(opt.init).lower(params).as_text()
    graph_bytes = 12 * big.nnz
    assert len(hlo) < graph_bytes, (len(hlo), graph_bytes)
    equal(jax.jit(opt.init)(params), opt.init(params))
    grads = jax.tree.map(jnp.ones_like, params)
    equal(jax.jit(opt.update)(grads, jax.jit(opt.init)(params), params)[0],
          first_update(opt, params, grads))


def test_graph_subtrees_can_be_stripped_for_a_checkpoint():
    """What a checkpointer does: keep the fingerprints, drop the graph arrays; restoring into a
    fresh init's state then updates exactly like the original state."""
    params, grads = make_params(), make_grads()
    opt = sevo()
    state = opt.init(params)
    _, state = jax.jit(opt.update)(grads, state, params)
    is_graph = lambda x: isinstance(x, sj.GraphOperator)
    fingerprints = [x.fingerprint for x in jax.tree.leaves(state, is_leaf=is_graph) if is_graph(x)]
    assert fingerprints == [sj.as_normalized_graph(A).fingerprint]
    stripped = jax.tree.map(lambda x: None if is_graph(x) else x, state, is_leaf=is_graph)
    assert sum(x.size for x in jax.tree.leaves(stripped)) == 1 + 2 * (N * D + D * 2)
    template = opt.init(params)
    restored = jax.tree.map(lambda t, s: t if is_graph(t) else s, template, stripped,
                            is_leaf=lambda x: is_graph(x) or x is None)
    equal(jax.jit(opt.update)(grads, restored, params)[0], jax.jit(opt.update)(grads, state, params)[0])


# ---- idioms found wrong or unclear in the sixteenth session's review -------------------------


def test_float_only_reset_is_a_fresh_init():
    """Zeroing the float leaves alone (moments reset, counts and the int32 tag kept) zeroes the
    graph's weights too: they are repaired, and with repair=False the update is NaN, not psi
    with Ã = 0 (which had been a silent plain scaling of the update)."""
    params, grads = make_params(), make_grads()
    floats_zeroed = lambda tree: jax.tree.map(
        lambda x: jnp.zeros_like(x) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)
    opt = sevo()
    state = opt.init(params)
    _, state = jax.jit(opt.update)(grads, state, params)
    u, repaired = jax.jit(opt.update)(grads, floats_zeroed(state), params)
    is_graph = lambda x: isinstance(x, sj.GraphOperator)
    graph_kept = jax.tree.map(lambda z, s: s if is_graph(s) else z, floats_zeroed(state), state,
                              is_leaf=is_graph)  # the same reset, the graph left alone
    equal(u, jax.jit(opt.update)(grads, graph_kept, params)[0])
    assert bool(repaired[1].graph.is_intact())
    trusting = sj.sevo_smooth(A, mask=MASK, repair=False)
    broken, _ = jax.jit(trusting.update)(grads, floats_zeroed(trusting.init(params)))
    assert np.isnan(np.asarray(broken["emb"])).all()


def test_float_only_reset_of_a_sharded_graph_is_repaired():
    graph = sj.shard_graph(A, jax.make_mesh((1,), ("x",)), "x")
    zeroed = jax.tree.map(
        lambda x: jnp.zeros_like(x) if jnp.issubdtype(x.dtype, jnp.floating) else x, graph)
    assert bool(graph.is_intact()) and not bool(zeroed.is_intact())
    fixed = jax.jit(lambda g: g.repaired())(zeroed)
    assert bool(fixed.is_intact())
    equal(fixed.weights, graph.weights)


def test_bfloat16_params_under_inject_hyperparams():
    """Optax casts injected floats to the params' dtype: beta arrives as bfloat16 (accepted,
    was a TypeError), and so does b2 = 0.999, which rounds to 1 (every update was NaN: now
    refused, naming hyperparam_dtype); with hyperparam_dtype=float32 the update equals the
    uninjected one."""
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), make_params())
    grads = jax.tree.map(lambda x: x.astype(jnp.bfloat16), make_grads())
    injected = optax.inject_hyperparams(sj.sevo_adamw)(LR, A, 0.9, 3, mask=MASK)
    with pytest.raises(ValueError, match="b2 rounded to bfloat16: .* hyperparam_dtype"):
        injected.init(params)
    injected = optax.inject_hyperparams(sj.sevo_adamw)(LR, A, 0.9, 3, b2=0.99, mask=MASK)
    u, state = jax.jit(injected.update)(grads, injected.init(params), params)
    assert state.hyperparams["beta"].dtype == jnp.bfloat16 and u["emb"].dtype == jnp.bfloat16
    assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(u))
    exact = optax.inject_hyperparams(sj.sevo_adamw, hyperparam_dtype=jnp.float32)(
        LR, A, 0.9, 3, mask=MASK)
    for x, y in zip(jax.tree.leaves(first_update(exact, params, grads)), jax.tree.leaves(
            first_update(sj.sevo_adamw(LR, A, 0.9, 3, mask=MASK), params, grads)), strict=True):
        # Optax's float32 learning rate promotes the update to float32: equal to bf16 rounding
        np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32),
                                   rtol=2 ** -7)
    sj.sevo_smooth(A, beta=jnp.bfloat16(0.5), num_layers=1)  # a bfloat16 scalar is a float


def test_injected_momentum_of_sevo_sgd():
    params, grads = make_params(), make_grads()
    injected = optax.inject_hyperparams(sj.sevo_sgd)(LR, A, 0.5, 1, momentum=0.9, mask=MASK)
    state = injected.init(params)
    step = jax.jit(injected.update)
    plain = sj.sevo_sgd(LR, A, 0.5, 1, momentum=0.9, mask=MASK)
    plain_state = plain.init(params)
    for seed in range(2):  # the second step shows the momentum
        u, state = step(make_grads(seed), state, params)
        ref, plain_state = jax.jit(plain.update)(make_grads(seed), plain_state, params)
        close(u, ref)
    assert not np.allclose(np.asarray(u["w"]), -LR * np.asarray(make_grads(1)["w"]))
    del grads


def test_complex_leaves_take_the_squared_magnitude():
    g = {"c": jnp.array([0.5 + 2j, -1 + 0.3j], jnp.complex64)}
    ours = sj.scale_by_adam_corrected(mask={"c": False})
    np.testing.assert_allclose(ours.update(g, ours.init(g))[0]["c"], optax.scale_by_adam().update(
        g, optax.scale_by_adam().init(g))[0]["c"], rtol=1e-6)


def test_a_table_with_no_rows():
    """A user table of 0 rows stacked before an item table (the graph has the items only)."""
    items = jnp.asarray(np.random.default_rng(0).standard_normal((N, D)), jnp.float32)
    params = {"a_users": jnp.zeros((0, D)), "b_items": items}
    opt = sj.sevo_adamw(LR, A, 0.5, 2)
    u, _ = jax.jit(opt.update)(params, opt.init(params), params)
    assert u["a_users"].shape == (0, D)
    ref = sj.sevo_adamw(LR, A, 0.5, 2)
    close(u["b_items"], first_update(ref, {"b_items": items}, {"b_items": items})["b_items"])


def test_callable_mask_under_inject_hyperparams_names_static_args():
    params = {"item_embedding": jnp.ones((N, D)), "w": jnp.ones((D, 2))}
    select = sj.select_tables("item_embedding")
    with pytest.raises(TypeError, match="static_args"):
        optax.inject_hyperparams(sj.sevo_adamw)(LR, A, mask=select).init(params)
    with pytest.raises(TypeError, match="static_args"):  # any other callable: one bool
        optax.inject_hyperparams(sj.sevo_adamw)(
            LR, A, mask=lambda p: jax.tree.map(lambda x: x.ndim == 2 and x.shape[0] == N, p)).init(params)
    ok = optax.inject_hyperparams(sj.sevo_adamw, static_args=("mask",))(LR, A, mask=select)
    grads = jax.tree.map(jnp.ones_like, params)
    close(first_update(ok, params, grads), first_update(sj.sevo_adamw(LR, A, mask=select), params,
                                                        grads))  # traced beta: float32 rounding


@pytest.mark.parametrize("make", [
    lambda **kw: sj.sevo_adamw(LR, A, **kw), lambda **kw: sj.sevo_adam(LR, A, **kw),
    lambda **kw: sj.sevo_sgd(LR, A, **kw), lambda **kw: sj.adamw_corrected(LR, **kw)],
    ids=["sevo_adamw", "sevo_adam", "sevo_sgd", "adamw_corrected"])
def test_a_callable_decay_mask_under_inject_hyperparams_is_refused_not_ignored(make):
    """inject_hyperparams calls a callable decay_mask with the step count, which returns one
    bool: before, that silently decayed no leaf (or every leaf). Now a one-line TypeError."""
    params = {"emb": jnp.ones((N, D)), "w": jnp.ones((D, 2))}
    matrices = lambda p: jax.tree.map(lambda x: x.ndim > 1, p)  # noqa: E731
    with pytest.raises(TypeError, match=r"decay_mask is one bool \(False\).*static_args"):
        optax.inject_hyperparams(lambda decay_mask: make(mask=MASK, decay_mask=decay_mask))(
            decay_mask=matrices).init(params)
    for lone in (True, np.bool_(False), jnp.array(True)):
        with pytest.raises(TypeError, match="decay_mask is one bool"):
            make(mask=MASK, decay_mask=lone)
    grads = jax.tree.map(jnp.ones_like, params)
    named = optax.inject_hyperparams(lambda decay_mask: make(mask=MASK, decay_mask=decay_mask),
                                     static_args=("decay_mask",))(decay_mask=matrices)
    close(first_update(named, params, grads),
          first_update(make(mask=MASK, decay_mask=matrices), params, grads))


def test_a_lone_bool_mask_is_refused():
    params = {"emb": jnp.ones((N, D))}
    for make in (lambda m: sj.sevo_smooth(A, mask=m), lambda m: sj.scale_by_adam_corrected(mask=m),
                 lambda m: sj.adamw_corrected(LR, mask=m)):
        with pytest.raises(TypeError, match=r"mask is one bool \(True\)"):
            make(True).init(params)
        make({"emb": True}).init(params)
