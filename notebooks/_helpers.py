"""Small helpers shared by the sevo_jax notebooks (not part of the library).

* ``data_dir()`` finds ``shared/data`` beside the repository (or ``$SEVO_DATA``).
* ``small_config()`` is the tiny SASRec setting the notebooks use (d=32, 1 block, maxlen 50).
* ``Runner`` trains one model shape under many optimizers while compiling the model's
  forward/backward pass and the full-ranking scorer only once. It follows ``training.fit``
  exactly (same init, shuffles, negatives and dropout keys for a given seed); only the optimizer
  step is jitted separately, so a new optimizer costs a second of compilation, not ten.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sevo_jax import data as data_lib
from sevo_jax import training

__all__ = ["data_dir", "load_ml100k", "small_config", "Runner", "probe", "rayleigh", "curve"]


def data_dir() -> Path:
    """``shared/data`` beside the repository: ``$SEVO_DATA``, else the first ``shared/data``
    found in the working directory or one of its parents (notebooks run with cwd=notebooks/,
    so it is ``../../shared/data`` from there)."""
    if os.environ.get("SEVO_DATA"):
        return Path(os.environ["SEVO_DATA"]).resolve()
    here = Path.cwd().resolve()
    for base in (here, *here.parents):
        candidate = base / "shared" / "data"
        if (candidate / "ml-100k").is_dir():
            return candidate
    raise FileNotFoundError(
        f"no shared/data/ml-100k found in {here} or its parents; set SEVO_DATA to the data folder"
    )


def load_ml100k() -> data_lib.SequenceDataset:
    """MovieLens-100K (943 users, 1682 movies, 19 genres), leave-one-out split."""
    return data_lib.load_movielens(data_dir() / "ml-100k")


def small_config(**overrides) -> training.TrainConfig:
    """The notebooks' tiny SASRec on ML-100K: d=32, 1 block, maxlen 50, batch 64, AdamW
    hyper-parameters of the paper (lr 1e-3, betas (0.9, 0.98), wd 0.1), SEvo beta 0.99, L 3."""
    base = dict(model="sasrec", format="movielens", data=str(data_dir() / "ml-100k"),
                features=32, num_blocks=1, maxlen=50, batch_size=64, epochs=10,
                eval_every=1, patience=None, progress=False)
    base.update(overrides)
    return training.TrainConfig(**base).resolved()


def rayleigh(j: jax.Array, x: jax.Array) -> jax.Array:
    """``J(X) / ||X||_F^2``: the smoothness normalised by the signal's energy, in [0, 2]."""
    return j / jnp.maximum(jnp.sum(jnp.square(x.astype(jnp.float32))), 1e-30)


def probe(graph: Any, select: Callable[[Any], jax.Array], keep: bool = False
          ) -> optax.GradientTransformation:
    """An identity transform that records J and J/||X||^2 of the update it sees.

    Put it anywhere in an ``optax.chain``; after each step its state holds ``j`` and ``rq`` of
    the table ``select(updates)`` at that point of the chain (and, with ``keep=True``, the
    table itself as ``x``).
    """
    import sevo_jax as sj

    def init_fn(params):
        state = {"j": jnp.zeros([]), "rq": jnp.zeros([])}
        if keep:
            state["x"] = jnp.zeros_like(select(params))
        return state

    def update_fn(updates, state, params=None):
        x = select(updates)
        j = sj.smoothness(x, graph)
        new = {"j": j, "rq": rayleigh(j, x)}
        if keep:
            new["x"] = x
        return updates, new

    return optax.GradientTransformation(init_fn, update_fn)


