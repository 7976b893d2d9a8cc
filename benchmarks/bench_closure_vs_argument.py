"""jit cost of psi when the graph is CLOSED OVER (a constant) vs PASSED AS AN ARGUMENT.

This is why ``NormalizedGraph`` is a pytree carried in the optimizer state
(``SEvoSmoothState``): a graph captured by the jitted function as a Python constant becomes a
compile-time constant of the program, while a pytree argument is just an input buffer.

For each variant and matmul impl, a FRESH jitted function is timed through
``trace+lower`` (``jax.jit(f).lower(...)``), ``compile`` (``.compile()``), the first call and
the steady-state call (median of ``--repeats``), plus the end-to-end time of a plain first
call ``jax.jit(f)(...)`` of another fresh function (what a training step pays).
Variants run in alternation in one process.

Usage::

    python benchmarks/bench_closure_vs_argument.py                 # 1M nodes, 20M nnz, d=64
    python benchmarks/bench_closure_vs_argument.py --smoke
    python benchmarks/bench_closure_vs_argument.py --graph powerlaw --impls bcoo,segment_sum
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _util  # noqa: E402  (stdlib only)


def _str_list(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-nodes", type=int, default=1_000_000)
    p.add_argument("--nnz", type=lambda s: int(float(s)), default=20_000_000)
    p.add_argument("--graph", choices=("uniform", "powerlaw"), default="uniform")
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--beta", type=float, default=0.99)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--impls", type=_str_list, default=None,
                   help="matmul impls (default: the backend's default, chunked on CPU)")
    p.add_argument("--repeats", type=int, default=3, help="steady-state calls (median)")
    p.add_argument("--one-core", action="store_true", help="pin to one core, 1 thread per library")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    p.add_argument("--smoke", action="store_true", help="tiny sizes (a few seconds)")
    args = p.parse_args(argv)
    if args.smoke:
        args.num_nodes, args.nnz, args.repeats = 5_000, 100_000, 2
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.one_core:
        _util.limit_threads(0)

    import jax
    import jax.numpy as jnp
    import numpy as np

    import graphs as graph_gen
    from sevo_jax.graph import normalize
    from sevo_jax.operator import NormalizedGraph, default_matmul_impl
    from sevo_jax.psi import propagate

    T = _util.Timer
    jax.block_until_ready(jnp.zeros(1))
    with T() as t_gen:
        if args.graph == "uniform":
            a = graph_gen.uniform_graph(args.num_nodes, args.nnz, args.seed)
        else:
            a = graph_gen.powerlaw_cooccurrence(args.num_nodes, args.nnz, args.alpha, args.seed)
        g = NormalizedGraph.from_scipy(normalize(a))
        del a
        x = jnp.asarray(np.random.default_rng(args.seed).standard_normal((args.num_nodes, args.d), dtype=np.float32))
        jax.block_until_ready((g.indices, g.weights, x))
    impls = args.impls or [None]
    beta, L = args.beta, args.layers

    def psi_fn(impl):
        def psi(graph, y):
            return propagate(graph, y, beta, L, "neumann", impl=impl)

        return psi

    def variant(kind, impl):
        """Fresh (jitted function, call args) pair; a new function object = no cache hit."""
        psi = psi_fn(impl)
        if kind == "argument":
            return jax.jit(lambda graph, y: psi(graph, y)), (g, x)
        return jax.jit(lambda y: psi(g, y)), (x,)  # g captured: a constant of the program

    results = []
    ref = None
    for impl in impls:
        for kind in ("argument", "closure"):
            f, call_args = variant(kind, impl)
            with T() as t_lower:
                lowered = f.lower(*call_args)
            with T() as t_compile:
                compiled = lowered.compile()
            with T() as t_first:
                out = compiled(*call_args)
                jax.block_until_ready(out)
            steady = []
            for _ in range(args.repeats):
                with T() as t:
                    jax.block_until_ready(compiled(*call_args))
                steady.append(t.s)
            out = np.asarray(out)
            if ref is None:
                ref = out
            err = float(np.abs(out - ref).max() / (np.abs(ref).max() or 1.0))
            mem = None
            try:
                ma = compiled.memory_analysis()
                mem = {k: int(getattr(ma, k)) for k in (
                    "argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
                    "generated_code_size_in_bytes") if hasattr(ma, k)}
            except Exception:  # noqa: BLE001  (memory_analysis is backend-dependent)
                pass
            del lowered, compiled
            f2, call_args2 = variant(kind, impl)
            with T() as t_e2e:
                jax.block_until_ready(f2(*call_args2))
            del f2
            results.append(dict(
                impl=impl or f"default ({default_matmul_impl()})",
                variant=kind, lower_s=t_lower.s, compile_s=t_compile.s, first_call_s=t_first.s,
                steady_s=statistics.median(steady), steady_all_s=steady, end_to_end_first_call_s=t_e2e.s,
                rel_err_vs_first=err, memory=mem))
            print(f"{results[-1]}", file=sys.stderr, flush=True)

    info = _util.machine_info()
    print("## psi under jit: graph closed over (constant) vs passed as an argument\n")
    print(f"Machine: {_util.machine_line(info)}; backend {jax.default_backend()}; "
          f"{'one core' if args.one_core else 'all cores'}; peak RSS {_util.peak_rss_gb():.1f} GB\n")
    print(f"Graph: {args.graph}, {_util.fmt_int(args.num_nodes)} nodes, {_util.fmt_int(g.nnz)} nnz "
          f"(built in {t_gen.s:.1f} s, not counted); X: {_util.fmt_int(args.num_nodes)} x {args.d} float32; "
          f"neumann L={L}, beta={beta}.\n")
    rows = []
    for r in results:
        tot = r["lower_s"] + r["compile_s"] + r["first_call_s"]
        arg_bytes = (r["memory"] or {}).get("argument_size_in_bytes")
        rows.append([r["impl"], r["variant"], _util.fmt_s(r["lower_s"]), _util.fmt_s(r["compile_s"]),
                     _util.fmt_s(r["first_call_s"]), _util.fmt_s(tot), _util.fmt_s(r["end_to_end_first_call_s"]),
                     _util.fmt_s(r["steady_s"]),
                     f"{arg_bytes / 1e6:.0f} MB" if arg_bytes is not None else "-",
                     f"{r['rel_err_vs_first']:.0e}"])
    print(_util.markdown_table(
        ["impl", "graph passed as", "trace+lower", "compile", "1st run", "lower+compile+1st run",
         "jit first call (end to end)", f"steady call (median of {args.repeats})", "argument bytes",
         "max rel diff"], rows))
    by = {(r["impl"], r["variant"]): r for r in results}
    for impl in dict.fromkeys(r["impl"] for r in results):
        a_, c_ = by.get((impl, "argument")), by.get((impl, "closure"))
        if a_ and c_:
            print(f"\n{impl}: first jitted call {c_['end_to_end_first_call_s']:.2f} s as a closure vs "
                  f"{a_['end_to_end_first_call_s']:.2f} s as an argument "
                  f"({c_['end_to_end_first_call_s'] / a_['end_to_end_first_call_s']:.1f}x); steady "
                  f"{c_['steady_s']:.3f} vs {a_['steady_s']:.3f} s.")
    _util.write_json(args.json, dict(machine=info, args=vars(args), results=results, backend=jax.default_backend()))


if __name__ == "__main__":
    main()
