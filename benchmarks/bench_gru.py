"""GRU4Rec's loss and gradient: the library's skipping GRU against a plain scan, side by side.

What is timed is ``jax.jit(jax.value_and_grad(loss))`` of GRU4Rec's BPR loss (spec §4: d = 64,
maxlen 50, batch 512, embedding dropout 0.4) on batches of the model's real training examples,
every prefix of every training sequence, left-padded: from ``../shared/data/amazon-beauty/
Beauty.txt`` when it exists (mean prefix 8.4 of 50 positions), else from the built-in synthetic
data set. Formulations, all with the same parameters:

* ``plain scan``: what ``GRU4Rec`` did before: elementwise dropout on the ``(B, T, d)``
  embeddings, then one ``lax.scan`` over all T steps for the whole batch, differentiated by JAX;
* ``groups=G``: ``sevo_jax.models.GRU4Rec(row_groups=G)``, i.e. :func:`sevo_jax.models.masked_gru`:
  rows sorted by length, G row groups that skip (forward and backward) the steps where none of
  their rows is valid, a hand-written backward pass, dropout drawn for the valid steps only.

All formulations run in one process pinned to one core, interleaved per repetition (each
repetition ``--steps`` consecutive batches ended by ``block_until_ready``; warm-up excluded);
the table gives the median over repetitions and the ratio to the plain scan.

Usage::

    python benchmarks/bench_gru.py > /tmp/bench_gru.md     # ~2 min on one core
    python benchmarks/bench_gru.py --smoke                  # CI, a few seconds
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import _util  # noqa: E402  (stdlib only)

BEAUTY = REPO.parent / "shared" / "data" / "amazon-beauty" / "Beauty.txt"


def plain_scan_loss(params, batch, key, dropout: float):
    """GRU4Rec's BPR loss with the GRU as one plain scan over every step (the baseline)."""
    import jax
    import jax.numpy as jnp

    from sevo_jax import models

    table = params["item_embedding"]["embedding"]
    seqs = batch["inputs"].T                                    # (T, B)
    x = table[seqs]
    keep = jax.random.bernoulli(key, 1.0 - dropout, x.shape)
    x = jnp.where(keep, x / (1.0 - dropout), 0.0)
    w_i, w_h = params["gru"]["input_kernel"], params["gru"]["recurrent_kernel"]

    def step(h, inputs):
        x_t, valid_t = inputs
        return jnp.where(valid_t[:, None], models.bias_free_gru_step(w_i, w_h, h, x_t), h), None

    h, _ = jax.lax.scan(step, jnp.zeros((seqs.shape[1], w_h.shape[0])), (x, seqs != 0))
    user = h @ params["dense"]["kernel"] + params["dense"]["bias"]
    items = table[jnp.stack([batch["targets"], batch["negatives"]], axis=-1)]
    logits = jnp.einsum("bd,bkd->bk", user, items)
    return models.bpr_loss(logits[:, 0], logits[:, 1], batch["targets"] != 0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--groups", type=int, nargs="+", default=[1, 8, 16])
    p.add_argument("--steps", type=int, default=10, help="batches per repetition")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--json", default=None)
    p.add_argument("--smoke", action="store_true", help="synthetic data, tiny batches")
    args = p.parse_args()
    _util.limit_threads(0)

    import jax
    import numpy as np

    from sevo_jax import data, training

    real = BEAUTY.exists() and not args.smoke
    config = training.TrainConfig(
        model="gru4rec", optimizer="adamw", format="seqtxt" if real else "synthetic",
        data=str(BEAUTY) if real else None, out="/tmp/unused",
        **({"batch_size": 32} if args.smoke else {})).resolved()
    if args.smoke:
        args.steps, args.repeats, args.groups = 2, 2, [1, 4]
    ds = data.load_dataset(config.format, config.data, cache_dir=None, kcore=config.kcore)
    model, _, params, _ = training.init_training(config, ds)
    examples = training.training_examples(config, ds)
    batches = list(examples.epoch_batches(training.NegativeSampler(ds), config.batch_size,
                                          np.random.default_rng(0)))[: args.steps]
    batches = [jax.device_put(b) for b in batches]
    lengths = (examples.arrays["inputs"] != 0).sum(axis=1)

    losses = {"plain scan": lambda p, b, k: plain_scan_loss(p, b, k, config.dropout)}
    for g in args.groups:
        losses[f"groups={g}"] = training.make_loss_fn(config, model.clone(row_groups=g))
    steps = {name: jax.jit(jax.value_and_grad(f)) for name, f in losses.items()}
    key = jax.random.PRNGKey(0)
    for f in steps.values():  # warm-up: compile + one batch
        jax.block_until_ready(f(params, batches[0], key))

    times = {name: [] for name in steps}
    for rep in range(args.repeats):
        order = list(steps) if rep % 2 == 0 else list(reversed(steps))
        for name in order:
            start = time.perf_counter()
            for i, b in enumerate(batches):
                out = steps[name](params, b, jax.random.fold_in(key, i))
            jax.block_until_ready(out)
            times[name].append((time.perf_counter() - start) / len(batches))

    base = statistics.median(times["plain scan"])
    info = _util.machine_info()
    print(f"Data: {'Beauty.txt' if real else 'synthetic'} ({len(examples)} training prefixes, "
          f"mean length {lengths.mean():.1f} of {config.maxlen}); batch {config.batch_size}; "
          f"{args.repeats} x {args.steps} batches per formulation, one core.")
    print(_util.machine_line(info))
    print()
    rows = [[name, _util.fmt_s(statistics.median(t)), f"{statistics.median(t) / base:.2f}"]
            for name, t in times.items()]
    print(_util.markdown_table(["formulation", "loss + gradient per batch (median)", "/ plain scan"], rows))
    _util.write_json(args.json, {"machine": info, "times_s": times, "config": vars(args)})


if __name__ == "__main__":
    main()