class Runner:
    """Train ``config``'s model on ``ds`` with any optax optimizer; see the module docstring."""

    def __init__(self, config: training.TrainConfig, ds: data_lib.SequenceDataset):
        self.config = config = config.resolved()
        self.ds = ds
        self.model = training.build_model(config, ds)
        self.examples = training.training_examples(config, ds)
        self.sampler = training.NegativeSampler(ds)
        self.loss_and_grad = jax.jit(jax.value_and_grad(training.make_loss_fn(config, self.model)))
        self.scorer = training.make_scorer(config, self.model, num_items=self.ds.num_items)
        init_input = jnp.zeros((1, config.maxlen), jnp.int32)
        # jit-compiled init: the same values as fit's eager init, in a third of the time
        init = jax.jit(lambda key: self.model.init(key, init_input, deterministic=True)["params"])
        self.init_params = jax.device_get(init(jax.random.PRNGKey(config.seed)))
        self._graph = None

    @property
    def graph(self):
        """The raw co-occurrence adjacency of ``config`` (built once, training data only)."""
        if self._graph is None:
            self._graph = training.build_graph(self.config, self.ds)
        return self._graph

    def optimizer(self, **overrides) -> optax.GradientTransformation:
        """``training.build_optimizer`` for ``config`` with ``overrides`` (e.g.
        ``optimizer="adamw"`` or ``beta=0.9, num_layers=1, approx="nsa"``); a ``sevo-*`` optimizer
        smooths on the co-occurrence graph unless ``graph=`` names another one."""
        c = dataclasses.replace(self.config, **overrides)
        c.validate()
        if not c.optimizer.startswith("sevo"):
            return training.build_optimizer(c, None)
        adjacency = self.graph if c.graph in ("auto", "cooccurrence") else training.build_graph(c, self.ds)
        return training.build_optimizer(c, adjacency)

    def evaluate(self, params, split: str = "valid") -> dict[str, float]:
        """Full-ranking HR@k / NDCG@k, as ``training.fit`` computes them."""
        return training.evaluate(self.config, self.scorer, params, self.ds, split)

    def per_user(self, params, split: str = "valid") -> dict[str, np.ndarray]:
        """The per-user metrics behind ``evaluate`` (for standard errors and paired tests)."""
        inputs = training.eval_inputs(self.config, self.ds, split)
        targets = (self.ds.valid if split == "valid" else self.ds.test).astype(np.int32)
        seen = self.ds.seen_items(split)
        n, bs = self.ds.num_users, self.config.eval_batch_size
        width = training.exclusion_width(self.ds)  # one seen-items width: one compiled scorer
        parts = []
        for start in range(0, n, bs):  # padded batches of eval_batch_size: reuses the compiled scorer
            rows = np.arange(start, start + bs) % n
            out = self.scorer(params, inputs[rows], targets[rows],
                              training.padded_rows(seen, rows, width=width))
            parts.append({k: np.asarray(v)[: min(bs, n - start)] for k, v in jax.device_get(out).items()})
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def train(
        self,
        optimizer: optax.GradientTransformation,
        epochs: int | None = None,
        *,
        eval_every: int = 1,
        snapshot_epochs: tuple[int, ...] = (),
        read_state: Callable[[Any, Any], dict] | None = None,
        test: bool = False,
    ) -> dict:
        """Train from the fixed init; returns ``history`` (one record per epoch: ``loss``, and
        ``valid`` every ``eval_every`` epochs and at the end), ``snapshots`` (item table at the
        requested epochs, 0 = init), ``trace`` (``read_state(params, opt_state)`` after every
        step, as numpy), ``params``, ``opt_state``, ``seconds`` and, with ``test=True``, ``test`` (test metrics
        of the final params; report only, never tune on it)."""
        c = self.config
        epochs = c.epochs if epochs is None else epochs
        t_start = time.perf_counter()

        @jax.jit
        def apply(params, opt_state, grads):
            updates, opt_state = optimizer.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            extra = read_state(params, opt_state) if read_state is not None else {}
            return params, opt_state, extra

        params = jax.tree_util.tree_map(jnp.asarray, self.init_params)
        opt_state = optimizer.init(params)
        base_key = jax.random.PRNGKey(c.seed)
        table = lambda p: np.asarray(p["item_embedding"]["embedding"])  # noqa: E731
        snapshots = {0: table(params)} if 0 in snapshot_epochs else {}
        history, trace = [], []
        for epoch in range(1, epochs + 1):
            rng = np.random.default_rng([c.seed, epoch])  # as training.fit
            epoch_key = jax.random.fold_in(base_key, epoch)
            losses = []
            for step, batch in enumerate(self.examples.epoch_batches(self.sampler, c.batch_size, rng)):
                loss, grads = self.loss_and_grad(params, batch, jax.random.fold_in(epoch_key, step))
                params, opt_state, extra = apply(params, opt_state, grads)
                losses.append(loss)
                if read_state is not None:
                    trace.append(extra)
            record = {"epoch": epoch, "loss": float(np.mean(jax.device_get(losses)))}
            if not np.isfinite(record["loss"]):
                raise FloatingPointError(f"loss became {record['loss']} at epoch {epoch}")
            if epoch % eval_every == 0 or epoch == epochs:
                record["valid"] = self.evaluate(params, "valid")
            history.append(record)
            if epoch in snapshot_epochs:
                snapshots[epoch] = table(params)
        out = {"history": history, "snapshots": snapshots, "params": params, "opt_state": opt_state}
        if trace:
            trace = jax.device_get(trace)
            out["trace"] = {k: np.array([t[k] for t in trace]) for k in trace[0]}
        if test:
            out["test"] = self.evaluate(params, "test")
        out["seconds"] = time.perf_counter() - t_start
        return out


def curve(history: list[dict], key: str = "NDCG@10") -> tuple[np.ndarray, np.ndarray]:
    """``(epochs, values)`` of a validation metric from ``Runner.train``'s history."""
    rows = [(h["epoch"], h["valid"][key]) for h in history if "valid" in h]
    return np.array([r[0] for r in rows]), np.array([r[1] for r in rows])
