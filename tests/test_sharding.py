"""Row-sharded SEvo (sevo_jax.sharding) against the unsharded psi and optimizers.

The multi-device checks need 8 fake CPU devices, i.e. ``XLA_FLAGS`` set before jax is imported,
which other test files already did in this pytest process. So this file is also a script:
``python tests/test_sharding.py`` runs every check named in ``CHECKS`` in ONE fresh process
with 8 devices and prints ``PASS name`` / ``FAIL name: ...``; the module-scoped fixture runs it
once and each test asserts on its own line. Cheap single-device checks run in-process.
"""

from __future__ import annotations

import sys

import pytest

from tests import helpers
from tests.helpers import NUM_DEVICES

# --------------------------------------------------------------------------------------------
# Checks run in the 8-device subprocess (they import jax lazily).
# --------------------------------------------------------------------------------------------


def _setup():
    import jax
    import numpy as np
    import scipy.sparse as sp

    jax.config.update("jax_enable_x64", False)
    assert jax.device_count() == NUM_DEVICES, jax.devices()

    def graph(n, seed=0, density=0.3, isolated=(0,)):
        rng = np.random.default_rng(seed)
        a = rng.random((n, n)) * (rng.random((n, n)) < density)
        a = np.triu(a, 1)
        a = a + a.T
        for i in isolated:
            a[i, :] = a[:, i] = 0.0
        return sp.csr_matrix(a)

    return jax, np, graph


def _mesh(kind="explicit", shape=(NUM_DEVICES,), names=("x",)):
    import jax
    from jax.sharding import AxisType

    axis_type = AxisType.Explicit if kind == "explicit" else AxisType.Auto
    return jax.make_mesh(shape, names, axis_types=(axis_type,) * len(shape))


def _close(got, ref, tol=2e-6, msg=""):
    import numpy as np

    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=tol, atol=tol, err_msg=msg)


def _psi_jit(beta, num_layers, approx, impl=None):
    import jax

    import sevo_jax as sj

    return jax.jit(lambda g, x: sj.propagate(g, x, beta, num_layers, approx, impl=impl))


def _row_sharded(x, mesh, axis="x"):
    from jax.sharding import NamedSharding, PartitionSpec

    return x.sharding.is_equivalent_to(NamedSharding(mesh, PartitionSpec(axis, None)), x.ndim)


def check_psi_every_approx():
    """propagate_sharded == propagate for every approx, several beta/L, both local impls."""
    jax, np, graph = _setup()
    import jax.numpy as jnp

    import sevo_jax as sj
    from sevo_jax import operator_sharded as osh

    mesh = _mesh()
    n = 24  # n not dividing 8: check_uneven_no_leak
    a = graph(n, seed=n)
    ng = sj.as_normalized_graph(a)
    g = osh.shard_graph(a, mesh, "x")
    x = jnp.asarray(np.random.default_rng(n).standard_normal((n, 3)), jnp.float32)
    cases = [("segment_sum", 0.9, 3), ("segment_sum", 0.99, 2), ("segment_sum", 0.5, 0)]
    cases += [("bcoo", 0.9, 3), ("chunked", 0.9, 3), ("chunked", 0.99, 2)]
    # on CPU every device holds blocked_coo's blocks of its edges, as NormalizedGraph does
    assert g.host.blocked is not None and g.indices.shape[2] == 1 + sj.operator.MATMUL_BLOCK
    sj.operator.MATMUL_CHUNK = 5  # several chunks per device even on this small graph
    for approx in sj.APPROXIMATIONS:
        for impl, beta, num_layers in cases:
            got = _psi_jit(beta, num_layers, approx, impl)(g, x)
            ref = sj.propagate(ng, x, beta, num_layers, approx)
            _close(got, ref, msg=f"{impl=} {approx=} {beta=} {num_layers=}")


