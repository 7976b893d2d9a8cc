"""BERT4Rec's output layer in the train step: ``score_all`` then ``cloze_loss`` through JAX
autodiff (before) vs ``models.table_cross_entropy`` (now, ``BERT4Rec.cloze_loss``).

The trainer's batches (packed, reference Beauty defaults), the trainer's step without donation
(``--optimizer``), in one process pinned to ``--cpu``, with ``host_memory.keep_freed_memory``
applied first as ``sevo-train`` does (``--glibc-default``: without). First the loss and gradient
of the first batch must agree (dropout on, the same key), then both steps run every batch (each
shape compiled first), variants alternating per batch, process CPU time.

Usage::

    python benchmarks/bench_bert4rec_output.py --data ../shared/data/amazon-beauty/Beauty.txt
    python benchmarks/bench_bert4rec_output.py --smoke
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _util  # noqa: E402  (stdlib only)

VARIANTS = ("score_all + cloze_loss", "table_cross_entropy")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=_util.BEAUTY, help="a data file (default: ../shared Beauty)")
    p.add_argument("--optimizer", default="sevo-adamw")
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3, help="passes over the batches")
    p.add_argument("--cpu", type=int, default=0)
    p.add_argument("--glibc-default", action="store_true", help="skip keep_freed_memory")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.smoke:
        args.batches, args.rounds = 2, 1
    _util.limit_threads(args.cpu, xla=False)
    from sevo_jax import host_memory

    kept = False if args.glibc_default else host_memory.keep_freed_memory()

    import jax
    import numpy as np

    from sevo_jax import models, training

    info = _util.machine_info()
    print(_util.machine_line(info) + f"; keep_freed_memory applied: {kept}")
    ds, source = _util.model_data(args.data, args.smoke)
    cfg = training.TrainConfig(model="bert4rec", optimizer=args.optimizer, progress=False,
                               **source).resolved()
    model, tx, params, state = training.init_training(cfg, ds)

    def autodiff_loss(params, batch, key):  # the trainer's BERT4Rec loss before
        variables = {"params": params}
        hidden = model.apply(variables, batch["inputs"], deterministic=False,
                             rngs={"dropout": key}, positions=batch["positions"],
                             segments=batch["segments"])
        masked = hidden.reshape(-1, hidden.shape[-1])[batch["cloze_index"]]
        logits = model.apply(variables, masked, method="score_all")
        return models.cloze_loss(logits, batch["cloze_labels"])

    loss_fns = dict(zip(VARIANTS, (autodiff_loss, training.make_loss_fn(cfg, model))))
    it = training.training_examples(cfg, ds).epoch_batches(
        training.NegativeSampler(ds), cfg.batch_size, np.random.default_rng(0))
    batches = [jax.device_put(b) for _, b in zip(range(args.batches), it)]
    key = jax.random.PRNGKey(0)

    grads = {}
    for name, fn in loss_fns.items():
        loss, g = jax.jit(jax.value_and_grad(fn))(params, batches[0], key)
        grads[name] = (float(loss), np.concatenate([np.ravel(x) for x in jax.tree.leaves(g)]))
    (l0, g0), (l1, g1) = grads.values()
    loss_diff = abs(l1 - l0) / abs(l0)
    grad_diff = float(np.max(np.abs(g1 - g0)) / np.max(np.abs(g0)))
    print(f"first batch: |loss difference| / loss {loss_diff:.1e}; max |gradient difference| / "
          f"max |gradient| {grad_diff:.1e}")
    if loss_diff > 1e-5 or grad_diff > 1e-4:
        raise SystemExit("bench_bert4rec_output: the two output layers disagree")

    steps = {n: jax.jit(_util.undonated_train_step(f, tx)) for n, f in loss_fns.items()}
    for step in steps.values():  # compile every shape
        for b in batches:
            jax.block_until_ready(step(params, state, b, key))
    times: dict = {n: [] for n in VARIANTS}
    for r in range(args.rounds):
        for i, b in enumerate(batches):
            for name in (VARIANTS if (i + r) % 2 == 0 else VARIANTS[::-1]):
                t = time.process_time()
                jax.block_until_ready(steps[name](params, state, b, key))
                times[name].append(time.process_time() - t)
    base = statistics.mean(times[VARIANTS[0]])
    rows = [[name, f"{1e3 * statistics.mean(times[name]):.1f} ms",
             f"**{statistics.mean(times[name]) / base:.3f}**",
             f"{statistics.median(a / b for a, b in zip(times[name], times[VARIANTS[0]])):.3f}"]
            for name in VARIANTS]
    masked = statistics.mean(int(np.count_nonzero(b["cloze_labels"])) for b in batches)
    print(f"\n{len(batches)} packed batches ({masked:.0f} masked positions on average, "
          f"{ds.num_items + 2} ids), {args.optimizer} step; load average at the end: "
          f"{os.getloadavg()}\n")
    print(_util.markdown_table(["output layer", "step (CPU, mean)", "ratio of means",
                                "median per-batch ratio"], rows))
    _util.write_json(args.json, {"machine": info, "kept": kept, "times": times,
                                 "loss_diff": loss_diff, "grad_diff": grad_diff,
                                 "args": vars(args)})


if __name__ == "__main__":
    main()
