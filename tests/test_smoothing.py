"""psi and sevo_smooth: spec §2 properties, exactness against the oracle, and bad inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.experimental import sparse as jsparse

import sevo_jax as sj
import sevo_jax.operator
from tests import oracle

jax.config.update("jax_enable_x64", False)


def random_graph(rng, n, density=0.4, isolated=True):
    a = rng.random((n, n)) * (rng.random((n, n)) < density)
    a = np.triu(a) + np.triu(a, 1).T
    if isolated and n > 2:
        a[0, :] = a[:, 0] = 0.0
    return a


@st.composite
def graph_and_signal(draw):
    n = draw(st.integers(2, 14))
    d = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    a = random_graph(rng, n, density=draw(st.floats(0.1, 0.9)), isolated=draw(st.booleans()))
    x = rng.standard_normal((n, d))
    return a, x


def psi_np(a, x, beta, num_layers, approx):
    g = sj.as_normalized_graph(a)
    return np.asarray(sj.propagate(g, jnp.asarray(x, jnp.float32), beta, num_layers, approx), np.float64)


@settings(max_examples=60, deadline=None)
@given(graph_and_signal(), st.floats(0.0, 0.995), st.integers(0, 6),
       st.sampled_from(sj.APPROXIMATIONS))
def test_matches_oracle(gx, beta, num_layers, approx):
    a, x = gx
    expected = oracle.psi(x, oracle.normalize(a), beta, num_layers, approx)
    np.testing.assert_allclose(psi_np(a, x, beta, num_layers, approx), expected, rtol=1e-4, atol=1e-5)


@settings(max_examples=60, deadline=None)
@given(graph_and_signal(), st.floats(0.0, 0.995), st.integers(0, 6),
       st.sampled_from(sj.APPROXIMATIONS))
def test_smoothness_never_increases(gx, beta, num_layers, approx):
    a, x = gx
    j_before = float(sj.smoothness(jnp.asarray(x, jnp.float32), a))
    j_after = float(sj.smoothness(psi_np(a, x, beta, num_layers, approx).astype(np.float32), a))
    assert j_after <= j_before + 1e-4 * max(1.0, abs(j_before))


@settings(max_examples=60, deadline=None)
@given(graph_and_signal(), st.floats(0.0, 0.99), st.integers(0, 6), st.sampled_from(["neumann", "nsa"]))
def test_direction_aware(gx, beta, num_layers, approx):
    a, x = gx
    assert float(np.sum(psi_np(a, x, beta, num_layers, approx) * x)) > 0.0


def test_iterative_is_not_direction_aware_for_large_beta():
    """Theorem 1: on a bipartite graph the iterative form can reverse an alternating signal."""
    a = np.array([[0.0, 1.0], [1.0, 0.0]])
    x = np.array([[1.0], [-1.0]])
    assert float(np.sum(psi_np(a, x, 0.99, 3, "iterative") * x)) < 0.0
    assert float(np.sum(psi_np(a, x, 0.99, 3, "neumann") * x)) > 0.0


def test_neumann_tends_to_closed_form():
    rng = np.random.default_rng(0)
    a = random_graph(rng, 12)
    x = rng.standard_normal((12, 3))
    target = oracle.psi_star(x, oracle.normalize(a), 0.9)
    errors = [np.abs(psi_np(a, x, 0.9, L, "neumann") - target).max() for L in (1, 5, 20, 80, 200)]
    assert all(e2 <= e1 + 1e-6 for e1, e2 in zip(errors, errors[1:]))
    assert errors[-1] < 1e-4
    assert errors[0] > 10 * errors[-1]


@pytest.mark.parametrize("beta,num_layers", [(0.0, 3), (0.7, 0), (0.0, 0)])
def test_identity_cases(beta, num_layers):
    rng = np.random.default_rng(0)
    a = random_graph(rng, 8)
    x = rng.standard_normal((8, 3)).astype(np.float32)
    np.testing.assert_allclose(psi_np(a, x, beta, num_layers, "neumann"), x, rtol=1e-6, atol=1e-7)


def test_joint_smoothing_equals_concatenation():
    rng = np.random.default_rng(0)
    a = random_graph(rng, 10)
    users, items = rng.standard_normal((4, 3)), rng.standard_normal((6, 3))
    tx = sj.sevo_smooth(a, 0.9, 3, mask={"a_users": True, "b_items": True, "w": False})
    updates = {"a_users": jnp.asarray(users, jnp.float32), "b_items": jnp.asarray(items, jnp.float32),
               "w": jnp.ones(3)}
    out, _ = jax.jit(tx.update)(updates, tx.init(updates))
    joint = psi_np(a, np.concatenate([users, items]), 0.9, 3, "neumann")
    np.testing.assert_allclose(out["a_users"], joint[:4], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["b_items"], joint[4:], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out["w"], updates["w"])


@pytest.mark.parametrize("kind", ["scipy", "dense", "bcoo", "normalized"])
def test_adjacency_input_types_agree(kind):
    rng = np.random.default_rng(0)
    a = random_graph(rng, 7)
    x = rng.standard_normal((7, 2))
    given = {
        "scipy": sp.csr_matrix(a),
        "dense": a,
        "bcoo": jsparse.BCOO.fromdense(jnp.asarray(a)),
        "normalized": sj.as_normalized_graph(sp.csr_matrix(a)),
    }[kind]
    got = np.asarray(sj.propagate(sj.as_normalized_graph(given), jnp.asarray(x, jnp.float32)))
    np.testing.assert_allclose(got, oracle.psi(x, oracle.normalize(a), 0.99, 3, "neumann"),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", sj.operator.MATMUL_IMPLS)
def test_matmul_implementations_agree(impl):
    rng = np.random.default_rng(0)
    a = random_graph(rng, 9)
    g = sj.as_normalized_graph(a)
    x = rng.standard_normal((9, 4)).astype(np.float32)
    np.testing.assert_allclose(g.matmul(jnp.asarray(x), impl=impl), oracle.normalize(a) @ x,
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk", [1, 5, 7, 64, 10_000])
def test_chunked_matmul_any_chunk_size(chunk):
    """Several chunks, a ragged last chunk, one chunk: all equal the dense product."""
    rng = np.random.default_rng(chunk)
    a = random_graph(rng, 12)
    g = sj.as_normalized_graph(a)
    x = rng.standard_normal((12, 3)).astype(np.float32)
    idx, w = jnp.asarray(g.host.indices), jnp.asarray(g.host.weights)  # the plain COO
    got = sj.operator.sparse_matmul(idx, w, jnp.asarray(x), 12, "chunked", chunk)
    np.testing.assert_allclose(got, oracle.normalize(a) @ x, rtol=1e-5, atol=1e-6)


def power_law_coo(rng, n=300, hub_degree=250):
    """Row-sorted COO of a symmetric graph with a hub row, many degree-1 rows and isolated rows."""
    a = sp.lil_matrix((n, n))
    for i in range(1, n):  # degree ~ 1 / rank: a long tail of rows with one or two entries
        for j in rng.integers(0, n, size=max(1, int(40 / i))):
            a[i, j] = a[j, i] = rng.random() + 0.1
    hub = rng.choice(np.arange(1, n), size=hub_degree, replace=False)
    a[5, hub] = 1.0
    a[hub, 5] = 1.0
    a[0, :] = a[:, 0] = 0.0  # an isolated row, like the padding item
    a = sp.csr_matrix(a, dtype=np.float32)
    a.sort_indices()
    c = a.tocoo()
    return a, jnp.asarray(np.stack([c.row, c.col], 1).astype(np.int32)), jnp.asarray(c.data)


@pytest.mark.parametrize("d", [1, 16, 32, 48, 64, 128])
def test_chunked_matmul_power_law_every_width(d):
    """Blocks of the chunked product: a 250-entry hub row, degree-1 rows, an isolated row and
    several chunks give scipy's float64 product to float32 precision at narrow and wide d."""
    rng = np.random.default_rng(d)
    a, idx, w = power_law_coo(rng)
    x = rng.standard_normal((a.shape[0], d)).astype(np.float32)
    want = a.astype(np.float64) @ x.astype(np.float64)
    for chunk in (64, None):
        got = np.asarray(jax.jit(lambda i, v, y, c=chunk: sj.operator.sparse_matmul(
            i, v, y, a.shape[0], "chunked", c))(idx, w, jnp.asarray(x)))
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6 * np.abs(want).max())
        assert np.all(got[0] == 0)


