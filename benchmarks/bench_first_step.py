"""Issue 14: the first training step's time (and where it goes) and evaluation compiles.

Three parts, each in this process pinned to one core (``--cpu``), SASRec (or ``--model``) on
Beauty (or a tiny synthetic set with ``--smoke``):

* ``eval``: a validation plus a test pass of full-ranking evaluation, three ways, each with a
  FRESH jitted scorer: the seen-items list padded per batch to the batch's own power of two
  (before: one compile per new width), ``training.evaluate`` (one width per data set and a fixed
  batch: one compile), and a host-built ``(B, N)`` bool mask per batch. Reports compiles
  (``_cache_size()``), the first (compiling) valid + test wall and CPU seconds, the warm valid
  pass (median over ``--rounds``, variants alternating), and checks the three give the same
  metrics to the last digit.
* ``step``: the first train step of AdamW and SEvo-AdamW split into trace, lower, XLA compile
  and first execution, then XLA:CPU compile options (``compiler_options=``, ``--options``
  picks some of ``COMPILE_OPTIONS``) against the default: compile CPU seconds and the steady
  step (a fresh jit and ``jax.clear_caches()`` before each compile, variants alternating over
  ``--rounds``).
* ``cache``: ``init_training`` plus the first step (as ``training.fit`` builds them) in fresh
  subprocesses: without the persistent compilation cache, with an empty cache (a first run) and
  with the cache it filled (every later run and resume).

CPU seconds (``time.process_time``) are reported beside wall seconds: on a shared core they are
the steadier number. Usage::

    taskset -c 0 python benchmarks/bench_first_step.py \\
        --beauty ../shared/data/amazon-beauty/Beauty.txt
    python benchmarks/bench_first_step.py --smoke
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from benchmarks import _util  # noqa: E402

COMPILE_OPTIONS = {
    "default": None,
    "llvm O1": {"xla_backend_optimization_level": 1},
    "no expensive LLVM passes": {"xla_llvm_disable_expensive_passes": True},
    "both": {"xla_backend_optimization_level": 1, "xla_llvm_disable_expensive_passes": True},
    "no fusion emitters": {"xla_cpu_use_fusion_emitters": False},
    "codegen in 1 part": {"xla_cpu_parallel_codegen_split_count": 1},
    "no concurrency scheduler": {"xla_cpu_enable_concurrency_optimized_scheduler": False},
}
SMOKE_OPTIONS = ("default", "both")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--beauty", default=os.path.join(os.path.dirname(HERE), "..", "shared", "data",
                                                    "amazon-beauty", "Beauty.txt"))
    p.add_argument("--parts", default="eval,step,cache")
    p.add_argument("--model", default="sasrec", help="the model (training.TrainConfig.model)")
    p.add_argument("--optimizers", default="adamw,sevo-adamw")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--options", default=None,
                   help="comma-separated names of COMPILE_OPTIONS to time (default: all)")
    p.add_argument("--cpu", type=int, default=0, help="pin to this core (-1: do not pin)")
    p.add_argument("--smoke", action="store_true", help="tiny synthetic data, one round")
    p.add_argument("--json", default=None)
    p.add_argument("--first-step-child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


class Clock:
    """``with Clock() as c: ...`` then ``c.wall`` and ``c.cpu`` seconds."""

    def __enter__(self):
        self._w, self._c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self._w
        self.cpu = time.process_time() - self._c
        return False


def setup(args, optimizer="adamw"):
    from sevo_jax import data as data_lib
    from sevo_jax import training

    if args.smoke:
        ds = data_lib.synthetic(num_users=300, num_items=400, seq_len=(3, 80), seed=0)
        cfg = training.TrainConfig(model=args.model, optimizer=optimizer, maxlen=20, features=16,
                                   batch_size=64, eval_batch_size=8, progress=False)
    else:
        ds = _util.load_data(args.beauty, "seqtxt")
        cfg = training.TrainConfig(model=args.model, data=args.beauty, format="seqtxt",
                                   optimizer=optimizer, progress=False)
    return ds, cfg.resolved()


# ---- eval ---------------------------------------------------------------------------------------


def eval_part(args) -> dict:
    import jax
    import numpy as np

    from sevo_jax import metrics as metrics_lib
    from sevo_jax import training

    ds, cfg = setup(args)
    model, _, params, _ = training.init_training(cfg, ds)

    def per_batch_width(scorer, split):  # the evaluation before issue 14's fix
        inputs = training.eval_inputs(cfg, ds, split)
        targets = (ds.valid if split == "valid" else ds.test).astype(np.int32)
        seen, acc, bs = ds.seen_items(split), metrics_lib.MetricAccumulator(), cfg.eval_batch_size
        for start in range(0, ds.num_users, bs):
            rows = np.arange(start, min(start + bs, ds.num_users))
            batch_rows = np.concatenate([rows, np.zeros(bs - rows.size, rows.dtype)])
            acc.update(scorer(params, inputs[batch_rows], targets[batch_rows],
                              training.padded_rows(seen, batch_rows)),
                       mask=np.arange(bs) < rows.size)
        return acc.compute()

    def host_mask_scorer():
        def score(params, inputs, targets, exclude):
            variables = {"params": params}
            user = model.apply(variables, inputs, deterministic=True)[:, -1]
            scores = model.apply(variables, user, method="score_all")
            return metrics_lib.ranking_metrics(metrics_lib.target_ranks(scores, targets, exclude))
        return jax.jit(score)

    def host_mask(scorer, split):
        inputs = training.eval_inputs(cfg, ds, split)
        targets = (ds.valid if split == "valid" else ds.test).astype(np.int32)
        seen, acc = ds.seen_items(split), metrics_lib.MetricAccumulator()
        bs = min(cfg.eval_batch_size, ds.num_users)
        for start in range(0, ds.num_users, bs):
            rows = np.arange(start, min(start + bs, ds.num_users))
            batch_rows = np.concatenate([rows, np.zeros(bs - rows.size, rows.dtype)])
            acc.update(scorer(params, inputs[batch_rows], targets[batch_rows],
                              seen[batch_rows].toarray()), mask=np.arange(bs) < rows.size)
        return acc.compute()

    def now(scorer, split):
        return training.evaluate(cfg, scorer, params, ds, split)

    def library_scorer():
        return training.make_scorer(cfg, model, num_items=ds.num_items)

    variants = {
        "per-batch width (before)": (per_batch_width, library_scorer),
        "one width per data set (now)": (now, library_scorer),
        "host-built bool mask": (host_mask, host_mask_scorer),
    }
    out: dict = {}
    scorers = {}
    for name, (run, make) in variants.items():
        scorer = make()
        with Clock() as c:
            metrics = {split: run(scorer, split) for split in ("valid", "test")}
        scorers[name] = scorer
        out[name] = {"first_wall_s": c.wall, "first_cpu_s": c.cpu, "compiles": scorer._cache_size(),
                     "metrics": metrics, "warm_wall_s": [], "warm_cpu_s": []}
    names = list(variants)
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            with Clock() as c:
                variants[name][0](scorers[name], "valid")
            out[name]["warm_wall_s"].append(c.wall)
            out[name]["warm_cpu_s"].append(c.cpu)
    reference = out[names[0]]["metrics"]
    for name in names[1:]:
        if out[name]["metrics"] != reference:
            raise SystemExit(f"{name} metrics differ from {names[0]}: {out[name]['metrics']} vs "
                             f"{reference}")
    return {"users": ds.num_users, "items": ds.num_items, "batch": cfg.eval_batch_size,
            "width": training.exclusion_width(ds), "variants": out}


# ---- step ---------------------------------------------------------------------------------------


def step_inputs(args, optimizer):
    import jax
    import numpy as np

    from sevo_jax import training

    ds, cfg = setup(args, optimizer)
    model, tx, params, state = training.init_training(cfg, ds)
    batch = next(training.training_examples(cfg, ds).epoch_batches(
        training.NegativeSampler(ds), cfg.batch_size, np.random.default_rng(0)))
    return cfg, model, tx, params, state, batch, jax.random.PRNGKey(0)


def step_part(args) -> dict:
    import jax
    import jax.numpy as jnp

    from sevo_jax import training

    results = {}
    for optimizer in args.optimizers.split(","):
        cfg, model, tx, params, state, batch, key = step_inputs(args, optimizer)
        step = training.make_train_step(training.make_loss_fn(cfg, model), tx)
        fresh = jax.tree.map(jnp.copy, (params, state))
        row: dict = {}
        with Clock() as c:
            traced = step.trace(params, state, batch, key)
        row["trace"] = (c.wall, c.cpu)
        with Clock() as c:
            lowered = traced.lower()
        row["lower"] = (c.wall, c.cpu)
        with Clock() as c:
            compiled = lowered.compile()
        row["compile"] = (c.wall, c.cpu)
        with Clock() as c:
            jax.block_until_ready(compiled(*fresh, batch, key))
        row["first run"] = (c.wall, c.cpu)
        wanted = SMOKE_OPTIONS if args.smoke else (
            args.options.split(",") if args.options else list(COMPILE_OPTIONS))
        chosen = {k: v for k, v in COMPILE_OPTIONS.items() if k == "default" or k in wanted}
        if args.options and len(chosen) != len(set(wanted) | {"default"}):
            raise SystemExit(f"--options: unknown name in {args.options!r}; known: "
                             f"{', '.join(COMPILE_OPTIONS)}")
        options: dict = {name: {"compile_cpu_s": [], "step_cpu_s": [], "step_wall_s": []}
                         for name in chosen}
        names = list(chosen)
        for r in range(args.rounds):
            for name in names if r % 2 == 0 else names[::-1]:
                jax.clear_caches()  # and a fresh jit: else the same options hit the cache
                fresh_step = training.make_train_step(training.make_loss_fn(cfg, model), tx)
                lowered = fresh_step.trace(params, state, batch, key).lower()
                with Clock() as c:
                    program = lowered.compile(compiler_options=chosen[name])
                options[name]["compile_cpu_s"].append(c.cpu)
                p, s = jax.tree.map(jnp.copy, (params, state))
                p, s, loss = program(p, s, batch, key)
                jax.block_until_ready(loss)
                for _ in range(3):
                    with Clock() as c:
                        p, s, loss = program(p, s, batch, key)
                        jax.block_until_ready(loss)
                    options[name]["step_cpu_s"].append(c.cpu)
                    options[name]["step_wall_s"].append(c.wall)
        results[optimizer] = {"breakdown": row, "options": options}
    return results


# ---- persistent cache ----------------------------------------------------------------------------


def first_step_child(args) -> dict:
    """In a fresh process: ``init_training`` and the first step as ``fit`` builds them."""
    import jax
    import numpy as np

    from sevo_jax import training

    if args.first_step_child != "off":
        training.enable_compile_cache(args.first_step_child)
    ds, cfg = setup(args, args.optimizers.split(",")[0])
    with Clock() as total:
        model, tx, params, state = training.init_training(cfg, ds)
        jax.block_until_ready(state)
        batch = next(training.training_examples(cfg, ds).epoch_batches(
            training.NegativeSampler(ds), cfg.batch_size, np.random.default_rng(0)))
        step = training.make_train_step(training.make_loss_fn(cfg, model), tx)
        with Clock() as first:
            jax.block_until_ready(step(params, state, batch, jax.random.PRNGKey(0)))
    return {"init_and_first_step": (total.wall, total.cpu), "first_step": (first.wall, first.cpu)}


def cache_part(args) -> dict:
    results: dict = {}
    with tempfile.TemporaryDirectory() as cache:
        runs = [("no persistent cache", "off"), ("empty cache (first run)", cache),
                ("filled cache (later runs)", cache)]
        for optimizer in args.optimizers.split(","):
            for name, where in runs:
                argv = [sys.executable, __file__, "--first-step-child", where, "--optimizers",
                        optimizer, "--beauty", args.beauty, "--cpu", str(args.cpu),
                        "--model", args.model]
                argv += ["--smoke"] if args.smoke else []
                done = subprocess.run(argv, capture_output=True, text=True, check=False)
                if done.returncode:
                    raise SystemExit(f"child failed: {done.stderr[-2000:]}")
                results[f"{optimizer}, {name}"] = json.loads(done.stdout.strip().splitlines()[-1])
    return results


# ---- report -------------------------------------------------------------------------------------


def report(info, out) -> str:
    med = statistics.median
    parts = [f"Machine: {_util.machine_line(info)}", ""]
    if "eval" in out:
        e = out["eval"]
        parts.append(f"Evaluation: {e['users']} users, {e['items']} items, batch {e['batch']}, "
                     f"seen-items width {e['width']}; metrics identical in all three.")
        rows = []
        base = e["variants"]["per-batch width (before)"]
        for name, v in e["variants"].items():
            rows.append([name, v["compiles"], f"{v['first_wall_s']:.2f} / {v['first_cpu_s']:.2f}",
                         f"{v['first_cpu_s'] / base['first_cpu_s']:.2f}",
                         f"{med(v['warm_wall_s']):.2f} / {med(v['warm_cpu_s']):.2f}",
                         f"{med(v['warm_cpu_s']) / med(base['warm_cpu_s']):.2f}"])
        parts += [_util.markdown_table(
            ["exclusion", "compiles", "valid + test, fresh scorer: wall / CPU s", "CPU ratio",
             "warm valid pass: wall / CPU s", "CPU ratio"], rows), ""]
    if "step" in out:
        for optimizer, r in out["step"].items():
            b = r["breakdown"]
            total = sum(v[1] for v in b.values())
            parts.append(f"First step, {out['model']} {optimizer}: " + ", ".join(
                f"{k} {v[0]:.2f} s wall / {v[1]:.2f} s CPU" for k, v in b.items())
                + f"; CPU total {total:.2f} s")
            base = r["options"]["default"]
            rows = [[name, f"{med(v['compile_cpu_s']):.2f}",
                     f"{med(v['compile_cpu_s']) / med(base['compile_cpu_s']):.2f}",
                     f"{med(v['step_cpu_s']) * 1e3:.0f}",
                     f"{med(v['step_cpu_s']) / med(base['step_cpu_s']):.2f}"]
                    for name, v in r["options"].items()]
            parts += [_util.markdown_table(["XLA:CPU compile options", "compile CPU s", "ratio",
                                            "step CPU ms", "ratio"], rows), ""]
    if "cache" in out:
        rows = [[name, f"{v['init_and_first_step'][0]:.2f} / {v['init_and_first_step'][1]:.2f}",
                 f"{v['first_step'][0]:.2f} / {v['first_step'][1]:.2f}"]
                for name, v in out["cache"].items()]
        parts += [_util.markdown_table(["persistent compilation cache",
                                        "init + first step: wall / CPU s",
                                        "first step: wall / CPU s"], rows), ""]
    return "\n".join(parts)


def main(argv=None) -> None:
    args = parse_args(argv)
    _util.limit_threads(None if args.cpu < 0 else args.cpu)
    if args.smoke:  # a few seconds of compiling: one optimizer, one round, no subprocesses
        args.rounds, args.optimizers = 1, args.optimizers.split(",")[0]
        args.parts = ",".join(p for p in args.parts.split(",") if p != "cache")
    if args.first_step_child is not None:
        print(json.dumps(first_step_child(args)))
        return
    out = {}
    parts = args.parts.split(",")
    if "eval" in parts:
        out["eval"] = eval_part(args)
    if "step" in parts:
        out["step"] = step_part(args)
    if "cache" in parts:
        out["cache"] = cache_part(args)
    info = _util.machine_info()
    out["model"] = args.model
    _util.write_json(args.json, {"machine": info, **out})
    print(report(info, out))


if __name__ == "__main__":
    main()
