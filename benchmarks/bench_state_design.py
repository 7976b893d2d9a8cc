"""Compile time and steady step time of a jitted ``sevo_adamw`` update, through the public API.

Written against the public API only (``sevo_adamw``, ``init``, ``update``) so that the same
script times two versions of the library side by side (``--pythonpath`` runs it in one
subprocess per version, interleaved ``--rounds`` times). Per version and round, for a FRESH
optimizer and ``jax.jit(opt.update)``:

* ``compile``: ``lower(...).compile()`` with the state passed as an argument (how a train step
  receives it);
* ``steady``: median of ``--repeats`` calls of the compiled update (not donated);
* ``reset``: one call on ``jax.tree.map(jnp.zeros_like, state)`` and the max relative error of
  its update against a fresh state's (the old design is silently wrong; the new one pays one
  host-to-device upload of the graph in that step);
* ``donated``: the same with ``donate_argnums=1`` (each call consumes the previous state), when
  the version supports it (the old one deletes the graph it shares with ``init``: reported as
  ``failed``).

Usage::

    python benchmarks/bench_state_design.py --num-nodes 100000 --nnz 2e6
    python benchmarks/bench_state_design.py --pythonpath /tmp/before:. --rounds 2
    python benchmarks/bench_state_design.py --overhead --rounds 5   # the check's own cost
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-nodes", type=int, default=100_000)
    p.add_argument("--nnz", type=lambda s: int(float(s)), default=2_000_000)
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--pythonpath", default=None,
                   help="colon-separated library roots to compare, each in its own subprocess")
    p.add_argument("--overhead", action="store_true",
                   help="in ONE process, psi with the graph as a plain argument vs psi with the "
                        "cache check and repair (new library only), interleaved --rounds times")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, one round (seconds)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.num_nodes, args.nnz, args.rounds, args.repeats = 2_000, 20_000, 1, 2
    return args


def child(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import graphs as graph_gen
    import sevo_jax as sj

    a = graph_gen.uniform_graph(args.num_nodes, args.nnz, 0)
    rng = np.random.default_rng(0)
    params = {"emb": jnp.asarray(rng.standard_normal((args.num_nodes, args.d)), jnp.float32),
              "w": jnp.ones((args.d, args.d))}
    grads = jax.tree.map(lambda p: 0.01 * p, params)
    mask = {"emb": True, "w": False}
    opt = sj.sevo_adamw(1e-3, a, mask=mask)
    out = {"library": os.path.dirname(sj.__file__)}

    state = opt.init(params)
    t = time.perf_counter()
    compiled = jax.jit(opt.update).lower(grads, state, params).compile()
    out["compile_s"] = time.perf_counter() - t
    jax.block_until_ready(compiled(grads, state, params))
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        jax.block_until_ready(compiled(grads, state, params))
        times.append(time.perf_counter() - t)
    out["steady_s"] = statistics.median(times)

    # a generic reset: the old design smooths with a zeroed graph (psi becomes c * X), the new
    # one repairs the graph from the host in this one step
    fresh_update, _ = compiled(grads, opt.init(params), params)
    reset = jax.tree.map(jnp.zeros_like, opt.init(params))
    jax.block_until_ready(reset)
    t = time.perf_counter()
    reset_update, _ = compiled(grads, reset, params)
    jax.block_until_ready(reset_update)
    out["reset_step_s"] = time.perf_counter() - t
    ref = np.asarray(fresh_update["emb"])
    out["reset_rel_err"] = float(np.abs(np.asarray(reset_update["emb"]) - ref).max() / np.abs(ref).max())

    try:
        donated = jax.jit(opt.update, donate_argnums=1)
        state = opt.init(params)
        _, state = donated(grads, state, params)
        jax.block_until_ready(state)
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            _, state = donated(grads, state, params)
            jax.block_until_ready(state)
            times.append(time.perf_counter() - t)
        opt.init(params)  # the old design fails here: the donated graph was the shared one
        jax.block_until_ready(jax.tree.leaves(opt.init(params)))
        out["donated_s"] = statistics.median(times)
    except Exception as e:  # noqa: BLE001  (report, keep the other numbers)
        out["donated_s"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}"
    return out


def overhead(args) -> None:
    """The state design's own cost, side by side in one process: ``repaired()`` (trace-time
    dtype check, tag compare, ``lax.cond`` with the intact graph as output) around psi."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import _util
    import graphs as graph_gen
    import sevo_jax as sj

    g = sj.as_normalized_graph(graph_gen.uniform_graph(args.num_nodes, args.nnz, 0))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((args.num_nodes, args.d)), jnp.float32)
    variants = {
        "graph as argument (no check)": lambda g, x: (sj.propagate(g, x), g),
        "checked + repaired graph": lambda g, x: (lambda r: (sj.propagate(r, x), r))(g.repaired()),
    }
    res = {k: {"compile": [], "steady": []} for k in variants}
    for _ in range(args.rounds):
        for name, fn in variants.items():
            t = time.perf_counter()
            fresh = lambda g, x, fn=fn: fn(g, x)  # noqa: E731  (a new function: no cache hit)
            compiled = jax.jit(fresh).lower(g, x).compile()
            res[name]["compile"].append(time.perf_counter() - t)
            jax.block_until_ready(compiled(g, x))
            for _ in range(args.repeats):
                t = time.perf_counter()
                jax.block_until_ready(compiled(g, x))
                res[name]["steady"].append(time.perf_counter() - t)
    print(f"Machine: {_util.machine_line(_util.machine_info())}\n")
    print(f"psi (neumann, L=3) of a {args.num_nodes} x {args.d} table, uniform graph {args.nnz} nnz, "
          f"{args.rounds} interleaved rounds x {args.repeats} calls\n")
    print(_util.markdown_table(
        ["variant", "compile (median)", "steady call (median)"],
        [[k, f"{statistics.median(v['compile']):.3f} s", f"{statistics.median(v['steady']):.3f} s"]
         for k, v in res.items()]))


def main(argv=None):
    args = parse_args(argv)
    if args.overhead:
        overhead(args)
        return
    if args.child:
        print(json.dumps(child(args)))
        return
    roots = (args.pythonpath or ".").split(":")
    rows = []
    for r in range(args.rounds):
        for root in roots:
            env = {**os.environ, "PYTHONPATH": os.path.abspath(root)}
            cmd = [sys.executable, __file__, "--child", "--num-nodes", str(args.num_nodes),
                   "--nnz", str(args.nnz), "--d", str(args.d), "--repeats", str(args.repeats)]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode:
                print(proc.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"child for {root} failed")
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            res["round"], res["root"] = r, root
            rows.append(res)
            print(res, file=sys.stderr, flush=True)
    import _util

    print(f"Machine: {_util.machine_line(_util.machine_info())}\n")
    print(f"sevo_adamw update, uniform graph {args.num_nodes} nodes / {args.nnz} nnz, "
          f"table {args.num_nodes} x {args.d} float32, neumann L=3\n")
    fmt = lambda v: f"{v:.3f} s" if isinstance(v, float) else str(v)
    print(_util.markdown_table(
        ["library", "round", "compile (lower+compile)", f"steady update (median of {args.repeats})",
         "update after a zeros_like reset", "its max rel. error", "donated update (median)"],
        [[x["root"], x["round"], fmt(x["compile_s"]), fmt(x["steady_s"]), fmt(x["reset_step_s"]),
          f"{x['reset_rel_err']:.1e}", fmt(x["donated_s"])] for x in rows]))


if __name__ == "__main__":
    main()
