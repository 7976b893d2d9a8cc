"""BERT4Rec's train step: cloze positions padded to ``training.cloze_size`` (now) vs to a power
of two (before).

Padded positions have label 0 and weight 0, so the loss and gradient agree to float rounding
(checked: the first batch's loss and gradient), then the script times the
trainer's step (AdamW or SEvo-AdamW, Beauty defaults) on the first ``--batches`` batches of an
epoch, every shape compiled first, variants alternating per batch (process CPU time; the same
parameters and optimizer state every call).

Usage::

    taskset -c 0 python benchmarks/bench_bert4rec_step.py \\
        --data ../shared/data/amazon-beauty/Beauty.txt
    python benchmarks/bench_bert4rec_step.py --smoke
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _util  # noqa: E402  (stdlib only)

VARIANTS = ("power of two", "cloze_size")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=_util.BEAUTY, help="a data file (default: ../shared Beauty)")
    p.add_argument("--optimizer", default="adamw")
    p.add_argument("--batches", type=int, default=12)
    p.add_argument("--rounds", type=int, default=2, help="passes over the batches")
    p.add_argument("--cpu", type=int, default=0)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.smoke:
        args.batches, args.rounds = 2, 1
    _util.limit_threads(args.cpu)

    import jax
    import numpy as np

    from sevo_jax import training

    info = _util.machine_info()
    print(_util.machine_line(info))
    ds, source = _util.model_data(args.data, args.smoke)
    cfg = training.TrainConfig(model="bert4rec", optimizer=args.optimizer, progress=False,
                               pack_rows=False, **source).resolved()  # measured unpacked
    model, tx, params, state = training.init_training(cfg, ds)
    loss_fn = training.make_loss_fn(cfg, model)
    examples = training.training_examples(cfg, ds)
    batches = []
    for batch in examples.epoch_batches(training.NegativeSampler(ds), cfg.batch_size,
                                        np.random.default_rng(0)):
        batches.append(batch)
        if len(batches) == args.batches:
            break

    def padded(batch, how):
        if how == "cloze_size":
            return batch
        real = int(np.count_nonzero(batch["cloze_labels"]))
        size = max(64, 1 << (max(real, 1) - 1).bit_length())
        out = dict(batch)
        for k in ("cloze_index", "cloze_labels"):
            out[k] = np.pad(batch[k][:real], (0, size - real))
        return out

    train_step = _util.undonated_train_step(loss_fn, tx)

    key = jax.random.PRNGKey(0)
    steps, inputs = {}, {}
    for name in VARIANTS:
        inputs[name] = [jax.device_put(padded(b, name)) for b in batches]
        jitted = jax.jit(train_step)
        compiled = {}
        for b in inputs[name]:
            shape = b["cloze_index"].shape
            if shape not in compiled:
                compiled[shape] = jitted.lower(params, state, b, key).compile()
        steps[name] = compiled

    def run(name, i):
        b = inputs[name][i]
        return steps[name][b["cloze_index"].shape](params, state, b, key)

    def loss_and_grads(name):
        out = jax.jit(jax.value_and_grad(loss_fn))(params, inputs[name][0], key)
        loss, grads = jax.block_until_ready(out)
        return float(loss), np.concatenate([np.ravel(g) for g in jax.tree_util.tree_leaves(grads)])

    ref_loss, ref_grads = loss_and_grads("power of two")
    scale = float(np.max(np.abs(ref_grads)))
    agreement = {}
    for name in VARIANTS:
        loss, grads = loss_and_grads(name)
        diff = float(np.max(np.abs(grads - ref_grads))) / scale
        agreement[name] = (loss, abs(loss - ref_loss), diff)
        print(f"{name}: loss {loss:.7f}; |loss - a power of two's| {agreement[name][1]:.1e}; "
              f"max |gradient - a power of two's| / max |gradient| {diff:.1e}")
        if agreement[name][1] > 1e-5 * abs(ref_loss) or diff > 1e-5:
            raise SystemExit(f"{name} does not agree with the power-of-two padding")

    for name in VARIANTS:  # warm-up: every compiled step runs once before timing
        for i in range(len(batches)):
            jax.block_until_ready(run(name, i))
    times = {name: [] for name in VARIANTS}
    order = list(VARIANTS)
    for r in range(args.rounds):
        for i in range(len(batches)):
            for name in (order if (i + r) % 2 == 0 else order[::-1]):
                t = time.process_time()
                jax.block_until_ready(run(name, i))
                times[name].append(time.process_time() - t)
    base = statistics.mean(times["power of two"])
    rows = []
    for name in VARIANTS:
        ratios = [a / b for a, b in zip(times[name], times["power of two"], strict=True)]
        widths = sorted({int(b["cloze_index"].shape[0]) for b in inputs[name]})
        rows.append([name, ", ".join(map(str, widths)), len(steps[name]),
                     f"{1e3 * statistics.mean(times[name]):.0f} ms",
                     f"{statistics.mean(times[name]) / base:.3f}",
                     f"{statistics.median(ratios):.3f}"])
    real = statistics.mean(int(np.count_nonzero(b["cloze_labels"])) for b in batches)
    print(f"\n{len(batches)} batches of {cfg.batch_size} x {cfg.maxlen}, {real:.0f} masked "
          f"positions per batch on average; {args.optimizer}; load average at the end: "
          f"{os.getloadavg()}\n")
    print(_util.markdown_table(
        ["cloze positions padded to", "padded widths", "compiles",
         "step (CPU, mean)", "ratio of means", "median per-batch ratio"], rows))
    _util.write_json(args.json, {"machine": info, "agreement": agreement,
                                 "times": times, "args": vars(args)})


if __name__ == "__main__":
    main()