def check_devices_without_edges():
    """Devices whose rows have no edges (and a graph whose edges all sit on one device) give
    the unsharded product, for the blocked layout and the COO products that read it."""
    jax, np, graph = _setup()
    import jax.numpy as jnp

    import sevo_jax as sj
    from sevo_jax import operator_sharded as osh

    mesh = _mesh()
    n = 40  # five rows per device
    one_device = np.zeros((n, n))
    one_device[10, 11] = one_device[11, 10] = 2.0
    one_device[12, 10] = one_device[10, 12] = 1.0
    for a in (graph(n, seed=3, isolated=range(5, 15)), one_device):
        g = osh.shard_graph(a, mesh, "x")
        x = jnp.asarray(np.random.default_rng(4).standard_normal((n, 16)), jnp.float32)
        ref = sj.as_normalized_graph(a).matmul(x, impl="segment_sum")
        for impl in ("chunked", "segment_sum", "bcoo"):
            _close(jax.jit(lambda g, x, impl=impl: g.matmul(x, impl))(g, x), ref,
                   msg=f"{impl=}")


def check_update_is_row_sharded():
    """The jitted sevo_smooth update leaves a row-sharded table row-sharded (both axis types)."""
    jax, np, graph = _setup()
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    import sevo_jax as sj
    from sevo_jax import operator_sharded as osh
    from sevo_jax import sharding as sh

    n = 32
    a = graph(n)
    for kind in ("explicit", "auto"):
        mesh = _mesh(kind)
        rows = sh.row_sharding(mesh, "x")
        table = np.random.default_rng(1).standard_normal((n, 4))
        table = jax.device_put(jnp.asarray(table, jnp.float32), rows)
        params = {"emb": table, "bias": jnp.ones((3,))}
        opt = sj.sevo_smooth(a, 0.9, 3, mask={"emb": True, "bias": False}, mesh=mesh, axis_name="x")
        state = opt.init(params)
        assert isinstance(state.graph, osh.ShardedGraph), state
        graph_sharding = NamedSharding(mesh, PartitionSpec("x"))
        assert state.graph.weights.sharding.is_equivalent_to(graph_sharding, 2)
        out, _ = jax.jit(opt.update)(params, state)
        assert _row_sharded(out["emb"], mesh), (kind, out["emb"].sharding)
        ref = sj.propagate(sj.as_normalized_graph(a), jax.device_get(table), 0.9, 3)
        np.testing.assert_allclose(np.asarray(out["emb"]), np.asarray(ref), rtol=2e-6, atol=2e-6)
        np.testing.assert_array_equal(np.asarray(out["bias"]), np.ones(3))


def check_uneven_no_leak():
    """n = 13 and 1001 (not multiples of 8): equal to unsharded, no NaN leaking via padding."""
    jax, np, graph = _setup()
    import jax.numpy as jnp

    import sevo_jax as sj
    from sevo_jax import operator_sharded as osh

    mesh = _mesh("auto")
    for n, density in ((13, 0.4), (1001, 0.01)):
        a = graph(n, seed=3, density=density, isolated=(0, n - 1))
        ng = sj.as_normalized_graph(a)
        g = osh.shard_graph(a, mesh, "x")
        x = np.random.default_rng(2).standard_normal((n, 5)).astype(np.float32)
        # node 0 is isolated and sits at gathered position 0, the column every padding edge
        # reads: a non-finite value there must stay in its own row
        x[0] = np.nan
        sj.operator.MATMUL_CHUNK = 3
        for impl in sj.operator.MATMUL_IMPLS:
            for approx in sj.APPROXIMATIONS:
                got = np.asarray(_psi_jit(0.95, 3, approx, impl)(g, x))
                assert got.shape == (n, 5)
                ref = np.asarray(sj.propagate(ng, jnp.asarray(x), 0.95, 3, approx))
                assert np.isnan(got[0]).all() and np.isfinite(got[1:]).all(), (n, impl, approx)
                _close(got[1:], ref[1:], msg=f"{n=} {impl=} {approx=}")


