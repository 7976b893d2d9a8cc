"""SASRec trained with SEvo-AdamW, using sevo_jax directly (no trainer).

Shows the whole recipe in one page: item co-occurrence graph from the training sequences ->
`sevo_jax.sevo_adamw` (smoothing only the item table) -> a jitted Flax/Optax train step ->
full-ranking NDCG@10 / HR@10 on the validation split.

    python examples/sasrec.py                                   # built-in synthetic data
    python examples/sasrec.py --optimizer adamw                 # plain AdamW, for comparison
    python examples/sasrec.py --data ../shared/data/amazon-beauty/Beauty.txt --epochs 200
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sevo_jax
from sevo_jax import data, metrics, models

MAXLEN = 50        # keep each user's last 50 items
BATCH_SIZE = 128   # users per step
LR = 1e-3
EVAL_BATCH_SIZE = 1024


def left_pad(seqs, maxlen):
    """Cut each sequence to its last `maxlen` items and left-pad with 0 -> (len(seqs), maxlen)."""
    out = np.zeros((len(seqs), maxlen), np.int32)
    for row, s in zip(out, seqs, strict=True):
        s = s[-maxlen:]
        row[maxlen - len(s):] = s
    return out


def positive_int(text: str) -> int:
    if not text.lstrip("+").isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return int(text)


def main(argv=None):
    """Train, evaluate, print; returns the model, params, data set, epoch losses and metrics."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="seqtxt file (`user item item ...`); default: synthetic")
    parser.add_argument("--epochs", type=positive_int, default=20)
    parser.add_argument("--optimizer", choices=["sevo-adamw", "adamw"], default="sevo-adamw")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-users", type=positive_int, default=1000, help="synthetic data size")
    args = parser.parse_args(argv)

    try:
        ds = data.load_seqtxt(args.data) if args.data else data.synthetic(num_users=args.num_users)
    except data.DataError as e:  # a missing or malformed file: one line, no traceback
        parser.error(str(e))
    print(ds)
    train_seqs = ds.train_sequences()                  # item ids 1..N, 0 = padding
    inputs = left_pad([s[:-1] for s in train_seqs], MAXLEN)   # predict s[t+1] from s[:t+1]
    targets = left_pad([s[1:] for s in train_seqs], MAXLEN)

    model = models.SASRec(ds.num_items, maxlen=MAXLEN, features=64, num_blocks=2, dropout=0.3)
    params = model.init(jax.random.PRNGKey(args.seed), inputs[:1], deterministic=True)["params"]

    if args.optimizer == "sevo-adamw":
        # The graph builder wants 0-based item ids and adds the padding row (row 0) itself.
        A = sevo_jax.cooccurrence_graph(
            [s - 1 for s in train_seqs], ds.num_items, H=1, maxlen=MAXLEN, num_pads=1)
        tx = sevo_jax.sevo_adamw(LR, A, beta=0.99, num_layers=3, b2=0.98, weight_decay=0.1,
                                 mask=models.sevo_mask)
    else:
        tx = optax.adamw(LR, b2=0.98, weight_decay=0.1)
    opt_state = tx.init(params)

    @jax.jit
    def train_step(params, opt_state, inputs, targets, negatives, key):
        def loss_fn(params):
            hidden = model.apply({"params": params}, inputs, deterministic=False,
                                 rngs={"dropout": key})                     # (B, T, d)
            items = jnp.stack([targets, negatives], axis=-1)                # (B, T, 2)
            logits = model.apply({"params": params}, hidden, items, method="score")
            return models.sasrec_loss(logits[..., 0], logits[..., 1], targets != 0)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    @jax.jit
    def eval_step(params, inputs, targets, exclude):
        hidden = model.apply({"params": params}, inputs, deterministic=True)[:, -1]
        scores = model.apply({"params": params}, hidden, method="score_all")  # (B, N + 1)
        return metrics.ranking_metrics(metrics.target_ranks(scores, targets, exclude))

    rng = np.random.default_rng(args.seed)
    key = jax.random.PRNGKey(args.seed)
    num_steps = max(ds.num_users // BATCH_SIZE, 1)  # drop the last partial batch
    epoch_losses = []
    for epoch in range(1, args.epochs + 1):
        t0, losses = time.perf_counter(), []
        epoch_losses.append(losses)
        order = rng.permutation(ds.num_users)
        # One uniform negative per target (the trainer also excludes the user's seen items).
        negatives = rng.integers(1, ds.num_items + 1, size=targets.shape, dtype=np.int32)
        for step in range(num_steps):
            idx = order[step * BATCH_SIZE:(step + 1) * BATCH_SIZE]
            key, dropout_key = jax.random.split(key)
            params, opt_state, loss = train_step(
                params, opt_state, inputs[idx], targets[idx], negatives[idx], dropout_key)
            losses.append(loss)
        print(f"epoch {epoch:3d}  loss {np.mean(losses):.4f}  ({time.perf_counter() - t0:.1f} s)")

    # Full ranking of the validation item against every item the user has not trained on.
    eval_inputs = left_pad(train_seqs, MAXLEN)
    seen = ds.seen_items("valid")
    acc = metrics.MetricAccumulator()
    for start in range(0, ds.num_users, EVAL_BATCH_SIZE):
        rows = np.arange(start, min(start + EVAL_BATCH_SIZE, ds.num_users))
        acc.update(eval_step(params, eval_inputs[rows], ds.valid[rows].astype(np.int32),
                             seen[rows].toarray()))
    result = acc.compute()
    print(f"valid ({args.optimizer}): NDCG@10 {result['NDCG@10']:.4f}  HR@10 {result['HR@10']:.4f}")
    return {"model": model, "params": params, "dataset": ds, "valid": result,
            "losses": [float(np.mean(jax.device_get(x))) for x in epoch_losses]}


if __name__ == "__main__":
    main()