@pytest.mark.parametrize("n,hub", [(60, 40), (300, 250), (5000, 30)])
def test_blocked_coo_is_the_same_matrix_in_whole_blocks(n, hub):
    """Host-side blocks (once per graph): the same matrix, every block in one row, a power of
    two (or a multiple of MAX_CHUNK_BLOCKS) of them; the chunked product reading them equals
    scipy's at every chunk size and width, inf in x included, and so do the other products
    (which read them as a COO)."""
    rng = np.random.default_rng(n)
    a, idx, w = power_law_coo(rng, n=n, hub_degree=hub)
    blocks, bw, used = sj.operator.blocked_coo(np.asarray(idx), np.asarray(w), n)
    block = sj.operator.MATMUL_BLOCK
    total = blocks.shape[0]
    assert blocks.shape == (total, 1 + block) and blocks.dtype == np.int32
    assert bw.shape == (total * block,) and used <= total
    assert total & (total - 1) == 0 or total % sj.operator.MAX_CHUNK_BLOCKS == 0
    assert (np.diff(blocks[:, 0]) >= 0).all()  # still row-sorted
    bi = np.asarray(sj.operator.blocks_as_coo(jnp.asarray(blocks)))
    np.testing.assert_array_equal(bi[:, 0], np.repeat(blocks[:, 0], block))  # a block, a row
    np.testing.assert_array_equal(bi[:, 1], blocks[:, 1:].ravel())
    same = sp.csr_matrix((bw, (bi[:, 0], bi[:, 1])), shape=(n, n))
    assert abs(same - a).max() == 0
    x = rng.standard_normal((n, 16)).astype(np.float32)
    x[int(blocks[-1, -1])] = np.inf  # the column the padding repeats
    touched = np.asarray((a != 0)[:, int(blocks[-1, -1])].todense()).ravel()
    x0 = np.where(np.isfinite(x), x, 0.0)
    want = a.astype(np.float64) @ x0
    cases = [(16, 8, "chunked"), (16, 100, "chunked"), (16, None, "chunked"),
             (3, None, "chunked"), (128, 64, "chunked"), (16, None, "segment_sum")]
    for d, chunk, impl in cases:
        y = x[:, :d]
        got = np.asarray(sj.operator.sparse_matmul(jnp.asarray(blocks), jnp.asarray(bw),
                                                   jnp.asarray(y), n, impl, chunk,
                                                   blocked=(block, used)))
        assert not np.isfinite(got[touched]).any()
        np.testing.assert_allclose(got[~touched], want[~touched, :d], rtol=2e-6,
                                   atol=2e-6 * np.abs(want).max())


