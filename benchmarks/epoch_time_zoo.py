"""Seconds per training epoch (and per full-ranking evaluation) of a model on a data set.

Times the first ``--steps`` jitted train steps of an epoch, after one warm-up step per
distinct batch shape (length buckets give several), and extrapolates their mean to one epoch
(``ceil(examples / batch)`` steps); times one validation pass over every user. Run pinned to
one core for the CPU numbers of RESULTS.md::

    taskset -c 0 python benchmarks/epoch_time_zoo.py \\
        --data ../shared/data/amazon-beauty/Beauty.txt \\
        --model bert4rec --optimizer sevo-adamw
"""

from __future__ import annotations

import argparse
import json
import math
import time

import _util  # benchmarks/ is on sys.path when run as a script
import jax
import numpy as np

from sevo_jax import data, training


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--model", required=True, choices=training.MODELS)
    p.add_argument("--graph", default="auto", choices=training.GRAPHS)
    p.add_argument("--optimizer", default="sevo-adamw", choices=training.OPTIMIZERS)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--no-eval", action="store_true")
    args = p.parse_args(argv)
    ds = _util.load_data(args.data)
    cfg = training.TrainConfig(model=args.model, graph=args.graph, optimizer=args.optimizer,
                               data=args.data, format=data.detect_format(args.data),
                               progress=False).resolved()
    model, optimizer, params, opt_state = training.init_training(cfg, ds)
    examples = training.training_examples(cfg, ds)
    step = training.make_train_step(training.make_loss_fn(cfg, model), optimizer)
    batches = list(examples.epoch_batches(training.NegativeSampler(ds), cfg.batch_size,
                                          np.random.default_rng(0)))
    key = jax.random.PRNGKey(0)
    # one step per distinct batch shape first (length buckets give several), so that no
    # timed step compiles; the first of them is the first step
    first = None
    shapes = {tuple((k, v.shape) for k, v in sorted(b.items())): b for b in batches}
    for batch in shapes.values():
        t0 = time.perf_counter()
        params, opt_state, loss = step(params, opt_state, batch, key)
        jax.block_until_ready(loss)
        first = time.perf_counter() - t0 if first is None else first
    times = []
    for k, batch in enumerate(batches[:args.steps]):
        t0 = time.perf_counter()
        params, opt_state, loss = step(params, opt_state, batch, jax.random.fold_in(key, k))
        jax.block_until_ready(loss)
        times.append(time.perf_counter() - t0)
    steps_per_epoch = math.ceil(len(examples) / cfg.batch_size)
    record = {"model": args.model, "graph": training.graph_kind(cfg), "optimizer": args.optimizer,
              "batch_size": cfg.batch_size, "steps_per_epoch": steps_per_epoch,
              "first_step_s": round(first, 2), "mean_step_s": round(float(np.mean(times)), 4),
              "epoch_s": round(float(np.mean(times)) * steps_per_epoch, 1),
              "epochs": cfg.epochs, "eval_every": cfg.eval_every}
    if not args.no_eval:
        scorer = training.make_scorer(cfg, model, num_items=ds.num_items)
        training.evaluate(cfg, scorer, params, ds, "valid")  # compile
        t0 = time.perf_counter()
        training.evaluate(cfg, scorer, params, ds, "valid")
        record["eval_s"] = round(time.perf_counter() - t0, 1)
    evals = cfg.epochs // cfg.eval_every + 1
    record["run_hours"] = round((record["epoch_s"] * cfg.epochs
                                 + record.get("eval_s", 0) * evals) / 3600, 1)
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
