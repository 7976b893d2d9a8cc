"""Packed rows (``TrainConfig.pack_rows``) against the unpacked batches: SASRec's, BERT4Rec's
and STOSA's train steps on the same examples.

For each model (reference Beauty defaults) the first ``--batches`` batches of an epoch are
built unpacked and packed (``training.pack_rows``, as the trainer lays them out).
With dropout off the first batch's loss and gradient must agree between the two layouts
(checked); then the trainer's step (``--optimizer``) is timed on every batch in both layouts,
every shape compiled first, layouts alternating per batch (process CPU time; the same
parameters and optimizer state every call), dropout on.

Usage::

    taskset -c 0 python benchmarks/bench_packed_rows.py \\
        --data ../shared/data/amazon-beauty/Beauty.txt
    python benchmarks/bench_packed_rows.py --smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _util  # noqa: E402  (stdlib only)

LAYOUTS = ("unpacked", "packed")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=_util.BEAUTY, help="a data file (default: ../shared Beauty)")
    p.add_argument("--models", default=None,
                   help="comma list (default: sasrec,bert4rec,stosa; --smoke: bert4rec)")
    p.add_argument("--optimizer", default="adamw")
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2, help="passes over the batches")
    p.add_argument("--cpu", type=int, default=0)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.smoke:
        args.batches, args.rounds = 2, 1
    args.models = args.models or ("bert4rec" if args.smoke else "sasrec,bert4rec,stosa")
    _util.limit_threads(args.cpu)

    import jax
    import numpy as np

    from sevo_jax import training

    info = _util.machine_info()
    print(_util.machine_line(info))
    ds, source = _util.model_data(args.data, args.smoke)
    rows, record = [], {"machine": info, "args": vars(args), "models": {}}
    for m in args.models.split(","):
        if m not in ("sasrec", "bert4rec", "stosa"):
            raise SystemExit(f"bench_packed_rows: --models: {m!r} is not one of sasrec, "
                             "bert4rec, stosa")
        cfg = training.TrainConfig(model=m, optimizer=args.optimizer, progress=False,
                                   **source).resolved()
        unpacked = _util.unpacked(cfg)
        model, tx, params, state = training.init_training(unpacked, ds)
        batches = {}
        for layout, config in (("unpacked", unpacked), ("packed", cfg)):
            # the same generator seed: the same examples, negatives and cloze masks (packing
            # draws nothing)
            it = training.training_examples(config, ds).epoch_batches(
                training.NegativeSampler(ds), cfg.batch_size, np.random.default_rng(0))
            batches[layout] = [b for _, b in zip(range(args.batches), it)]

        key = jax.random.PRNGKey(0)
        no_dropout = dataclasses.replace(unpacked, dropout=0.0, **(
            {"attention_dropout": 0.0} if m != "sasrec" else {}))
        off = training.build_model(no_dropout, ds)
        grad_off = jax.jit(jax.value_and_grad(training.make_loss_fn(no_dropout, off)))
        (l0, g0), (l1, g1) = (jax.block_until_ready(grad_off(params, batches[k][0], key))
                              for k in LAYOUTS)
        g0, g1 = (np.concatenate([np.ravel(g) for g in jax.tree_util.tree_leaves(g)])
                  for g in (g0, g1))
        loss_diff = abs(float(l1) - float(l0)) / abs(float(l0))
        grad_diff = float(np.max(np.abs(g1 - g0)) / np.max(np.abs(g0)))
        print(f"{m}: dropout off, |packed loss - unpacked| / loss {loss_diff:.1e}, max |gradient "
              f"difference| / max |gradient| {grad_diff:.1e}")
        if loss_diff > 1e-5 or grad_diff > 1e-4:
            raise SystemExit(f"bench_packed_rows: {m}: packed and unpacked batches disagree")

        step = jax.jit(_util.undonated_train_step(training.make_loss_fn(unpacked, model), tx))
        inputs = {k: [jax.device_put(b) for b in batches[k]] for k in LAYOUTS}
        compiled: dict = {}

        def run(layout, i):
            b = inputs[layout][i]
            shapes = tuple(sorted((k, v.shape) for k, v in b.items()))
            if shapes not in compiled:
                compiled[shapes] = step.lower(params, state, b, key).compile()
            return compiled[shapes](params, state, b, key)

        for layout in LAYOUTS:  # compile and warm up every shape before timing
            for i in range(len(batches[layout])):
                jax.block_until_ready(run(layout, i))
        times = {k: [] for k in LAYOUTS}
        for r in range(args.rounds):
            for i in range(len(batches["packed"])):
                for layout in (LAYOUTS if (i + r) % 2 == 0 else LAYOUTS[::-1]):
                    t = time.process_time()
                    jax.block_until_ready(run(layout, i))
                    times[layout].append(time.process_time() - t)
        ratios = [a / b for a, b in zip(times["packed"], times["unpacked"], strict=True)]
        shape = {k: (statistics.mean(b["inputs"].shape[0] for b in batches[k]),
                     batches[k][0]["inputs"].shape[1]) for k in LAYOUTS}
        mean = {k: statistics.mean(times[k]) for k in LAYOUTS}
        rows.append([m, f"{cfg.batch_size} x {shape['unpacked'][1]}",
                     f"{shape['packed'][0]:.1f} x {shape['packed'][1]}",
                     f"{1e3 * mean['unpacked']:.0f} ms", f"{1e3 * mean['packed']:.0f} ms",
                     f"**{mean['packed'] / mean['unpacked']:.3f}**",
                     f"{statistics.median(ratios):.3f}", f"{loss_diff:.0e} / {grad_diff:.0e}"])
        record["models"][m] = {"times": times, "loss_diff": loss_diff, "grad_diff": grad_diff}
    print(f"\n{args.batches} batches per model, {args.optimizer} step; load average at the end: "
          f"{os.getloadavg()}\n")
    print(_util.markdown_table(
        ["model", "unpacked batch", "packed rows (mean) x width", "unpacked step (CPU, mean)",
         "packed step", "ratio of means", "median per-batch ratio",
         "loss / gradient difference, dropout off"], rows))
    _util.write_json(args.json, record)


if __name__ == "__main__":
    main()
