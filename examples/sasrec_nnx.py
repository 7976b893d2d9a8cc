"""SASRec written in Flax NNX, trained with SEvo-AdamW through ``nnx.Optimizer``.

The model is a native NNX port of ``sevo_jax.models.SASRec`` (same function: copying Linen
params into it with ``load_linen_params`` gives the same outputs). Everything around the model
is the trainer's (``sevo_jax.training``): the data set, the training examples, the negatives and
batch order per epoch, the co-occurrence graph, the optimizer (``build_optimizer``: SEvo smooths
the tables of ``models.sevo_mask``, which selects on NNX state as on Linen params) and the
full-ranking evaluation. With the same seed and budget it reaches the Linen trainer's validation
NDCG@10 (RESULTS.md, "Flax NNX").

    python examples/sasrec_nnx.py                       # synthetic set, sevo-train's defaults
    python examples/sasrec_nnx.py --optimizer adamw --seed 1
    sevo-train --seed 1 --optimizer adamw               # the Linen trainer, same budget
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sevo_jax import data, metrics, models, training

xavier_normal = nnx.initializers.xavier_normal()


class SASRecBlock(nnx.Module):
    """``q = LN1(x); x = LN2(x + MHA(q, x, x; mask)); x + FFN(x)`` as ``models.SASRecBlock``."""

    def __init__(self, features: int, num_heads: int, dropout: float, *, rngs: nnx.Rngs):
        self.attention_norm = nnx.LayerNorm(features, epsilon=1e-8, rngs=rngs)
        self.attention = nnx.MultiHeadAttention(
            num_heads, features, features, features, dropout_rate=dropout,
            broadcast_dropout=False, decode=False, keep_rngs=False, rngs=rngs)
        self.ffn_norm = nnx.LayerNorm(features, epsilon=1e-8, rngs=rngs)
        self.ffn_in = nnx.Linear(features, features, rngs=rngs)
        self.ffn_out = nnx.Linear(features, features, rngs=rngs)
        self.dropout = nnx.Dropout(dropout)

    def __call__(self, x, mask, *, deterministic: bool, rngs: nnx.Rngs | None = None):
        q = self.attention_norm(x)
        attn = self.attention(q, x, x, mask=mask, deterministic=deterministic, rngs=rngs)
        x = self.ffn_norm(x + attn)
        y = self.dropout(self.ffn_in(x), deterministic=deterministic, rngs=rngs)
        y = self.dropout(self.ffn_out(nnx.relu(y)), deterministic=deterministic, rngs=rngs)
        return x + y


class SASRec(nnx.Module):
    """``models.SASRec`` in NNX: left-padded ``(B, T)`` item ids -> hidden states ``(B, T, d)``."""

    def __init__(self, num_items: int, maxlen: int = 50, features: int = 64, num_blocks: int = 2,
                 num_heads: int = 1, dropout: float = 0.3, mask_padding_keys: bool = True, *,
                 rngs: nnx.Rngs):
        self.maxlen, self.features, self.mask_padding_keys = maxlen, features, mask_padding_keys
        self.item_embedding = nnx.Embed(num_items + 1, features, embedding_init=xavier_normal,
                                        rngs=rngs)
        self.position_embedding = nnx.Embed(maxlen, features, embedding_init=xavier_normal,
                                            rngs=rngs)
        self.embedding_dropout = nnx.Dropout(dropout)
        self.blocks = nnx.List([SASRecBlock(features, num_heads, dropout, rngs=rngs)
                                for _ in range(num_blocks)])
        self.final_norm = nnx.LayerNorm(features, epsilon=1e-8, rngs=rngs)

    def __call__(self, seqs, *, deterministic: bool, rngs: nnx.Rngs | None = None,
                 positions=None, segments=None):
        """Packed rows (``training.pack_rows``): as ``models.SASRec``."""
        length = seqs.shape[-1]
        if length > self.maxlen:
            raise ValueError(f"sequence length {length} exceeds maxlen {self.maxlen}")
        valid = seqs != 0
        keep = valid[..., None].astype(jnp.float32)
        x = self.item_embedding(seqs) * jnp.sqrt(float(self.features))
        x = x + self.position_embedding(
            models.right_aligned_positions(self.maxlen, length, positions))
        x = self.embedding_dropout(x, deterministic=deterministic, rngs=rngs) * keep
        mask = nnx.make_causal_mask(seqs, dtype=bool)
        if self.mask_padding_keys:
            mask = mask & valid[:, None, None, :]
        if segments is not None:
            mask = mask & models.same_segment(segments)
        for block in self.blocks:
            x = block(x, mask, deterministic=deterministic, rngs=rngs) * keep
        return self.final_norm(x)

    def score(self, hidden, items):
        """Dot products ``(..., K)`` of ``hidden (..., d)`` with items ``(..., K)``."""
        return jnp.einsum("...d,...kd->...k", hidden, self.item_embedding(items))

    def score_all(self, hidden):
        """Scores ``(B, num_items + 1)`` of ``hidden (B, d)`` against every item id."""
        return self.item_embedding.attend(hidden)


def load_linen_params(model: SASRec, params: dict) -> None:
    """Copy the params of a ``models.SASRec`` of the same sizes into ``model`` (in place)."""
    state = {
        "item_embedding": params["item_embedding"],
        "position_embedding": params["position_embedding"],
        "final_norm": params["final_norm"],
        "blocks": {i: params[f"blocks_{i}"] for i in range(len(model.blocks))},
    }
    nnx.update(model, jax.tree.map(jnp.asarray, state))


def fit_nnx(config: training.TrainConfig, ds: data.SequenceDataset, model: SASRec | None = None,
            log: Callable[[str], None] = print) -> dict:
    """Train ``model`` (default: a fresh one seeded by ``config.seed``) as ``training.fit``
    trains the Linen SASRec, and return ``{"valid", "best_epoch", "losses"}`` (best validation
    metrics every ``eval_every`` epochs, and each epoch's mean loss)."""
    config = config.resolved()
    config.validate()
    if config.model != "sasrec" or config.mesh is not None:
        raise ValueError("this example trains SASRec on one device")
    if model is None:
        model = SASRec(ds.num_items, config.maxlen, config.features, config.num_blocks,
                       config.num_heads, config.dropout, rngs=nnx.Rngs(config.seed))
    adjacency = training.build_graph(config, ds) if config.optimizer.startswith("sevo") else None
    tx = training.build_optimizer(config, adjacency)   # SEvo's mask: models.sevo_mask
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, batch, key):
        def loss_fn(model):
            packed = {k: batch[k] for k in ("positions", "segments") if k in batch}
            hidden = model(batch["inputs"], deterministic=False, rngs=nnx.Rngs(dropout=key),
                           **packed)
            logits = model.score(hidden, jnp.stack([batch["targets"], batch["negatives"]], -1))
            return models.sasrec_loss(logits[..., 0], logits[..., 1], batch["targets"] != 0)

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    @nnx.jit
    def scorer(model, inputs, targets, seen):   # training.evaluate's scorer contract
        scores = model.score_all(model(inputs, deterministic=True)[:, -1])
        rows = jnp.arange(seen.shape[0])[:, None]
        exclude = jnp.zeros(scores.shape, bool).at[rows, seen].set(True)
        return metrics.ranking_metrics(metrics.target_ranks(scores, targets, exclude))

    examples = training.training_examples(config, ds)
    sampler = training.NegativeSampler(ds)
    base_key = jax.random.PRNGKey(config.seed)
    best: dict = {"valid": None, "best_epoch": 0, "losses": []}
    for epoch in range(1, config.epochs + 1):
        t0 = time.perf_counter()
        rng = np.random.default_rng([config.seed, epoch])      # the trainer's batches
        epoch_key = jax.random.fold_in(base_key, epoch)
        batches = examples.epoch_batches(sampler, config.batch_size, rng)
        losses = [train_step(model, optimizer, batch, jax.random.fold_in(epoch_key, step))
                  for step, batch in enumerate(batches)]
        best["losses"].append(float(np.mean(jax.device_get(losses))))
        seconds = time.perf_counter() - t0
        line = f"epoch {epoch:3d}  loss {best['losses'][-1]:.4f}  ({seconds:.1f} s)"
        if epoch % config.eval_every == 0 or epoch == config.epochs:
            valid = training.evaluate(config, scorer, model, ds, "valid")
            line += f"  valid NDCG@10 {valid['NDCG@10']:.4f}"
            if best["valid"] is None or valid["NDCG@10"] > best["valid"]["NDCG@10"]:
                best["valid"], best["best_epoch"] = valid, epoch
        log(line)
    return best


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimizer", choices=["sevo-adamw", "adamw"], default="sevo-adamw")
    parser.add_argument("--epochs", type=int, help="default: sevo-train's (40 on synthetic)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--num-users", type=int, default=1000, help="synthetic data size")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--maxlen", type=int)
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument("--dropout", type=float)
    args = parser.parse_args(argv)

    ds = data.synthetic(num_users=args.num_users)
    config = training.TrainConfig(optimizer=args.optimizer, epochs=args.epochs, seed=args.seed,
                                  eval_every=args.eval_every, batch_size=args.batch_size,
                                  maxlen=args.maxlen,
                                  features=args.features, dropout=args.dropout)
    try:
        result = fit_nnx(config, ds)
    except training.ConfigError as e:  # a bad flag value: one line naming the flag
        parser.error(f"--{e.field.replace('_', '-')} {e.problem}")
    valid = result["valid"]
    print(f"valid ({args.optimizer}, NNX, best epoch {result['best_epoch']}): "
          f"NDCG@10 {valid['NDCG@10']:.4f}  HR@10 {valid['HR@10']:.4f}")
    return result


if __name__ == "__main__":
    main()
