"""select_tables / sevo_mask pick the same tables in Linen params, NNX state and plain dicts."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.sparse as sp
from flax import nnx

import sevo_jax
from sevo_jax import models
from sevo_jax.masks import path_names, select_tables


def old_sevo_mask(params, tables=models.SEVO_TABLES):
    """The Linen-only sevo_mask before sevo_jax.masks existed (the behaviour to keep)."""

    def name(entry):
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                return str(getattr(entry, attr))
        return str(entry)

    def is_table(path, _leaf):
        names = [name(e) for e in path]
        return bool(names) and names[-1] == "embedding" and any(n in tables for n in names[:-1])

    return jax.tree_util.tree_map_with_path(is_table, params)


def linen_params():
    seqs = jnp.zeros((1, 6), jnp.int32)
    key = jax.random.PRNGKey(0)
    return {
        "sasrec": models.SASRec(9, maxlen=6, features=4).init(key, seqs, deterministic=True),
        "gru4rec": models.GRU4Rec(9, features=4).init(key, seqs, deterministic=True),
        "mfbpr": models.MFBPR(5, 9, features=4).init(key, jnp.zeros((1,), jnp.int32)),
    }


@pytest.mark.parametrize("model", ["sasrec", "gru4rec", "mfbpr"])
def test_sevo_mask_keeps_its_linen_behaviour(model):
    variables = linen_params()[model]
    for tree in (variables, variables["params"]):
        got = models.sevo_mask(tree)
        assert got == old_sevo_mask(tree)
    flat = jax.tree_util.tree_flatten_with_path(models.sevo_mask(variables["params"]))[0]
    selected = sorted("/".join(path_names(p)) for p, m in flat if m)
    want = {"sasrec": ["item_embedding/embedding"], "gru4rec": ["item_embedding/embedding"],
            "mfbpr": ["table_0_users/embedding", "table_1_items/embedding"]}[model]
    assert selected == want


class TwoTables(nnx.Module):
    def __init__(self, rngs):
        self.item_embedding = nnx.Embed(6, 3, rngs=rngs)
        self.position_embedding = nnx.Embed(4, 3, rngs=rngs)
        self.blocks = nnx.List([nnx.Linear(3, 3, rngs=rngs)])

    def __call__(self, items):
        x = self.item_embedding(items) + self.position_embedding(jnp.arange(items.shape[-1]))
        return (self.blocks[0](x) ** 2).sum()


def selected(mask_tree):
    flat = jax.tree_util.tree_flatten_with_path(mask_tree)[0]
    return sorted("/".join(path_names(p)) for p, m in flat if m)


def test_nnx_state_with_and_without_variables_and_plain_dicts_agree():
    model = TwoTables(nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)        # what nnx.Optimizer passes to tx.init
    pure = nnx.as_pure(state)                  # what it passes to tx.update
    plain = nnx.to_pure_dict(state)            # a plain nested dict
    paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
    assert all(p[-1] == jax.tree_util.GetAttrKey("value") for p in paths)  # the case to handle
    for select, want in [
        (models.sevo_mask, ["item_embedding/embedding"]),
        (select_tables("item_embedding"), ["item_embedding/embedding"]),
        (select_tables("*_embedding/embedding"),
         ["item_embedding/embedding", "position_embedding/embedding"]),
        (select_tables("blocks/0/kernel", "position_embedding"),
         ["blocks/0/kernel", "position_embedding/embedding"]),
    ]:
        for tree in (state, pure, plain):
            mask = select(tree)
            assert jax.tree.structure(mask) == jax.tree.structure(tree)
            assert selected(mask) == want


def test_paths_match_whole_components_only():
    params = {"my_item_embedding": {"embedding": 1}, "item_embedding": {"embedding": 2},
              "x": {"item_embedding_norm": 3}}
    assert selected(select_tables("item_embedding")(params)) == ["item_embedding/embedding"]
    assert selected(select_tables("item_embedding/embedding")(params)) == [
        "item_embedding/embedding"]
    assert selected(select_tables("*item_embedding/embedding")(params)) == [
        "item_embedding/embedding", "my_item_embedding/embedding"]
    assert selected(select_tables("nothing")(params)) == []


@pytest.mark.parametrize("bad", [(), ("",), ("/",), (3,)])
def test_bad_patterns_fail_clearly(bad):
    with pytest.raises(ValueError, match="select_tables"):
        select_tables(*bad)


def test_optax_masked_takes_the_selection():
    params = {"item_embedding": {"embedding": jnp.ones((3, 2))}, "dense": {"kernel": jnp.ones(2)}}
    tx = optax.masked(optax.scale(-1.0), select_tables("item_embedding"))
    updates, _ = tx.update(params, tx.init(params))
    np.testing.assert_array_equal(updates["item_embedding"]["embedding"], -np.ones((3, 2)))
    np.testing.assert_array_equal(updates["dense"]["kernel"], np.ones(2))
    # the same through nnx.Optimizer (tx.init sees Variable nodes); optax.masked passes the
    # unselected leaves' gradients through unchanged
    model = TwoTables(nnx.Rngs(0))
    before = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    optimizer = nnx.Optimizer(model, optax.masked(optax.sgd(1.0), select_tables("item_embedding")),
                              wrt=nnx.Param)
    grads = nnx.grad(lambda m: m(jnp.array([[1, 2, 5, 0]])))(model)
    optimizer.update(model, grads)
    after, g = nnx.to_pure_dict(nnx.state(model, nnx.Param)), nnx.to_pure_dict(grads)
    table = ("item_embedding", "embedding")
    np.testing.assert_allclose(after[table[0]][table[1]],
                               before[table[0]][table[1]] - g[table[0]][table[1]], rtol=1e-6)
    np.testing.assert_allclose(after["blocks"][0]["kernel"],
                               before["blocks"][0]["kernel"] + g["blocks"][0]["kernel"], rtol=1e-6)


def test_nnx_optimizer_step_equals_the_same_step_on_plain_arrays():
    """nnx.Optimizer + sevo_adamw(mask=sevo_mask) smooths the item table exactly as on a dict."""
    rng = np.random.default_rng(0)
    adjacency = sp.csr_matrix((rng.random((6, 6)) < 0.4).astype(float))
    adjacency = ((adjacency + adjacency.T) > 0).astype(float)
    tx = sevo_jax.sevo_adamw(1e-2, adjacency, beta=0.9, weight_decay=0.0, mask=models.sevo_mask)
    model = TwoTables(nnx.Rngs(0))
    before = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    items = jnp.array([[1, 2, 5, 0]])
    grads = nnx.grad(lambda m: m(items))(model)
    optimizer.update(model, grads)
    got = nnx.to_pure_dict(nnx.state(model, nnx.Param))

    plain_grads = nnx.to_pure_dict(grads)
    updates, _ = tx.update(plain_grads, tx.init(before), before)
    want = optax.apply_updates(before, updates)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), got, want)
    # no decay: the smoothed table moves in rows the gradient never touched (via the graph)
    moved = np.abs(got["item_embedding"]["embedding"] - before["item_embedding"]["embedding"])
    plain_adam = optax.adamw(1e-2, weight_decay=0.0)
    adam_updates, _ = plain_adam.update(plain_grads, plain_adam.init(before), before)
    adam_moved = np.abs(adam_updates["item_embedding"]["embedding"])
    assert (moved.sum(1) > 0).sum() > (adam_moved.sum(1) > 0).sum()
