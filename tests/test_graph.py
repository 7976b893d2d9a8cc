"""Graph builders against naive loops written from spec §1."""

import numpy as np
import pytest
import scipy.sparse as sp

import sevo_jax as sj
from sevo_jax.graph import validate_adjacency


def naive_cooccurrence(seqs, num_items, H, maxlen, num_pads):
    n = num_items + num_pads
    w = np.zeros((n, n))
    for s in seqs:
        s = list(s)[-maxlen:] if maxlen else list(s)
        for i in range(len(s)):
            for j in range(i + 1, min(i + H, len(s) - 1) + 1):
                h = j - i
                w[s[i] + num_pads, s[j] + num_pads] += 1 / h
                w[s[j] + num_pads, s[i] + num_pads] += 1 / h
    return w


@pytest.mark.parametrize("H,maxlen,num_pads", [(1, None, 1), (2, None, 1), (3, 4, 2), (1, 3, 0)])
def test_cooccurrence_matches_naive_loop(H, maxlen, num_pads):
    rng = np.random.default_rng(H)
    seqs = [rng.integers(0, 7, rng.integers(1, 9)) for _ in range(30)] + [[3, 3, 1]]
    got = sj.cooccurrence_graph(seqs, 7, H=H, maxlen=maxlen, num_pads=num_pads).toarray()
    np.testing.assert_allclose(got, naive_cooccurrence(seqs, 7, H, maxlen, num_pads))


def test_cooccurrence_repeated_item_adds_two_over_h_to_diagonal():
    a = sj.cooccurrence_graph([[2, 2]], 3, H=1).toarray()
    assert a[3, 3] == 2.0 and a[0].sum() == 0.0


def test_user_item_graph_layout():
    a = sj.user_item_graph([0, 0, 1, 1], [2, 2, 0, 1], num_users=2, num_items=3, num_pads=1).toarray()
    assert a.shape == (6, 6)
    assert a[0, 2 + 1 + 2] == 1.0 and a[1, 2 + 1 + 0] == 1.0 and a[1, 2 + 1 + 1] == 1.0
    assert (a == a.T).all() and a[2].sum() == 0.0 and a.max() == 1.0


def test_category_graph():
    cats = np.array([[0, 0], [1, 0], [1, 1], [0, 1], [1, 1]])
    a = sj.category_graph(cats).toarray()
    assert np.diag(a).sum() == 0 and a[0].sum() == 0
    assert a[2, 4] == 2.0 and a[1, 3] == 0.0 and a[1, 2] == 1.0
    assert sj.category_graph(cats, weighted=False).max() == 1.0


def test_category_graph_counts_memberships_not_stored_entries():
    import scipy.sparse as sp

    zero = sp.csr_matrix(([1.0, 0.0, 1.0], ([0, 1, 2], [0, 0, 0])), shape=(3, 1))  # a stored 0
    np.testing.assert_array_equal(sj.category_graph(zero).toarray(),
                                  [[0, 0, 1], [0, 0, 0], [1, 0, 0]])
    twice = sp.csr_matrix(([1.0, 1.0, 1.0], [0, 0, 0], [0, 2, 3]), shape=(2, 1))  # listed twice
    assert sj.category_graph(twice)[0, 1] == 1.0
    before = zero.data.copy()
    sj.category_graph(zero)
    np.testing.assert_array_equal(zero.data, before)  # the caller's matrix is not touched
    with pytest.raises(ValueError, match="NaN or inf"):
        sj.category_graph(np.array([[1.0], [np.nan]]))
    with pytest.raises(ValueError, match="0/1 incidence matrix .* got the value 2"):
        sj.category_graph(np.array([[2], [3], [2]]))  # category ids, not an incidence matrix
    np.testing.assert_array_equal(sj.category_graph(np.array([[True], [False], [True]])).toarray(),
                                  [[0, 0, 1], [0, 0, 0], [1, 0, 0]])


def test_edge_list_graph():
    a = sj.edge_list_graph([0, 1, 2], [1, 2, 2], 4, weights=[1.0, 2.0, 0.5]).toarray()
    assert a[0, 1] == a[1, 0] == 1.0 and a[1, 2] == 2.0 and a[2, 2] == 1.0 and a[3].sum() == 0


def test_normalize_handles_isolated_nodes():
    a = sj.edge_list_graph([0], [1], 3)
    an = sj.normalize(a).toarray()
    assert np.isfinite(an).all() and an[2].sum() == 0 and np.isclose(an[0, 1], 1.0)


@pytest.mark.parametrize(
    "call,needle",
    [
        (lambda: sj.cooccurrence_graph([[0, 5]], 3), "sequences"),
        (lambda: sj.cooccurrence_graph([[0, 1]], 3, H=0), "H"),
        (lambda: sj.cooccurrence_graph([[0.5, 1.0]], 3), "sequences"),
        (lambda: sj.user_item_graph([0], [0, 1], 2, 2), "users and items"),
        (lambda: sj.user_item_graph([3], [0], 2, 2), "users"),
        (lambda: sj.edge_list_graph([0], [1], 2, weights=[-1.0]), "weights"),
        (lambda: sj.edge_list_graph([0], [4], 2), "dst"),
        (lambda: validate_adjacency(sp.csr_matrix(np.ones((2, 3)))), "square"),
        # sizes that were truncated (3.7 items: 4 nodes) or made nodes collide (num_pads=-1)
        (lambda: sj.user_item_graph([0], [0], 1, 2, num_pads=-1), "num_pads must be >= 0"),
        (lambda: sj.cooccurrence_graph([[0, 1]], 3.7), "num_items must be an integer"),
        (lambda: sj.edge_list_graph([0], [1], 2.5), "num_nodes must be an integer"),
        (lambda: sj.user_item_graph([0], [0], 1.5, 2), "num_users must be an integer"),
        (lambda: sj.cooccurrence_graph([[0, 1]], 3, maxlen=True), "maxlen"),
        (lambda: sj.cooccurrence_graph([0, 1, 2], 3), "a list of 1-D id sequences"),
    ],
)
def test_bad_builder_inputs(call, needle):
    with pytest.raises((ValueError, TypeError), match=needle):
        call()
