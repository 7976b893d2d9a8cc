"""STOSA loss + gradient on real batches: full-width batches vs length buckets, one process.

STOSA's Beauty config pads every sequence to 100 items, but a batch of 256 Beauty users holds
71 columns with items on average: the rest is padding in every row. Variants, on the same
batches (the trainer's ``epoch_batches`` with the same seed):

* ``before``: full width, the Wasserstein attention logits as two matmuls scaled afterwards (the
  formulation up to commit 90c72eb; XLA:CPU materialises the scale as a (B, H, T, T) buffer);
* ``one matmul``: full width, ``models.wasserstein_distance_matrix`` (one matmul of
  ``[mu, sqrt(S)]``, scale on the operands);
* ``bucket B``: the same, each batch trimmed to a multiple of ``B`` columns
  (``TrainConfig.length_bucket``; STOSA's default is a tenth of its maxlen, 10 on Beauty).

Dropout is off so that all variants compute the same loss (printed). Every distinct batch
shape is compiled before timing; variants alternate per batch; process CPU time summed over
the batches, as a ratio to ``before``.

Usage::

    taskset -c 0 python benchmarks/bench_stosa_step.py --data ../shared/data/amazon-beauty/Beauty.txt
    python benchmarks/bench_stosa_step.py --smoke      # CI: tiny synthetic data
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _util  # noqa: E402  (stdlib only)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="a data file (required unless --smoke)")
    p.add_argument("--batches", type=int, default=16)
    p.add_argument("--buckets", type=int, nargs="+", default=[25, 10, 5])
    p.add_argument("--cpu", type=int, default=0)
    p.add_argument("--json", default=None)
    p.add_argument("--smoke", action="store_true", help="tiny synthetic data (seconds)")
    args = p.parse_args(argv)
    if args.data is None and not args.smoke:
        p.error("--data is required (or --smoke)")
    _util.limit_threads(args.cpu)
    import jax
    import jax.numpy as jnp
    import numpy as np

    from sevo_jax import models, training

    def two_matmuls(mean1, cov1, mean2, cov2, scale=1.0):
        means = (jnp.sum(mean1 ** 2, -1)[..., :, None] + jnp.sum(mean2 ** 2, -1)[..., None, :]
                 - 2 * mean1 @ jnp.swapaxes(mean2, -1, -2))
        root1, root2 = (jnp.sqrt(jnp.maximum(c, 1e-24)) for c in (cov1, cov2))
        covs = (jnp.sum(cov1, -1)[..., :, None] + jnp.sum(cov2, -1)[..., None, :]
                - 2 * root1 @ jnp.swapaxes(root2, -1, -2))
        return (means + covs) * scale

    info = _util.machine_info()
    print(_util.machine_line(info))
    ds, source = _util.model_data(args.data, args.smoke, seq_len=(3, 12), maxlen=20)
    if args.smoke:
        args.batches, args.buckets = 3, [5]
    cfg = training.TrainConfig(model="stosa", optimizer="adamw", progress=False, dropout=0.0,
                               attention_dropout=0.0, pack_rows=False,  # measured unpacked
                               **source).resolved()
    cfg = dataclasses.replace(cfg, length_bucket=cfg.maxlen)  # full width: never trims
    model, _, params, _ = training.init_training(cfg, ds)
    full = training.training_examples(cfg, ds).epoch_batches(
        training.NegativeSampler(ds), cfg.batch_size, np.random.default_rng(0))
    batches = [b for _, b in zip(range(args.batches), full, strict=False)]
    key = jax.random.PRNGKey(0)
    new_matrix = models.wasserstein_distance_matrix

    def compiled(matrix, shapes):
        models.wasserstein_distance_matrix = matrix  # STOSALayer looks it up when traced
        grad = jax.jit(jax.value_and_grad(training.make_loss_fn(cfg, model)))
        for b in {tuple(b["inputs"].shape): b for b in shapes}.values():
            jax.block_until_ready(grad(params, b, key))  # one compile per shape
        models.wasserstein_distance_matrix = new_matrix
        return grad

    inputs = {"before": batches, "one matmul": batches}
    inputs |= {f"bucket {k}": [training.trimmed_padding(b, k, ("inputs", "targets"))
                               for b in batches] for k in args.buckets}
    grads = {n: compiled(two_matmuls if n == "before" else new_matrix, bs)
             for n, bs in inputs.items()}
    losses = {n: [float(grads[n](params, b, key)[0]) for b in bs] for n, bs in inputs.items()}
    worst = max(abs(a - b) / abs(b) for n in losses for a, b in zip(
        losses[n], losses["before"], strict=True))
    print(f"max relative loss difference to before: {worst:.1e}")
    assert worst < 1e-4, losses
    times = {n: 0.0 for n in inputs}
    order = list(inputs)
    for i in range(len(batches)):
        for n in order if i % 2 == 0 else order[::-1]:
            t0 = time.process_time()
            jax.block_until_ready(grads[n](params, inputs[n][i], key))
            times[n] += time.process_time() - t0
    widths = {n: float(np.mean([b["inputs"].shape[1] for b in bs])) for n, bs in inputs.items()}
    rows, result = [], {"machine": info, "batches": len(batches), "variants": {}}
    for n, t in times.items():
        per = t / len(batches)
        rows.append([n, f"{widths[n]:.1f}", f"{per * 1e3:.0f} ms", f"{t / times['before']:.3f}"])
        result["variants"][n] = {"mean_width": widths[n], "per_batch_s": per,
                                 "ratio": t / times["before"]}
    print(_util.markdown_table(["variant", "mean batch width", "loss + gradient (CPU time, mean)",
                                "ratio to before"], rows))
    steps = math.ceil(ds.num_users / cfg.batch_size)
    print(f"one epoch is {steps} batches; load average at the end: {os.getloadavg()}")
    result["max_relative_loss_difference"] = worst
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=str)


if __name__ == "__main__":
    main()