def test_normalized_graph_on_cpu_holds_blocks():
    rng = np.random.default_rng(3)
    a = random_graph(rng, 40)
    g = sj.as_normalized_graph(a)
    block = sj.operator.MATMUL_BLOCK
    assert g.host.blocked is not None and g.weights.shape[0] % block == 0
    assert g.indices.shape == (g.weights.shape[0] // block, 1 + block)
    assert g.nnz == sp.csr_matrix(a).nnz
    np.testing.assert_allclose(g.to_scipy().toarray(), oracle.normalize(a), rtol=1e-6)
    x = rng.standard_normal((40, 5)).astype(np.float32)
    for impl in sj.operator.MATMUL_IMPLS:  # every product reads the blocked leaves
        np.testing.assert_allclose(g.matmul(jnp.asarray(x), impl=impl), oracle.normalize(a) @ x,
                                   rtol=1e-5, atol=1e-6)

def test_sparse_matmul_refuses_a_layout_it_would_misread():
    """Blocks read as a COO (or a COO as blocks) would give wrong sums: a one-line error."""
    rng = np.random.default_rng(5)
    g = sj.as_normalized_graph(random_graph(rng, 30))
    x = jnp.ones((30, 4))
    block = sj.operator.MATMUL_BLOCK
    with pytest.raises(ValueError, match=rf"blocked_coo's blocks: pass blocked=\({block}, "):
        sj.operator.sparse_matmul(g.indices, g.weights, x, 30, "chunked")
    coo, w = jnp.asarray(g.host.indices), jnp.asarray(g.host.weights)
    with pytest.raises(ValueError, match="needs blocked_coo's blocks"):
        sj.operator.sparse_matmul(coo, w, x, 30, "chunked", blocked=g.host.blocked)
    with pytest.raises(ValueError, match=r"a COO needs indices of shape \(nnz, 2\)"):
        sj.operator.sparse_matmul(coo, w[:-1], x, 30, "segment_sum")
    np.testing.assert_allclose(  # the right pairings agree
        sj.operator.sparse_matmul(g.indices, g.weights, x, 30, blocked=g.host.blocked),
        sj.operator.sparse_matmul(coo, w, x, 30), rtol=1e-6)


def test_chunked_matmul_drops_out_of_range_rows():
    """Entries with row >= num_rows (sharding's padding, sorted last) change nothing."""
    rng = np.random.default_rng(1)
    a, idx, w = power_law_coo(rng, n=60, hub_degree=40)
    pad = jnp.array([[60, 3], [60, 7], [61, 0]], jnp.int32)
    idx2 = jnp.concatenate([idx, pad])
    w2 = jnp.concatenate([w, jnp.array([5.0, 0.0, 2.0])])
    x = rng.standard_normal((60, 16)).astype(np.float32)
    got = sj.operator.sparse_matmul(idx2, w2, jnp.asarray(x), 60, "chunked", 32)
    np.testing.assert_allclose(got, a.astype(np.float64) @ x, rtol=2e-6, atol=1e-5)


def test_chunked_matmul_non_finite_row_stays_local():
    """A non-finite row of x reaches only the rows that have its column (padding slots never
    carry it elsewhere); isolated rows stay exactly zero."""
    rng = np.random.default_rng(2)
    a, idx, w = power_law_coo(rng, n=80, hub_degree=60)
    x = rng.standard_normal((80, 16)).astype(np.float32)
    x[7] = np.inf
    got = np.asarray(sj.operator.sparse_matmul(idx, w, jnp.asarray(x), 80, "chunked", 32))
    touched = np.asarray(a[:, 7].todense()).ravel() != 0
    assert not np.isfinite(got[touched]).any()
    finite = ~touched
    x0 = np.where(np.isfinite(x), x, 0.0)
    np.testing.assert_allclose(got[finite], (a.astype(np.float64) @ x0)[finite], rtol=2e-6,
                               atol=1e-5)
    assert np.all(got[0] == 0)


def test_row_gather_and_scatter_match_numpy_indexing():
    """take_rows / add_rows equal x[rows] and out.at[rows].add for rows in range (repeats
    included); add_rows drops rows past the end, take_rows clamps them; neither program
    carries jax.numpy's negative-index wrap (its select sat in psi's hot loop)."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((50, 16)).astype(np.float32)
    rows = rng.integers(0, 50, 300).astype(np.int32)
    np.testing.assert_array_equal(sj.operator.take_rows(jnp.asarray(x), jnp.asarray(rows)),
                                  x[rows])
    np.testing.assert_array_equal(sj.operator.take_rows(jnp.asarray(x), jnp.array([49, 50, 99])),
                                  x[[49, 49, 49]])
    sorted_rows = np.sort(np.concatenate([rows, [50, 50, 70]])).astype(np.int32)
    upd = rng.standard_normal((sorted_rows.size, 16)).astype(np.float32)
    want = np.zeros((50, 16), np.float64)
    np.add.at(want, sorted_rows[sorted_rows < 50], upd[sorted_rows < 50].astype(np.float64))
    got = sj.operator.add_rows(jnp.zeros((50, 16)), jnp.asarray(sorted_rows), jnp.asarray(upd))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    for f, args in ((sj.operator.take_rows, (x, rows)),
                    (sj.operator.add_rows, (np.zeros((50, 16), np.float32), sorted_rows, upd))):
        hlo = jax.jit(f).lower(*args).as_text()
        assert "compare" not in hlo and "select" not in hlo, f.__name__


@pytest.mark.parametrize("kind", ["csr", "coo", "lil", "dok", "dense"])
def test_an_adjacency_edited_in_place_is_normalised_anew(kind):
    """The cache by identity must not hand back the graph of the matrix before an edit."""
    rng = np.random.default_rng(0)
    dense = random_graph(rng, 6, isolated=False)
    a = {"csr": sp.csr_matrix, "coo": sp.coo_matrix, "lil": sp.lil_matrix, "dok": sp.dok_matrix,
         "dense": np.array}[kind](dense)
    first = sj.as_normalized_graph(a)
    assert sj.as_normalized_graph(a) is first  # unchanged: the cached operator
    if kind == "dense":
        a[:] = 1.0 + a ** 2 * (a > 0)  # a complete graph now, still symmetric
    elif kind in ("lil", "dok"):
        a[0, 1] = a[1, 0] = 7.0
    else:
        a.data[:] = 1.0 + a.data ** 2  # entrywise, so still symmetric
    edited = sj.as_normalized_graph(a)
    assert edited is not first
    fresh = sj.as_normalized_graph(sp.csr_matrix(a).copy())
    np.testing.assert_allclose(edited.to_scipy().toarray(), fresh.to_scipy().toarray(), rtol=1e-6)
    assert not np.allclose(edited.to_scipy().toarray(), first.to_scipy().toarray())
    tx = sj.sevo_smooth(a, beta=0.5, num_layers=1)
    x = jnp.asarray(rng.standard_normal((6, 2)), jnp.float32)
    np.testing.assert_allclose(tx.update(x, tx.init(x))[0], sj.propagate(fresh, x, 0.5, 1),
                               rtol=1e-6)


def test_matmul_needs_one_row_per_node():
    """A table of another row count is an error, not a clamped or truncated product."""
    g = sj.as_normalized_graph(np.ones((6, 6)) - np.eye(6))
    for shape in ((5, 2), (7, 2), (6,)):
        with pytest.raises(ValueError, match=r"shape \(num_nodes, d\) = \(6, d\)"):
            g.matmul(jnp.ones(shape))
    with pytest.raises(ValueError, match="one row per node"):
        g.apply(lambda mm, x: mm(x), [jnp.ones((2, 1)), jnp.ones((3, 1))])


def test_matmul_unknown_impl():
    g = sj.as_normalized_graph(random_graph(np.random.default_rng(0), 5))
    with pytest.raises(ValueError, match="impl must be one of"):
        g.matmul(jnp.ones((5, 2)), impl="csr")


def test_smoothness_formula():
    rng = np.random.default_rng(0)
    a = random_graph(rng, 9, isolated=False)
    x = rng.standard_normal((9, 3))
    expected = oracle.smoothness(x, oracle.normalize(a))
    deg = a.sum(1)
    pairwise = 0.5 * sum(a[i, j] * np.sum((x[i] / np.sqrt(deg[i]) - x[j] / np.sqrt(deg[j])) ** 2)
                         for i in range(9) for j in range(9))
    assert np.isclose(expected, pairwise)
    assert np.isclose(float(sj.smoothness(jnp.asarray(x, jnp.float32), a)), expected, rtol=1e-4)


def test_isolated_nodes_give_finite_values():
    a = np.zeros((4, 4))
    a[1, 2] = a[2, 1] = 1.0
    x = jnp.ones((4, 2))
    out = sj.propagate(sj.as_normalized_graph(a), x)
    assert np.isfinite(np.asarray(out)).all()


# ---- bad inputs: each raises with a message naming the argument -------------------------------

GOOD = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 2.0], [0.0, 2.0, 0.0]])


def bad(matrix_patch):
    a = GOOD.copy()
    matrix_patch(a)
    return a


@pytest.mark.parametrize(
    "kwargs,error,needle",
    [
        (dict(adjacency=np.ones((3, 4))), ValueError, "adjacency"),
        (dict(adjacency=bad(lambda a: a.__setitem__((0, 1), 5.0))), ValueError, "symmetric"),
        (dict(adjacency=bad(lambda a: (a.__setitem__((0, 1), -1.0), a.__setitem__((1, 0), -1.0)))),
         ValueError, "negative"),
        (dict(adjacency=bad(lambda a: (a.__setitem__((0, 1), np.nan), a.__setitem__((1, 0), np.nan)))),
         ValueError, "NaN"),
        (dict(adjacency=bad(lambda a: (a.__setitem__((0, 1), np.inf), a.__setitem__((1, 0), np.inf)))),
         ValueError, "inf"),
        (dict(adjacency="graph.txt"), TypeError, "adjacency"),
        # asymmetry next to a heavy edge (the tolerance is per pair, not max |A|)
        (dict(adjacency=np.array([[0, 1.0, 0], [2.0, 0, 0], [0, 0, 1e7]])), ValueError,
         "symmetric"),
        (dict(adjacency=np.array([[0, 1 + 5j], [1 - 5j, 0]])), ValueError, "complex weights"),
        (dict(adjacency=np.array([[0, 1e308, 0], [1e308, 0, 1e308], [0, 1e308, 0]])),
         ValueError, "row sums .* overflow"),
        (dict(adjacency=GOOD, beta=1.0), ValueError, "beta"),
        (dict(adjacency=GOOD, beta=-0.1), ValueError, "beta"),
        (dict(adjacency=GOOD, beta=float("nan")), ValueError, "beta"),
        (dict(adjacency=GOOD, beta="0.9"), TypeError, "beta"),
        (dict(adjacency=GOOD, num_layers=-1), ValueError, "num_layers"),
        (dict(adjacency=GOOD, num_layers=2.5), TypeError, "num_layers"),
        (dict(adjacency=GOOD, num_layers=True), TypeError, "num_layers"),
        (dict(adjacency=GOOD, approx="chebyshev"), ValueError, "approx"),
    ],
)
def test_bad_construction_arguments(kwargs, error, needle):
    with pytest.raises(error, match=needle):
        sj.sevo_smooth(**kwargs)
    with pytest.raises(error, match=needle):
        sj.sevo_adamw(1e-3, **kwargs)


@pytest.mark.parametrize(
    "params,mask,needle",
    [
        ({"emb": jnp.ones((4, 2))}, None, "adjacency has 3 nodes but the masked tables stack to 4"),
        ({"emb": jnp.ones((3, 2)), "w": jnp.ones((2, 2))}, {"emb": False, "w": False}, "mask selects no"),
        ({"emb": jnp.ones((3,))}, None, "2-D"),
        ({"a": jnp.ones((1, 2)), "b": jnp.ones((2, 3))}, None, "width"),
        ({"emb": jnp.ones((3, 2))}, {"other": True}, "mask"),
    ],
)
def test_bad_params_or_mask_fail_at_init(params, mask, needle):
    for opt in (sj.sevo_smooth(GOOD, mask=mask), sj.sevo_adamw(1e-3, GOOD, mask=mask)):
        with pytest.raises(ValueError, match=needle):
            opt.init(params)


def test_update_also_checks_the_node_count():
    tx = sj.sevo_smooth(GOOD)
    state = tx.init({"emb": jnp.ones((3, 2))})
    with pytest.raises(ValueError, match="adjacency has 3 nodes"):
        jax.jit(tx.update)({"emb": jnp.ones((5, 2))}, state)


def test_a_state_of_another_graph_is_refused():
    """Two graphs of the same size: a state of one given to the other's update was smoothed
    with the state's graph, silently."""
    other = np.array([[0, 1, 1], [1, 0, 0], [1, 0, 0.0]])
    assert not np.array_equal(other, GOOD)
    params = {"emb": jnp.ones((3, 2))}
    for repair in (True, False):
        tx = sj.sevo_smooth(GOOD, repair=repair)
        with pytest.raises(ValueError, match="the state holds another graph"):
            jax.jit(tx.update)(params, sj.sevo_smooth(other, repair=repair).init(params))
        jax.jit(tx.update)(params, sj.sevo_smooth(GOOD.copy(), repair=repair).init(params))


def test_psi_refuses_tables_it_would_round_or_misread():
    g = sj.as_normalized_graph(GOOD)
    for table in (jnp.ones((3, 2), jnp.int32), jnp.ones((3, 2), bool)):
        with pytest.raises(TypeError, match="float or complex tables"):
            sj.propagate(g, table, 0.5, 2)
        tx = sj.sevo_smooth(GOOD)
        with pytest.raises(TypeError, match="float or complex tables"):
            tx.update({"emb": table}, tx.init({"emb": jnp.ones((3, 2))}))
    with pytest.raises(TypeError, match="needs a graph operator"):
        sj.propagate(GOOD, jnp.ones((3, 2)), 0.5, 2)
    with pytest.raises(ValueError, match="2-D tables"):
        sj.propagate(g, jnp.ones(3), 0.5, 2)
    with pytest.raises(ValueError, match="at least one table"):
        sj.propagate(g, [], 0.5, 2)