def check_joint_tables():
    """users + items smoothed jointly, sharded; both come back row-sharded when they divide 8."""
    jax, np, graph = _setup()
    import jax.numpy as jnp

    import sevo_jax as sj
    from sevo_jax import sharding as sh

    for n_users, n_items, kind in ((16, 24, "explicit"), (16, 24, "auto"), (11, 21, "explicit")):
        n = n_users + n_items
        a = graph(n, seed=5)
        mesh = _mesh(kind)
        rng = np.random.default_rng(0)
        params = {"a_users": jnp.asarray(rng.standard_normal((n_users, 4)), jnp.float32),
                  "b_items": jnp.asarray(rng.standard_normal((n_items, 4)), jnp.float32),
                  "dense": jnp.asarray(rng.standard_normal((2, 2)), jnp.float32)}
        mask = {"a_users": True, "b_items": True, "dense": False}
        divisible = n_users % NUM_DEVICES == 0 and n_items % NUM_DEVICES == 0
        if divisible:
            rows = sh.row_sharding(mesh, "x")
            params = {k: jax.device_put(v, rows) if mask[k] else v for k, v in params.items()}
        sharded = sj.sevo_smooth(a, 0.99, 3, mask=mask, mesh=mesh, axis_name="x")
        plain = sj.sevo_smooth(a, 0.99, 3, mask=mask)
        state = sharded.init(params)
        assert state.graph.segments == (n_users, n_items)
        got, _ = jax.jit(sharded.update)(params, state)
        ref, _ = plain.update(jax.device_get(params), plain.init(jax.device_get(params)))
        for k in params:
            _close(got[k], ref[k], msg=k)
        if divisible:
            assert _row_sharded(got["a_users"], mesh) and _row_sharded(got["b_items"], mesh), kind


def check_adamw_ten_steps():
    """sevo_adamw sharded over 10 steps == unsharded; params stay row-sharded."""
    jax, np, graph = _setup()
    import jax.numpy as jnp
    import optax

    import sevo_jax as sj
    from sevo_jax import sharding as sh

    n_users, n_items = 8, 24
    a = graph(n_users + n_items, seed=7)
    mesh = _mesh()
    rows = sh.row_sharding(mesh, "x")
    rng = np.random.default_rng(3)
    host = {"users": rng.standard_normal((n_users, 6)).astype(np.float32),
            "items": rng.standard_normal((n_items, 6)).astype(np.float32),
            "w": rng.standard_normal((6, 2)).astype(np.float32)}
    mask = {"users": True, "items": True, "w": False}
    grads = []
    for _ in range(10):
        gr = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in host.items()}
        for k in ("users", "items"):
            gr[k][rng.random(gr[k].shape[0]) < 0.4] = 0.0  # rows absent from the batch
        grads.append(gr)

    def run(opt, params, place):
        state = opt.init(params)

        @jax.jit
        def step(params, state, g):
            updates, state = opt.update(g, state, params)
            return optax.apply_updates(params, updates), state

        for g in grads:
            params, state = step(params, state, place(g))
        return params

    def placed(tree):
        return {k: jax.device_put(jnp.asarray(v), rows) if mask[k] else jnp.asarray(v)
                for k, v in tree.items()}

    def local(tree):
        return jax.tree.map(jnp.asarray, tree)

    kw = dict(beta=0.99, num_layers=3, mask=mask, weight_decay=1e-2)
    got = run(sj.sevo_adamw(1e-2, a, mesh=mesh, axis_name="x", **kw), placed(host), placed)
    ref = run(sj.sevo_adamw(1e-2, a, **kw), local(host), local)
    for k in host:
        _close(got[k], ref[k], 1e-5, k)
    assert _row_sharded(got["users"], mesh) and _row_sharded(got["items"], mesh)
    # sevo_adam / sevo_sgd take the same keywords
    for make in (lambda **k: sj.sevo_adam(1e-2, a, mask=mask, **k),
                 lambda **k: sj.sevo_sgd(1e-2, a, mask=mask, momentum=0.9, **k)):
        got = run(make(mesh=mesh, axis_name="x"), placed(host), placed)
        ref = run(make(), local(host), local)
        for k in host:
            _close(got[k], ref[k], 1e-5, k)


