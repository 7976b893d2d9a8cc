"""End-to-end SASRec train step: SEvo-AdamW vs AdamW, side by side (target: ratio <= 1.15).

What is timed is the library's own jitted training step (``sevo_jax.training.make_train_step``:
loss and gradient of SASRec, then the optimizer update, params and state donated), built from
``TrainConfig`` defaults (spec §4): d = 64, 2 blocks, 1 head, maxlen 50, batch 512, dropout 0.3,
lr 1e-3, betas (0.9, 0.98), weight decay 0.1, SEvo beta 0.99, L = 3, neumann. Two tables:

* ``beauty``: 12,102 rows (12,101 items + padding), the co-occurrence graph (H = 1) of the
  real ``../shared/data/amazon-beauty/Beauty.txt`` training split and real batches from it
  (shuffled sequences, sampled negatives); without the file, a synthetic power-law
  co-occurrence graph of the same size and nnz (``graphs.powerlaw_cooccurrence``) and
  synthetic batches;
* ``1m``: 1,000,000 rows, a synthetic power-law co-occurrence graph with ~20M stored non-zeros
  (``--rows-1m`` / ``--nnz-1m`` to change), synthetic batches (Zipf item ids, random lengths).

Per table, ONE worker process builds the model, graph and both optimizers and times them side
by side: repetitions interleaved (AdamW, SEvo, then SEvo, AdamW, ...), each repetition
``--steps`` consecutive steps ended by ``block_until_ready``, warm-up (compilation + 2 steps)
excluded; the ratio is the median over repetitions of SEvo time / AdamW time of the same
repetition. Batches are prepared and put on the device before timing (host-side batching and
negative sampling are not in the step). Memory, per configuration:

* ``peak RSS``: the worker process's peak resident set, ``VmHWM`` from /proc/self/status on
  Linux, else ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (both are in ``--json``; Linux
  carries ``ru_maxrss`` over fork + exec, so a child reports at least its parent's peak, which
  is why the driver stays small and the graphs are generated in their own process). The timing
  worker holds both optimizers, so (unless ``--no-memory-split``) one more worker per optimizer
  runs just init + compile + 3 steps and reports its own peak;
* ``XLA step memory``: the compiled step's ``memory_analysis()`` (arguments + outputs + temps
  - aliased), a device-independent figure of what one step needs on the device;
* ``device peak``: ``peak_bytes_in_use`` of ``device.memory_stats()`` where the backend has it
  (GPU/TPU; not CPU).

Device-agnostic: runs on whatever ``jax.devices()[0]`` is (GPU if the CUDA jaxlib is
installed); SEvo's sparse matmul picks its implementation by backend.

Usage::

    python benchmarks/bench_train_step.py > /tmp/bench_train_step.md      # full, ~10-20 min on 2 cores
    python benchmarks/bench_train_step.py --sizes beauty --repeats 9       # Beauty only
    python benchmarks/bench_train_step.py --smoke                          # CI, < 20 s (XLA -O0)
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
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import _util  # noqa: E402  (stdlib only)

DEFAULT_BEAUTY = REPO.parent / "shared" / "data" / "amazon-beauty" / "Beauty.txt"
OPTIMIZERS = ("adamw", "sevo-adamw")
RESULT_TAG = "RESULT "


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="beauty,1m", help="comma list of tables: beauty, 1m")
    p.add_argument("--beauty", default=str(DEFAULT_BEAUTY), help="Beauty.txt (seqtxt format)")
    p.add_argument("--rows-1m", type=lambda s: int(float(s)), default=1_000_000)
    p.add_argument("--nnz-1m", type=lambda s: int(float(s)), default=20_000_000)
    p.add_argument("--alpha", type=float, default=1.0, help="Zipf exponent of synthetic graphs")
    p.add_argument("--repeats", type=int, default=None, help="timed repetitions per optimizer "
                   "(default 7 for beauty, 5 for 1m)")
    p.add_argument("--steps", type=int, default=None, help="steps per repetition "
                   "(default 10 for beauty, 3 for 1m)")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--maxlen", type=int, default=50)
    p.add_argument("--features", type=int, default=64)
    p.add_argument("--num-blocks", type=int, default=2)
    p.add_argument("--no-memory-split", action="store_true",
                   help="skip the per-optimizer memory workers")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, in-process, < 20 s")
    p.add_argument("--json", default=None, help="write the raw numbers here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--make-graph", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---- worker: runs in its own process per table (or in-process under --smoke) ------------------


def _rss_gb() -> float:
    """This process's peak RSS: ``VmHWM`` of /proc/self/status where it exists, else
    ``ru_maxrss``. (Linux keeps ``ru_maxrss`` across fork + exec, so a worker would report at
    least its parent's peak; ``VmHWM`` belongs to the new address space.)"""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024**2
    except OSError:
        pass
    return _util.peak_rss_gb()


def _device_peak_gb():
    import jax

    try:
        stats = jax.local_devices()[0].memory_stats()
    except Exception:  # noqa: BLE001  (backends without the API)
        stats = None
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return stats["peak_bytes_in_use"] / 1024**3


def _synthetic_batches(rows, count, batch_size, maxlen, alpha, seed):
    """``count`` SASRec batches: random lengths in [2, maxlen], Zipf item ids in 1..rows-1,
    inputs s[:-1], targets s[1:], uniform negatives; left-padded with 0 like the trainer's."""
    import numpy as np

    import graphs

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        lengths = rng.integers(2, maxlen + 2, size=batch_size)
        ids = 1 + graphs.zipf_items(rng, rows - 1, batch_size * (maxlen + 1), alpha)
        seq = ids.reshape(batch_size, maxlen + 1)
        keep = np.arange(maxlen + 1)[None, :] >= (maxlen + 1 - lengths)[:, None]
        seq = np.where(keep, seq, 0).astype(np.int32)
        targets = seq[:, 1:]
        negatives = rng.integers(1, rows, size=targets.shape).astype(np.int32)
        out.append({"inputs": seq[:, :-1], "targets": targets,
                    "negatives": np.where(targets > 0, negatives, 0).astype(np.int32)})
    return out


def run_worker(spec: dict) -> dict:
    """Build one table's model/graph/batches, then time (or just run) the given optimizers."""
    t_start = time.perf_counter()
    import jax
    import jax.numpy as jnp
    import numpy as np
    import scipy.sparse as sp

    from sevo_jax import data as data_lib
    from sevo_jax import models, training

    rss = {}
    opts = spec["optimizers"]
    cfg = {o: training.TrainConfig(model="sasrec", optimizer=o, maxlen=spec["maxlen"],
                                   features=spec["features"], num_blocks=spec["num_blocks"],
                                   batch_size=spec["batch_size"], progress=False).resolved()
           for o in opts}
    base = cfg[opts[0]]
    num_batches = 4
    if spec["source"] == "beauty":
        ds = _util.load_data(spec["beauty"], "seqtxt")
        rows = ds.num_items + 1
        adjacency = training.build_graph(base, ds)
        examples = training.training_examples(base, ds)
        batches = []
        it = examples.epoch_batches(training.NegativeSampler(ds), base.batch_size,
                                    np.random.default_rng([0, 1]))
        for _ in range(num_batches):
            batches.append(next(it))
    else:
        adjacency = sp.load_npz(spec["graph_npz"]).tocsr()
        rows = adjacency.shape[0]
        batches = _synthetic_batches(rows, num_batches, base.batch_size, base.maxlen,
                                     spec["alpha"], seed=1)
    nnz = int(adjacency.nnz)
    batches = [jax.device_put({k: jnp.asarray(v) for k, v in b.items()}) for b in batches]
    rss["data"] = _rss_gb()
    t_data = time.perf_counter() - t_start

    model = models.SASRec(rows - 1, base.maxlen, base.features, base.num_blocks, base.num_heads,
                          base.dropout)
    init = lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, base.maxlen), jnp.int32),
                              deterministic=True)["params"]
    keys = list(jax.random.split(jax.random.PRNGKey(1), 64))
    runs = {}
    for o in opts:
        optimizer = training.build_optimizer(cfg[o], adjacency if o.startswith("sevo") else None)
        params = init()
        state = optimizer.init(params)
        step = training.make_train_step(training.make_loss_fn(cfg[o], model), optimizer)
        t0 = time.perf_counter()
        compiled = step.lower(params, state, batches[0], keys[0]).compile()
        compile_s = time.perf_counter() - t0
        mem = compiled.memory_analysis()
        step_bytes = None
        if mem is not None:
            step_bytes = (mem.argument_size_in_bytes + mem.output_size_in_bytes
                          + mem.temp_size_in_bytes - mem.alias_size_in_bytes)
        runs[o] = {"fn": compiled, "params": params, "state": state, "compile_s": compile_s,
                   "step_gb": None if step_bytes is None else step_bytes / 1024**3, "times": []}
        rss[f"init+compile {o}"] = _rss_gb()

    def advance(run, count, offset):
        p, s = run["params"], run["state"]
        loss = None
        for k in range(count):
            i = offset + k
            p, s, loss = run["fn"](p, s, batches[i % num_batches], keys[i % len(keys)])
        jax.block_until_ready((p, s, loss))
        run["params"], run["state"] = p, s
        return float(loss)

    for o in opts:  # warm-up (also the first steps' allocations)
        runs[o]["first_loss"] = advance(runs[o], spec["warmup"], 0)
    offset = spec["warmup"]
    for r in range(spec["repeats"]):
        order = opts if r % 2 == 0 else opts[::-1]
        for o in order:
            t0 = time.perf_counter()
            advance(runs[o], spec["steps"], offset)
            runs[o]["times"].append((time.perf_counter() - t0) / spec["steps"])
        offset += spec["steps"]
    rss["end"] = _rss_gb()
    out = {
        "table": spec["table"], "source": spec["source"], "rows": rows, "nnz": nnz,
        "backend": jax.default_backend(), "device": str(jax.devices()[0]),
        "repeats": spec["repeats"], "steps": spec["steps"], "data_s": t_data,
        "peak_rss_gb": _rss_gb(), "ru_maxrss_gb": _util.peak_rss_gb(), "rss_stages_gb": rss,
        "device_peak_gb": _device_peak_gb(), "optimizers": {},
    }
    for o in opts:
        run = runs[o]
        out["optimizers"][o] = {
            "compile_s": run["compile_s"], "step_gb": run["step_gb"],
            "first_loss": run["first_loss"], "times_s": run["times"],
            **(_util.summarize(run["times"]) if run["times"] else {}),
        }
    if len(opts) == 2 and spec["repeats"]:
        a, s = (out["optimizers"][o]["times_s"] for o in OPTIMIZERS)
        ratios = [y / x for x, y in zip(a, s)]
        out["ratio"] = statistics.median(ratios)
        out["ratio_min_max"] = (min(ratios), max(ratios))
    return out


