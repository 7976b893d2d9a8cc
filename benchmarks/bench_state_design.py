"""Compile time and steady step time of a jitted ``sevo_adamw`` update, through the public API.

Written against the public API only (``sevo_adamw``, ``init``, ``update``) so that the same
script times two versions of the library side by side (``--pythonpath`` runs it in one
subprocess per version, interleaved ``--rounds`` times). Per version and round, for a FRESH
optimizer and ``jax.jit(opt.update)``:

* ``compile``: ``lower(...).compile()`` with the state passed as an argument (how a train step
  receives it);
* ``steady``: median of ``--repeats`` calls of the compiled update (not donated);
* ``donated``: the same with ``donate_argnums=1`` (each call consumes the previous state), when
  the version supports it (the old one deletes the graph it shares with ``init``: reported as
  ``failed``).

Usage::

    python benchmarks/bench_state_design.py --num-nodes 100000 --nnz 2e6
    python benchmarks/bench_state_design.py --pythonpath /tmp/before:. --rounds 2
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
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


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


def main(argv=None):
    args = parse_args(argv)
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
         "donated update (median)"],
        [[x["root"], x["round"], fmt(x["compile_s"]), fmt(x["steady_s"]), fmt(x["donated_s"])]
         for x in rows]))


if __name__ == "__main__":
    main()