def check_update_keeps_a_replicated_tables_layout():
    """Explicit mesh: a replicated table's update comes back replicated (not row-sharded), for
    row counts that divide the mesh and that do not (the padded path), with psi's values."""
    jax, np, graph = _setup()
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    import sevo_jax as sj

    mesh = _mesh("explicit")
    replicated = NamedSharding(mesh, PartitionSpec())
    for n in (32, 30):
        a = graph(n, seed=n)
        table = np.random.default_rng(2).standard_normal((n, 4)).astype(np.float32)
        x = jax.device_put(jnp.asarray(table), replicated)
        opt = sj.sevo_smooth(a, 0.9, 3, mesh=mesh, axis_name="x")
        out, _ = jax.jit(opt.update)(x, opt.init(x))
        assert out.sharding.is_equivalent_to(replicated, 2), (n, out.sharding)
        ref = sj.propagate(sj.as_normalized_graph(a), table, 0.9, 3)
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=2e-6, atol=2e-6)


def check_two_axis_mesh():
    """A (4, 2) mesh sharded on one of its axes (replicated over the other)."""
    jax, np, graph = _setup()
    import jax.numpy as jnp

    import sevo_jax as sj
    from sevo_jax import sharding as sh

    n = 20
    a = graph(n, seed=11)
    for kind in ("explicit", "auto"):
        mesh = _mesh(kind, shape=(4, 2), names=("data", "model"))
        for axis in ("data", "model"):
            x = jnp.asarray(np.random.default_rng(4).standard_normal((n, 3)), jnp.float32)
            x = jax.device_put(x, sh.row_sharding(mesh, axis))
            opt = sj.sevo_smooth(a, 0.9, 2, mesh=mesh, axis_name=axis)
            out, _ = jax.jit(opt.update)(x, opt.init(x))
            ref = sj.propagate(sj.as_normalized_graph(a), jax.device_get(x), 0.9, 2)
            np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=2e-6, atol=2e-6)
            assert _row_sharded(out, mesh, axis), (kind, axis, out.sharding)


def check_bad_axis_name():
    jax, np, graph = _setup()
    import jax.numpy as jnp

    import sevo_jax as sj

    a = graph(16)
    mesh = _mesh()
    for kw in ({"mesh": mesh}, {"mesh": mesh, "axis_name": "nope"}, {"axis_name": "x"}):
        for make in (lambda **k: sj.sevo_smooth(a, **k), lambda **k: sj.sevo_adamw(1e-3, a, **k)):
            try:
                make(**kw)
            except ValueError as e:
                assert "axis_name" in str(e), str(e)
            else:
                raise AssertionError(f"no ValueError for {kw}")
    # tables whose rows do not match the graph fail at init, naming the row counts
    opt = sj.sevo_smooth(a, mesh=mesh, axis_name="x")
    try:
        opt.init(jnp.zeros((15, 2)))
    except ValueError as e:
        assert "16 nodes" in str(e), str(e)
    else:
        raise AssertionError("no ValueError for 15 rows on a 16-node graph")