# ---- driver --------------------------------------------------------------------------------------


def make_graph(spec: dict) -> dict:
    """Generate a synthetic power-law co-occurrence graph and save it as .npz."""
    import scipy.sparse as sp

    import graphs

    t0 = time.perf_counter()
    a = graphs.powerlaw_cooccurrence(spec["rows"], spec["nnz_target"], spec["alpha"], seed=0)
    seconds = time.perf_counter() - t0
    sp.save_npz(spec["graph_npz"], a, compressed=False)
    return {"seconds": seconds, "nnz": int(a.nnz), "peak_rss_gb": _rss_gb()}


def _spawn(spec: dict, mode: str = "--worker") -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), mode, json.dumps(spec)]
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": pythonpath}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{mode} {spec['table']} {spec.get('optimizers', '')} failed "
                           f"(exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len(RESULT_TAG):])


def _table_specs(args, tmp: str) -> tuple[list[dict], dict]:
    """One spec per table; synthetic graphs are generated once (in a subprocess, so that this
    process stays small: its peak RSS would be inherited by the workers' ``ru_maxrss``) and
    handed to the workers as .npz."""
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    model = dict(batch_size=args.batch_size, maxlen=args.maxlen, features=args.features,
                 num_blocks=args.num_blocks, alpha=args.alpha, warmup=2)
    gen = {}
    specs = []
    for size in sizes:
        if size == "beauty":
            spec = dict(table="beauty", repeats=args.repeats or 7, steps=args.steps or 10, **model)
            if os.path.exists(args.beauty):
                spec.update(source="beauty", beauty=args.beauty)
            else:  # the real Beauty graph (H = 1): 12,102 nodes, 218,852 stored non-zeros
                rows, nnz = 12_102, 218_852
                spec.update(source="synthetic", rows=rows, nnz_target=nnz)
        elif size == "1m":
            spec = dict(table="1m", repeats=args.repeats or 5, steps=args.steps or 3,
                        source="synthetic", rows=args.rows_1m, nnz_target=args.nnz_1m, **model)
        elif size == "smoke":
            spec = dict(table="smoke", repeats=args.repeats or 3, steps=args.steps or 2,
                        source="synthetic", rows=301, nnz_target=3000, **model)
        else:
            raise SystemExit(f"unknown size {size!r}; use beauty, 1m")
        if spec["source"] == "synthetic":
            spec["graph_npz"] = os.path.join(tmp, f"{spec['table']}.npz")
            print(f"[bench_train_step] {size}: generating the graph ...", file=sys.stderr,
                  flush=True)
            made = make_graph(spec) if args.smoke else _spawn(spec, "--make-graph")
            gen[spec["table"]] = made["seconds"]
        specs.append(spec)
    return specs, gen


