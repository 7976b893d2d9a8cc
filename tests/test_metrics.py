"""Hand-computed checks of the full-ranking metrics."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sevo_jax.metrics import MetricAccumulator, ranking_metrics, target_ranks


def ranks_of(scores, targets, exclude=None):
    scores = jnp.asarray(scores, jnp.float32)
    targets = jnp.asarray(targets, jnp.int32)
    if exclude is not None:
        exclude = jnp.asarray(exclude, bool)
    return np.asarray(target_ranks(scores, targets, exclude)).tolist()


def test_strictly_ordered_scores():
    scores = [[0.0, 0.1, 0.9, 0.5, 0.3]] * 4
    assert ranks_of(scores, [2, 3, 4, 1]) == [0, 1, 2, 3]


def test_ties_are_pessimistic():
    scores = [[0.0, 1.0, 2.0, 2.0, 0.5]] * 3
    # Items 2 and 3 tie: each counts the other as ranked above it.
    assert ranks_of(scores, [2, 3, 1]) == [1, 1, 2]
    # A constant scorer ranks every target last among the 4 real items.
    assert ranks_of([[7.0] * 5] * 2, [1, 4]) == [3, 3]


def test_padding_column_never_counted():
    scores = [[100.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]]
    assert ranks_of(scores, [1, 1]) == [0, 0]


def test_excluding_higher_item_improves_rank():
    scores = [[0.0, 1.0, 3.0, 2.0, 0.5]]
    assert ranks_of(scores, [1]) == [2]
    assert ranks_of(scores, [1], [[False, False, True, False, False]]) == [1]
    assert ranks_of(scores, [1], [[False, False, True, True, False]]) == [0]
    # Excluding lower items changes nothing.
    assert ranks_of(scores, [1], [[False, False, False, False, True]]) == [2]


def test_target_in_exclude_set_is_still_ranked():
    scores = [[0.0, 1.0, 3.0, 2.0, 0.5]]
    exclude = [[True, True, True, False, False]]  # target 1, item 2 and padding
    assert ranks_of(scores, [1], exclude) == [1]  # only item 3 is above


def test_nan_scores_are_pessimistic():
    nan = float("nan")
    assert ranks_of([[0.0, nan, 1.0, 2.0]], [1]) == [2]
    assert ranks_of([[0.0, 1.0, nan, 0.5]], [1]) == [1]


def test_ranking_metrics_exact_values():
    ranks = jnp.array([0, 1, 4, 5, 9, 10])
    m = {k: np.asarray(v) for k, v in ranking_metrics(ranks).items()}
    assert set(m) == {"HR@1", "HR@5", "HR@10", "NDCG@5", "NDCG@10"}
    inv = lambda r: 1.0 / math.log2(r + 2)  # noqa: E731
    np.testing.assert_array_equal(m["HR@1"], [1, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(m["HR@5"], [1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(m["HR@10"], [1, 1, 1, 1, 1, 0])
    np.testing.assert_allclose(m["NDCG@5"], [1.0, inv(1), inv(4), 0, 0, 0], rtol=1e-6)
    np.testing.assert_allclose(
        m["NDCG@10"], [1.0, inv(1), inv(4), inv(5), inv(9), 0], rtol=1e-6
    )
    assert m["NDCG@5"][0] == 1.0
    np.testing.assert_allclose(m["NDCG@5"][1], 1.0 / np.log2(3.0), rtol=1e-6)


def test_k_larger_than_catalogue():
    # 3 real items: every rank is < 3, so HR@5 = HR@10 = 1.
    scores = jnp.array([[0.0, 0.2, 0.1, 0.3]] * 3)
    ranks = target_ranks(scores, jnp.array([3, 1, 2]))
    m = ranking_metrics(ranks)
    np.testing.assert_array_equal(np.asarray(ranks), [0, 1, 2])
    np.testing.assert_array_equal(np.asarray(m["HR@10"]), [1, 1, 1])
    np.testing.assert_array_equal(np.asarray(m["HR@5"]), [1, 1, 1])
    np.testing.assert_array_equal(np.asarray(m["HR@1"]), [1, 0, 0])
    np.testing.assert_allclose(np.asarray(m["NDCG@10"]), [1.0, 1 / np.log2(3), 0.5], rtol=1e-6)


def test_custom_ks():
    m = ranking_metrics(jnp.array([0, 2]), ks=(1, 3))
    assert set(m) == {"HR@1", "HR@3", "NDCG@3"}
    np.testing.assert_allclose(np.asarray(m["NDCG@3"]), [1.0, 0.5])


def test_jit_matches_eager():
    key_s, key_t, key_e = jax.random.split(jax.random.key(0), 3)
    scores = jax.random.normal(key_s, (8, 30)).round(1)  # rounding creates ties
    targets = jax.random.randint(key_t, (8,), 1, 30)
    exclude = jax.random.bernoulli(key_e, 0.3, (8, 30))

    def evaluate(s, t, e):
        return ranking_metrics(target_ranks(s, t, e))

    eager = evaluate(scores, targets, exclude)
    jitted = jax.jit(evaluate)(scores, targets, exclude)
    for name in eager:
        np.testing.assert_array_equal(np.asarray(eager[name]), np.asarray(jitted[name]))
    np.testing.assert_array_equal(
        target_ranks(scores, targets), jax.jit(target_ranks)(scores, targets)
    )


def test_ranks_match_numpy_reference():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, (16, 12)).astype(np.float32)  # many ties
    targets = rng.integers(1, 12, 16)
    exclude = rng.random((16, 12)) < 0.3
    expected = []
    for s, t, e in zip(scores, targets, exclude):
        others = [i for i in range(1, 12) if i != t and not e[i]]
        expected.append(sum(s[i] >= s[t] for i in others))
    assert ranks_of(scores, targets, exclude) == expected


def test_accumulator_means_over_batches():
    acc = MetricAccumulator()
    acc.update(ranking_metrics(jnp.array([0, 1])))
    acc.update(ranking_metrics(jnp.array([20])))
    out = acc.compute()
    assert acc.count == 3
    assert all(isinstance(v, float) for v in out.values())
    assert out["HR@1"] == pytest.approx(1 / 3)
    assert out["HR@10"] == pytest.approx(2 / 3)
    assert out["NDCG@10"] == pytest.approx((1.0 + 1.0 / math.log2(3)) / 3)


def test_accumulator_mask_and_reset():
    acc = MetricAccumulator()
    acc.update({"HR@1": jnp.array([1.0, 0.0, 1.0])}, mask=jnp.array([True, True, False]))
    assert acc.compute() == {"HR@1": pytest.approx(0.5)}
    acc.reset()
    assert acc.compute() == {}
    assert acc.count == 0


def test_accumulator_refuses_batches_it_would_average_wrongly():
    acc = MetricAccumulator()
    acc.update({"HR@1": np.ones(3), "NDCG@5": np.ones(3)})
    with pytest.raises(ValueError, match="one batch size"):
        acc.update({"HR@1": np.ones(3), "NDCG@5": np.ones(5)})  # was: NDCG@5 = 1.67
    with pytest.raises(ValueError, match="mask has shape"):
        acc.update({"HR@1": np.ones(3), "NDCG@5": np.ones(3)}, mask=np.ones(1, bool))
    with pytest.raises(ValueError, match="one batch size"):
        acc.update({"HR@1": np.ones((3, 1)), "NDCG@5": np.ones((3, 1))})
    with pytest.raises(ValueError, match="differ from the earlier batches"):
        acc.update({"HR@1": np.ones(3)})
    assert acc.compute() == {"HR@1": 1.0, "NDCG@5": 1.0}


@pytest.mark.parametrize("scores, targets, exclude, needle", [
    (np.zeros((2, 5)), np.array([1, 2, 3]), None, "needs scores"),
    (np.zeros(5), np.array([1]), None, "needs scores"),
    (np.zeros((2, 5)), np.array([1.0, 2.0]), None, "must be integer item ids"),
    (np.zeros((2, 5)), np.array([1, 2]), np.zeros((2, 4), bool), "shape of scores"),
])
def test_target_ranks_refuses_mismatched_inputs(scores, targets, exclude, needle):
    with pytest.raises((ValueError, TypeError), match=needle):
        target_ranks(jnp.asarray(scores), jnp.asarray(targets),
                     None if exclude is None else jnp.asarray(exclude))


@pytest.mark.parametrize("ks", [(), (0, 5), (True,), (2.5,), (-1,)])
def test_ranking_metrics_refuses_bad_ks(ks):
    with pytest.raises(ValueError, match="ks must be positive integers"):
        ranking_metrics(jnp.array([0, 3]), ks)