def check_state_survives_generic_tree_ops():
    """Sharded state: a zeros_like reset and a bfloat16 cast are repaired (each device
    re-uploads its own block), a donated state leaves init and other optimizers intact, and
    tree_map_params derives the moments' shardings."""
    jax, np, graph = _setup()
    import jax.numpy as jnp
    import optax

    import sevo_jax as sj
    from sevo_jax import sharding as sh

    n = 16
    a = graph(n, seed=11)
    mesh = _mesh("auto")
    rows = sh.row_sharding(mesh, "x")
    rng = np.random.default_rng(4)
    params = {"emb": jax.device_put(jnp.asarray(rng.standard_normal((n, 3)), jnp.float32), rows),
              "w": jnp.ones((2,))}
    grads = jax.tree.map(lambda p: 0.1 * p, params)
    mask = {"emb": True, "w": False}
    opt = sj.sevo_adamw(1e-2, a, mask=mask, mesh=mesh, axis_name="x")
    step = jax.jit(opt.update)
    fresh_update, _ = step(grads, opt.init(params), params)
    state = opt.init(params)
    for _ in range(2):
        _, state = step(grads, state, params)
    reset = jax.tree.map(jnp.zeros_like, state)
    assert not bool(reset[1].graph.is_intact())
    u, repaired = step(grads, reset, params)
    _close(u["emb"], fresh_update["emb"], 0)
    assert bool(repaired[1].graph.is_intact())
    smooth = sj.sevo_smooth(a, mask=mask, mesh=mesh, axis_name="x")
    ref, _ = smooth.update(grads, smooth.init(params))
    cast = optax.tree.cast(smooth.init(params), jnp.bfloat16)
    got, fixed = jax.jit(smooth.update)(grads, cast)
    _close(got["emb"], ref["emb"], 0)
    assert fixed.graph.indices.dtype == jnp.int32 and bool(fixed.graph.is_intact())
    donated = jax.jit(opt.update, donate_argnums=1)
    s = opt.init(params)
    for _ in range(2):
        _, s = donated(grads, s, params)
    other = sj.sevo_adamw(1e-2, a, mask=mask, mesh=mesh, axis_name="x")
    u1, _ = step(grads, opt.init(params), params)
    u2, _ = jax.jit(other.update)(grads, other.init(params), params)
    _close(u1["emb"], fresh_update["emb"], 0)
    _close(u2["emb"], fresh_update["emb"], 0)
    # jax.jit(init): each device's block through a callback (no constant); same state
    jitted = jax.jit(opt.init)(params)
    for x, y in zip(jax.tree.leaves(jitted), jax.tree.leaves(opt.init(params)), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert jitted[1].graph.weights.sharding.spec == state[1].graph.weights.sharding.spec
    # inject_hyperparams: a beta schedule reaches the shard_map as an operand (a Mesh is
    # callable, so Optax would take it for a schedule: it goes in static_args)
    sched = optax.linear_schedule(0.0, 0.9, 3)
    inj = optax.inject_hyperparams(sj.sevo_smooth, static_args=("mesh",))(
        a, beta=sched, mask=mask, mesh=mesh, axis_name="x")
    s = inj.init(params)
    for t in range(3):
        u, s = jax.jit(inj.update)(grads, s)
        ref = sj.propagate(sj.as_normalized_graph(a), grads["emb"], float(sched(t)), 3)
        _close(u["emb"], ref, 2e-6, f"step {t}")
    plan = sh.MeshPlan(mesh, lambda p: mask)
    shardings = plan.state_shardings(state, params, opt)
    assert shardings[0].mu["emb"] == rows and shardings[0].count == plan.replicated
    assert shardings[1].graph.weights.spec == state[1].graph.weights.sharding.spec


CHECKS = helpers.collect_checks(globals())


@pytest.fixture(scope="module")
def sharded_run():
    return helpers.run_checks(__file__, CHECKS)


@pytest.mark.parametrize("name", list(CHECKS))
def test_sharded(sharded_run, name):
    helpers.assert_check_passed(sharded_run, name)


# Single-device, in-process checks.


def test_pad_rows():
    from sevo_jax.sharding import pad_rows

    assert [pad_rows(n, 8) for n in (0, 1, 8, 13, 16, 1001)] == [0, 8, 8, 16, 16, 1008]
    with pytest.raises(ValueError):
        pad_rows(3, 0)


def test_pad_adjacency_keeps_psi_on_real_rows():
    import jax.numpy as jnp
    import numpy as np
    import scipy.sparse as sp

    import sevo_jax as sj
    from sevo_jax.sharding import pad_adjacency

    rng = np.random.default_rng(0)
    a = rng.random((9, 9)) * (rng.random((9, 9)) < 0.5)
    a = sp.csr_matrix(np.triu(a, 1) + np.triu(a, 1).T)
    padded = pad_adjacency(a, [4, 5], 4)  # users 4 -> 4, items 5 -> 8
    assert padded.shape == (12, 12)
    real = np.r_[0:4, 4:9]
    np.testing.assert_array_equal(padded.toarray()[np.ix_(real, real)], a.toarray())
    assert padded.toarray()[9:].sum() == 0 and padded.toarray()[:, 9:].sum() == 0
    x = rng.standard_normal((9, 3)).astype(np.float32)
    xp = np.zeros((12, 3), np.float32)
    xp[real] = x
    got = sj.propagate(sj.as_normalized_graph(padded), jnp.asarray(xp), 0.9, 3)
    ref = sj.propagate(sj.as_normalized_graph(a), jnp.asarray(x), 0.9, 3)
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(ref), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(got)[9:], 0.0)