def _fmt_gb(x):
    return "-" if x is None else f"{x:.2f}"


def _fmt_ms(x):
    return "-" if x is None else f"{x * 1e3:.1f} ms" if x < 10 else f"{x:.1f} s"


def report(results: list[dict], args, argv, gen_s: dict, info: dict) -> str:
    cmd = "python benchmarks/bench_train_step.py" + ("" if not argv else " " + " ".join(argv))
    lines = ["## SASRec train step: SEvo-AdamW vs AdamW (side by side)", "",
             f"Command: `{cmd}`  ", f"Machine: {_util.machine_line(info)}  ",
             f"Backend: {results[0]['backend']} ({results[0]['device']}); SASRec d={args.features}, "
             f"{args.num_blocks} blocks, maxlen {args.maxlen}, batch {args.batch_size}; spec §4 "
             "optimizer defaults (SEvo beta 0.99, L=3, neumann).", ""]
    headers = ["table", "rows", "graph", "nnz", "AdamW step", "SEvo-AdamW step",
               "ratio SEvo/AdamW (min-max)", "target", "compile s (AdamW / SEvo)",
               "peak RSS GB (both / AdamW / SEvo)", "XLA step memory GB (AdamW / SEvo)",
               "device peak GB"]
    rows = []
    for r in results:
        a, s = r["optimizers"]["adamw"], r["optimizers"]["sevo-adamw"]
        split = r.get("split", {})
        lo, hi = r["ratio_min_max"]
        target = "<= 1.15" if r["table"] == "beauty" else "-"
        source = "Beauty.txt co-occurrence" if r["source"] == "beauty" else "synthetic power-law"
        rows.append([r["table"], f"{r['rows']:,}", source, _util.fmt_int(r["nnz"]),
                     _fmt_ms(a["median_s"]), _fmt_ms(s["median_s"]),
                     f"**{r['ratio']:.2f}** ({lo:.2f}-{hi:.2f})", target,
                     f"{a['compile_s']:.1f} / {s['compile_s']:.1f}",
                     f"{r['peak_rss_gb']:.2f} / {_fmt_gb(split.get('adamw'))} / "
                     f"{_fmt_gb(split.get('sevo-adamw'))}",
                     f"{_fmt_gb(a['step_gb'])} / {_fmt_gb(s['step_gb'])}",
                     _fmt_gb(r["device_peak_gb"])])
    lines.append(_util.markdown_table(headers, rows))
    notes = [f"{r['table']}: {r['repeats']} repetitions x {r['steps']} steps per optimizer"
             for r in results]
    gen = "; ".join(f"{k} graph generated in {v:.1f} s" for k, v in gen_s.items())
    lines += ["", "Step times: median over interleaved repetitions of the mean step time; ratio: "
              "median of per-repetition ratios. " + "; ".join(notes) + (f"; {gen}" if gen else "")
              + ". Peak RSS (VmHWM): 'both' is the timing process (both optimizers alive), the "
              "per-optimizer figures separate processes (init + compile + 3 steps). XLA step "
              "memory: arguments + outputs + temporaries - aliased of the compiled step."]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker is not None:
        print(RESULT_TAG + json.dumps(run_worker(json.loads(args.worker))), flush=True)
        return 0
    if args.make_graph is not None:
        print(RESULT_TAG + json.dumps(make_graph(json.loads(args.make_graph))), flush=True)
        return 0
    if args.smoke:  # checks that everything runs; the times mean nothing
        # LLVM -O0 for XLA:CPU: a third of the compile time (jax is not imported yet)
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + " --xla_backend_optimization_level=0").strip()
        args.sizes = "smoke"
        args.maxlen, args.features, args.num_blocks, args.batch_size = 10, 16, 1, 32
        args.no_memory_split = True
    with tempfile.TemporaryDirectory(prefix="bench_train_step_") as tmp:
        specs, gen_s = _table_specs(args, tmp)
        results = []
        for spec in specs:
            spec = {**spec, "optimizers": list(OPTIMIZERS)}
            print(f"[bench_train_step] {spec['table']}: timing both optimizers ...",
                  file=sys.stderr, flush=True)
            result = run_worker(spec) if args.smoke else _spawn(spec)
            if not args.no_memory_split:
                result["split"] = {}
                for o in OPTIMIZERS:
                    print(f"[bench_train_step] {spec['table']}: memory of {o} alone ...",
                          file=sys.stderr, flush=True)
                    alone = _spawn({**spec, "optimizers": [o], "repeats": 0, "warmup": 3})
                    result["split"][o] = alone["peak_rss_gb"]
                    result.setdefault("split_device_peak_gb", {})[o] = alone["device_peak_gb"]
            results.append(result)
    import jax  # noqa: F401  (for the versions in the machine line)
    import numpy  # noqa: F401
    import scipy  # noqa: F401

    info = _util.machine_info()
    text = report(results, args, argv, gen_s, info)
    print(text)
    _util.write_json(args.json, {"machine": info, "argv": argv, "graph_generation_s": gen_s,
                                 "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
