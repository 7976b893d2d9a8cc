"""The trainer's step with glibc's default malloc against ``host_memory.keep_freed_memory``.

Each model's step runs in fresh subprocesses, one per setting (the settings are process-wide and
must precede JAX's threads), alternating A B / B A over ``--rounds``: the trainer's donated step
(``training.make_train_step``, reference Beauty defaults, ``--optimizer``) on the first
``--batches`` batches of an epoch, every shape compiled and run once first, then timed over
``--passes`` passes: process CPU time per step, minor page faults per step, peak RSS; then one
full-ranking validation pass (``training.evaluate``, compiled by a first pass). Before
timing, each subprocess checks that its first step's loss equals the other setting's (the same
programme on the same batch: the allocator cannot change a value).

Usage::

    python benchmarks/bench_host_memory.py --data ../shared/data/amazon-beauty/Beauty.txt --cpu 1
    python benchmarks/bench_host_memory.py --smoke
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _util  # noqa: E402  (stdlib only)

SETTINGS = ("glibc default", "keep_freed_memory")


def child(args) -> None:
    _util.limit_threads(args.cpu, xla=False)  # XLA's own threads, as sevo-train runs
    from sevo_jax import host_memory

    applied = host_memory.keep_freed_memory() if args.child == SETTINGS[1] else False
    if args.child == SETTINGS[1] and not applied:
        raise SystemExit("bench_host_memory: keep_freed_memory() did not apply (not glibc?)")

    import jax
    import numpy as np

    from sevo_jax import training

    ds, source = _util.model_data(args.data, args.smoke)
    if not training.reads_maxlen(args.model, optimizer=args.optimizer):  # TrainConfig refuses it
        source.pop("maxlen", None)
    cfg = training.TrainConfig(model=args.model, optimizer=args.optimizer, progress=False,
                               **source).resolved()
    model, tx, params, state = training.init_training(cfg, ds)
    it = training.training_examples(cfg, ds).epoch_batches(
        training.NegativeSampler(ds), cfg.batch_size, np.random.default_rng(0))
    batches = [jax.device_put(b) for _, b in zip(range(args.batches), it)]
    step = training.make_train_step(training.make_loss_fn(cfg, model), tx)
    key = jax.random.PRNGKey(0)
    first_loss = None
    for b in batches:  # compile every shape
        params, state, loss = step(params, state, b, key)
        first_loss = float(loss) if first_loss is None else first_loss
    jax.block_until_ready(params)
    times, faults = [], 0
    for _ in range(args.passes):
        for b in batches:
            f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.process_time()
            params, state, loss = step(params, state, b, key)
            jax.block_until_ready(loss)
            times.append(time.process_time() - t0)
            faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    scorer = training.make_scorer(cfg, model)
    training.evaluate(cfg, scorer, params, ds, "valid")  # compile
    f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.process_time()
    training.evaluate(cfg, scorer, params, ds, "valid")
    eval_s = time.process_time() - t0
    eval_faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    print(json.dumps({"times": times, "faults_per_step": faults / len(times),
                      "first_loss": first_loss, "eval_seconds": eval_s,
                      "eval_faults": eval_faults, "peak_rss_gb": _util.peak_rss_gb()}))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=_util.BEAUTY, help="a data file (default: ../shared Beauty)")
    p.add_argument("--models", default=None,
                   help="comma list (default: sasrec,gru4rec,bert4rec,stosa,mfbpr; --smoke: mfbpr)")
    p.add_argument("--optimizer", default="sevo-adamw")
    p.add_argument("--batches", type=int, default=12)
    p.add_argument("--passes", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2, help="subprocess pairs per model")
    p.add_argument("--cpu", type=int, default=0)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--json", default=None)
    p.add_argument("--child", choices=SETTINGS, default=None, help=argparse.SUPPRESS)
    p.add_argument("--model", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.batches, args.passes, args.rounds = 2, 1, 1
    args.models = args.models or ("mfbpr" if args.smoke else "sasrec,gru4rec,bert4rec,stosa,mfbpr")
    if args.child:
        return child(args)

    info = _util.machine_info()
    print(_util.machine_line(info))
    env = {k: v for k, v in os.environ.items() if k != "SEVO_JAX_KEEP_MALLOC"}
    record: dict = {"machine": info, "args": vars(args), "models": {}}
    rows = []
    for m in args.models.split(","):
        runs: dict = {s: [] for s in SETTINGS}
        for r in range(args.rounds):
            for setting in (SETTINGS if r % 2 == 0 else SETTINGS[::-1]):
                cmd = [sys.executable, os.path.abspath(__file__), "--child", setting,
                       "--model", m, "--optimizer", args.optimizer, "--data", args.data,
                       "--batches", str(args.batches), "--passes", str(args.passes),
                       "--cpu", str(args.cpu)] + (["--smoke"] if args.smoke else [])
                out = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if out.returncode != 0:
                    raise SystemExit(f"bench_host_memory: {m}, {setting}: "
                                     f"{out.stderr.strip().splitlines()[-1:]}")
                runs[setting].append(json.loads(out.stdout.strip().splitlines()[-1]))
        losses = {run["first_loss"] for s in SETTINGS for run in runs[s]}
        loss_diff = (max(losses) - min(losses)) / abs(min(losses))
        if loss_diff > 1e-6:
            raise SystemExit(f"bench_host_memory: {m}: the first step's loss differs between "
                             f"the settings ({sorted(losses)})")
        mean = {s: statistics.mean(t for run in runs[s] for t in run["times"]) for s in SETTINGS}
        fault = {s: statistics.mean(run["faults_per_step"] for run in runs[s]) for s in SETTINGS}
        rss = {s: max(run["peak_rss_gb"] for run in runs[s]) for s in SETTINGS}
        ev = {s: statistics.mean(run["eval_seconds"] for run in runs[s]) for s in SETTINGS}
        ev_faults = {s: statistics.mean(run["eval_faults"] for run in runs[s]) for s in SETTINGS}
        rows.append([m, f"{1e3 * mean[SETTINGS[0]]:.1f} ms", f"{1e3 * mean[SETTINGS[1]]:.1f} ms",
                     f"**{mean[SETTINGS[1]] / mean[SETTINGS[0]]:.2f}**",
                     f"{fault[SETTINGS[0]]:,.0f} / {fault[SETTINGS[1]]:,.0f}",
                     f"{rss[SETTINGS[0]]:.2f} / {rss[SETTINGS[1]]:.2f}",
                     f"{ev[SETTINGS[0]]:.2f} s / {ev[SETTINGS[1]]:.2f} s",
                     f"**{ev[SETTINGS[1]] / ev[SETTINGS[0]]:.2f}**",
                     f"{ev_faults[SETTINGS[0]]:,.0f} / {ev_faults[SETTINGS[1]]:,.0f}",
                     f"{loss_diff:.0e}"])
        record["models"][m] = {"runs": runs, "loss_diff": loss_diff}
    print(f"\n{args.optimizer} step, {args.batches} batches x {args.passes} passes x "
          f"{args.rounds} subprocess pairs per model; load average at the end: "
          f"{os.getloadavg()}\n")
    print(_util.markdown_table(
        ["model", "step, glibc default (CPU, mean)", "step, keep_freed_memory", "ratio",
         "minor page faults per step (default / kept)", "peak RSS GB (default / kept)",
         "validation pass (CPU, default / kept)", "ratio", "its page faults (default / kept)",
         "first-step loss difference"], rows))
    _util.write_json(args.json, record)


if __name__ == "__main__":
    main()