def test_one_device_mesh_in_process():
    """The sharded path on whatever devices this process has (a 1-device mesh)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import sevo_jax as sj
    from sevo_jax import operator_sharded as osh

    rng = np.random.default_rng(1)
    a = rng.random((10, 10)) * (rng.random((10, 10)) < 0.4)
    a = np.triu(a, 1) + np.triu(a, 1).T
    explicit = (jax.sharding.AxisType.Explicit,)
    mesh = jax.make_mesh((1,), ("x",), axis_types=explicit, devices=jax.devices()[:1])
    params = {"u": jnp.asarray(rng.standard_normal((4, 3)), jnp.float32),
              "i": jnp.asarray(rng.standard_normal((6, 3)), jnp.float32)}
    opt = sj.sevo_adamw(1e-2, a, mesh=mesh, axis_name="x")
    ref_opt = sj.sevo_adamw(1e-2, a)
    state, ref_state = opt.init(params), ref_opt.init(params)
    assert isinstance(state[1].graph, osh.ShardedGraph)
    g = jax.tree.map(lambda p: jnp.ones_like(p) * 0.3, params)
    upd, _ = jax.jit(opt.update)(g, state, params)
    ref, _ = ref_opt.update(g, ref_state, params)
    for k in params:
        np.testing.assert_allclose(np.asarray(upd[k]), np.asarray(ref[k]), rtol=1e-6, atol=1e-7)


def _graph_on_one_device(seed, n, density):
    """``(rng, a, mesh)``: a random symmetric ``n``-node graph and a 1-device mesh."""
    import jax
    import numpy as np

    rng = np.random.default_rng(seed)
    dense = rng.random((n, n)) * (rng.random((n, n)) < density)
    mesh = jax.make_mesh((1,), ("x",), devices=jax.devices()[:1],
                         axis_types=(jax.sharding.AxisType.Explicit,))
    return rng, np.triu(dense, 1) + np.triu(dense, 1).T, mesh


def test_sharded_factory_normalises_and_blocks_once_per_adjacency(monkeypatch):
    """optax.inject_hyperparams runs the factory at every update: the host graph and its layout
    are built once for the adjacency (again after an in-place edit), not at every call."""
    import jax.numpy as jnp
    import numpy as np
    import optax
    import scipy.sparse as sp

    import sevo_jax as sj
    from sevo_jax import transform

    calls = {"normalized_scipy": 0, "shard_normalized": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    for name in calls:
        monkeypatch.setattr(transform, name, counted(name, getattr(transform, name)))
    rng, a, mesh = _graph_on_one_device(2, 8, 0.5)
    a = sp.csr_matrix(a)
    inj = optax.inject_hyperparams(sj.sevo_smooth, static_args=("mesh",))(
        a, beta=0.5, num_layers=2, mesh=mesh, axis_name="x")
    x = jnp.asarray(rng.standard_normal((8, 3)), jnp.float32)
    state = inj.init(x)
    for _ in range(3):
        upd, state = inj.update(x, state)
    assert calls == {"normalized_scipy": 1, "shard_normalized": 1}
    np.testing.assert_allclose(np.asarray(upd), np.asarray(
        sj.propagate(sj.as_normalized_graph(a), x, 0.5, 2)), rtol=1e-6, atol=1e-7)
    a.data[:] = 1.0 + a.data ** 2  # edited in place: built again
    state = inj.init(x)
    upd, _ = inj.update(x, state)
    assert calls == {"normalized_scipy": 2, "shard_normalized": 2}
    np.testing.assert_allclose(np.asarray(upd), np.asarray(
        sj.propagate(sj.as_normalized_graph(a.copy()), x, 0.5, 2)), rtol=1e-6, atol=1e-7)


def test_eager_sharded_updates_compile_the_repair_once():
    """Un-jitted updates: the repair's shard_map is compiled once per layout, not per call
    (it was traced again at every update: 1.5 s each at Beauty's size), and still repairs."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import sevo_jax as sj
    from sevo_jax import operator_sharded as osh

    rng, a, mesh = _graph_on_one_device(3, 9, 0.5)
    tx = sj.sevo_smooth(a, beta=0.5, num_layers=2, mesh=mesh, axis_name="x")
    x = jnp.asarray(rng.standard_normal((9, 2)), jnp.float32)
    state = tx.update(x, tx.init(x))[1]  # a state from init, then one from an update
    state = tx.update(x, state)[1]
    compiled = osh._repaired_blocks._cache_size()
    for _ in range(3):
        upd, state = tx.update(x, state)
    assert osh._repaired_blocks._cache_size() == compiled
    ref = np.asarray(sj.propagate(sj.as_normalized_graph(a), x, 0.5, 2))
    np.testing.assert_allclose(np.asarray(upd), ref, rtol=1e-6, atol=1e-7)
    zeroed = jax.tree.map(jnp.zeros_like, state)  # a reset: repaired from the host, eagerly
    np.testing.assert_allclose(np.asarray(tx.update(x, zeroed)[0]), ref, rtol=1e-6, atol=1e-7)


def test_a_jitted_sharded_update_compiles_once_from_the_init_state():
    """init's graph leaves carry the layout jit gives its outputs, spelled the same way:
    ``P('x')`` against ``P('x', None)`` compiled a user's jitted update a second time."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import sevo_jax as sj

    rng, a, mesh = _graph_on_one_device(4, 12, 0.4)
    tx = sj.sevo_smooth(a, beta=0.5, num_layers=2, mesh=mesh, axis_name="x")
    x = jnp.asarray(rng.standard_normal((12, 3)), jnp.float32)
    step, state = jax.jit(tx.update), tx.init(x)
    for _ in range(3):
        upd, state = step(x, state)
    assert step._cache_size() == 1
    np.testing.assert_allclose(np.asarray(upd), np.asarray(
        sj.propagate(sj.as_normalized_graph(a), x, 0.5, 2)), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("table_spec", [("x", None), ()])
def test_psi_keeps_a_placed_tables_layout_and_compiles_as_plain_adamw(table_spec):
    """On an explicit mesh psi's result gets its table's layout back: a replicated table's
    update was returned row-sharded, and the jitted step compiled once more than AdamW's."""
    import jax
    import jax.numpy as jnp
    import optax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import sevo_jax as sj

    rng, a, mesh = _graph_on_one_device(5, 40, 0.2)
    params = {"emb": jax.device_put(jnp.asarray(rng.standard_normal((40, 4)), jnp.float32),
                                    NamedSharding(mesh, P(*table_spec))),
              "w": jax.device_put(jnp.ones((4, 2)), NamedSharding(mesh, P()))}
    mask = {"emb": True, "w": False}
    compiles, updates = [], []
    for tx in (sj.sevo_adamw(1e-2, a, mask=mask, mesh=mesh, axis_name="x"), optax.adamw(1e-2)):
        def step(p, s, tx=tx):
            u, s = tx.update(p, s, p)
            return optax.apply_updates(p, u), s, u

        jitted, p, s = jax.jit(step), params, tx.init(params)
        for _ in range(4):
            p, s, u = jitted(p, s)
        compiles.append(jitted._cache_size())
        updates.append(u)
    assert compiles[0] == compiles[1]
    assert jax.typeof(updates[0]["emb"]).sharding.spec == jax.typeof(params["emb"]).sharding.spec


def test_a_sharded_state_of_another_graph_is_refused():
    """As unsharded: a state built on another graph of the same size was smoothed with the
    state's graph, silently."""
    import jax
    import jax.numpy as jnp

    import sevo_jax as sj

    rng, a, mesh = _graph_on_one_device(6, 10, 0.4)
    other = a.copy()
    other[0, 1] = other[1, 0] = other[0, 1] + 1.0
    x = jnp.asarray(rng.standard_normal((10, 2)), jnp.float32)
    for repair in (True, False):
        tx = sj.sevo_smooth(a, mesh=mesh, axis_name="x", repair=repair)
        stranger = sj.sevo_smooth(other, mesh=mesh, axis_name="x", repair=repair).init(x)
        with pytest.raises(ValueError, match="the state holds another graph"):
            jax.jit(tx.update)(x, stranger)
        same = sj.sevo_smooth(a.copy(), mesh=mesh, axis_name="x", repair=repair).init(x)
        jax.jit(tx.update)(x, same)


def test_prebuilt_sharded_graph_and_serialization():
    """A ShardedGraph may be passed as the adjacency; the state round-trips through flax."""
    import flax.serialization
    import jax
    import jax.numpy as jnp
    import numpy as np

    import sevo_jax as sj
    from sevo_jax import operator_sharded as osh

    rng = np.random.default_rng(2)
    a = rng.random((7, 7)) * (rng.random((7, 7)) < 0.5)
    a = np.triu(a, 1) + np.triu(a, 1).T
    mesh = jax.make_mesh((1,), ("x",), devices=jax.devices()[:1])
    g = osh.shard_graph(sj.as_normalized_graph(a), mesh, "x", segments=(3, 4))
    assert g.num_nodes == 7 and g.nnz == int((a != 0).sum())
    params = (jnp.asarray(rng.standard_normal((3, 2)), jnp.float32),
              jnp.asarray(rng.standard_normal((4, 2)), jnp.float32))
    opt = sj.sevo_smooth(g, 0.9, 2)
    state = opt.init(params)
    assert state.graph.fingerprint == g.fingerprint and state.graph.weights is not g.weights
    out, _ = opt.update(params, state)
    ref, _ = sj.sevo_smooth(a, 0.9, 2).update(params, sj.sevo_smooth(a, 0.9, 2).init(params))
    for o, r in zip(out, ref):
        np.testing.assert_allclose(np.asarray(o), np.asarray(r), rtol=1e-6, atol=1e-7)
    # the checkpoint carries the graph's fingerprint only; restoring keeps the template's arrays
    assert flax.serialization.to_state_dict(state)["graph"] == {"fingerprint": g.fingerprint}
    restored = flax.serialization.from_state_dict(state, flax.serialization.to_state_dict(state))
    np.testing.assert_array_equal(np.asarray(restored.graph.weights), np.asarray(g.weights))
    with pytest.raises(ValueError, match="built for tables"):
        opt.init((params[1], params[0]))


def test_errors_in_process():
    import jax
    import numpy as np

    import sevo_jax as sj
    from sevo_jax import operator_sharded as osh

    a = np.ones((4, 4)) - np.eye(4)
    mesh = jax.make_mesh((1,), ("x",), devices=jax.devices()[:1])
    with pytest.raises(ValueError, match="axis_name"):
        sj.sevo_smooth(a, mesh=mesh)
    with pytest.raises(ValueError, match="axis_name"):
        sj.sevo_sgd(0.1, a, mesh=mesh, axis_name="y")
    with pytest.raises(ValueError, match="axis_name"):
        sj.sevo_adam(0.1, a, axis_name="x")
    with pytest.raises(TypeError, match="Mesh"):
        sj.sevo_smooth(a, mesh="x", axis_name="x")
    with pytest.raises(ValueError, match="segments"):
        osh.shard_graph(a, mesh, "x", segments=(2, 3))


if __name__ == "__main__":
    helpers.script_main(CHECKS, sys.argv[1:])
