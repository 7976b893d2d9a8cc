"""The trainer's train step with dropout words from ``jax.random.bits`` vs ``threefry_bits``.

JAX lowers its threefry hash on CPU as a rolled 5-step loop (each step writes the whole
arrays to memory); ``sevo_jax.models.threefry_bits`` unrolls the same 20 rounds so XLA fuses
them into the mask. Same words, so the same masks, losses and updates (checked: the first
step's loss and every updated parameter must be equal, bit for bit). For each of ``--models``
(Beauty defaults, AdamW): XLA's compile of the step (CPU s, a fresh ``jit`` and
``jax.clear_caches()`` each time) and the steady step (CPU ms, median of ``--steps`` calls),
variants alternating over ``--rounds``; also the raw words, ``--words`` of them, alone.

Usage::

    taskset -c 0 python benchmarks/bench_dropout_words.py \\
        --data ../shared/data/amazon-beauty/Beauty.txt
    python benchmarks/bench_dropout_words.py --smoke
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _util  # noqa: E402  (stdlib only)

VARIANTS = ("jax.random.bits", "threefry_bits")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="a data file (required unless --smoke)")
    p.add_argument("--models", nargs="+", default=None,
                   help="default: sasrec gru4rec bert4rec stosa (--smoke: sasrec gru4rec, the "
                        "16-bit masks and the 32-bit ones drawn under vmap)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--words", type=int, default=4_000_000)
    p.add_argument("--cpu", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="tiny synthetic data (seconds)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.data is None and not args.smoke:
        p.error("--data is required (or --smoke)")
    _util.limit_threads(args.cpu)
    import jax
    import jax.numpy as jnp
    import numpy as np

    from sevo_jax import models, training

    info = _util.machine_info()
    print(_util.machine_line(info))
    ds, source = _util.model_data(args.data, args.smoke)
    if args.smoke:
        args.rounds, args.steps, args.words = 1, 2, 10_000
        args.models = args.models or ["sasrec", "gru4rec"]
    args.models = args.models or ["sasrec", "gru4rec", "bert4rec", "stosa"]
    unrolled = models.threefry_bits
    draw = {"jax.random.bits": lambda key, size: jax.random.bits(key, (size,), jnp.uint32),
            "threefry_bits": unrolled}
    key = jax.random.PRNGKey(0)

    words: dict[str, list[float]] = {v: [] for v in VARIANTS}
    fns = {v: jax.jit(lambda k, f=draw[v]: f(k, args.words)) for v in VARIANTS}
    same_words = bool((fns[VARIANTS[0]](key) == fns[VARIANTS[1]](key)).all())
    for r in range(args.rounds):
        for v in VARIANTS if r % 2 == 0 else VARIANTS[::-1]:
            t0 = time.process_time()
            for _ in range(args.steps):
                fns[v](key).block_until_ready()
            words[v].append((time.process_time() - t0) / args.steps)
    rows = [["(words alone)", v, "", f"{np.median(ts) * 1e3:.2f} ms", ""] for v, ts in
            words.items()]
    result: dict = {"machine": info, "same_words": same_words, "words": args.words,
                    "words_s": {v: float(np.median(ts)) for v, ts in words.items()}}
    try:
        for name in args.models:
            cfg = _util.unpacked(training.TrainConfig(  # measured unpacked
                model=name, optimizer="adamw", progress=False, **source).resolved())
            model, tx, params, state = training.init_training(cfg, ds)
            batch = next(training.training_examples(cfg, ds).epoch_batches(
                training.NegativeSampler(ds), cfg.batch_size, np.random.default_rng(0)))
            loss_fn = training.make_loss_fn(cfg, model)
            compile_s: dict[str, list[float]] = {v: [] for v in VARIANTS}
            step_s: dict[str, list[float]] = {v: [] for v in VARIANTS}
            first: dict = {}
            for r in range(args.rounds):
                for v in VARIANTS if r % 2 == 0 else VARIANTS[::-1]:
                    models.threefry_bits = draw[v]  # dropout_keep looks it up when traced
                    jax.clear_caches()
                    lowered = training.make_train_step(loss_fn, tx).trace(
                        params, state, batch, key).lower()
                    t0 = time.process_time()
                    program = lowered.compile()
                    compile_s[v].append(time.process_time() - t0)
                    p_, s_ = jax.tree.map(jnp.copy, (params, state))
                    p_, s_, loss = program(p_, s_, batch, key)
                    first.setdefault(v, (float(loss), jax.tree.map(np.asarray, p_)))
                    for _ in range(args.steps):
                        t0 = time.process_time()
                        p_, s_, loss = program(p_, s_, batch, key)
                        jax.block_until_ready(loss)
                        step_s[v].append(time.process_time() - t0)
            (loss_a, params_a), (loss_b, params_b) = (first[v] for v in VARIANTS)
            same = loss_a == loss_b and all(
                np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params_a),
                                                     jax.tree.leaves(params_b), strict=True))
            if not same:
                raise SystemExit(f"bench_dropout_words: {name}: the two variants' first steps "
                                 "differ (they must draw the same words)")
            base_c, base_s = (float(np.median(d[VARIANTS[0]])) for d in (compile_s, step_s))
            result[name] = {"same_first_step": same}
            for v in VARIANTS:
                c, s = float(np.median(compile_s[v])), float(np.median(step_s[v]))
                rows.append([name, v, f"{c:.2f} s ({c / base_c:.2f})",
                             f"{s * 1e3:.0f} ms ({s / base_s:.2f})", "yes"])
                result[name][v] = {"compile_s": c, "step_s": s}
    finally:
        models.threefry_bits = unrolled
    print(_util.markdown_table(["model", "dropout words", "XLA compile (CPU, ratio)",
                                "step (CPU, ratio)", "same first step"], rows))
    print(f"{args.words:,} words alone: the same words: {same_words}")
    print("load average at the end:", os.getloadavg())
    _util.write_json(args.json, result)


if __name__ == "__main__":
    main()
