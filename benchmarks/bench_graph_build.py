"""Graph construction on ONE CPU core: builder -> normalize -> NormalizedGraph, per stage.

Target (issue): a 1M-node, 20M-non-zero graph builds in under 30 s on one core.

  (a) ``cooccurrence_graph`` from synthetic Zipf-popularity sequences sized to ~20M non-zeros;
  (b) ``edge_list_graph`` from 10M uniformly random edges (~20M non-zeros once symmetrised);

each followed by ``normalize`` (which includes ``validate_adjacency``) and
``NormalizedGraph.from_scipy`` (COO sort + copy to the device), i.e. what
``sevo_smooth(adjacency)`` does. Generating the synthetic input is timed but is not part of
the build.

The process pins itself to one core (like ``taskset -c 0``) and sets the BLAS/OpenMP thread
counts to 1 BEFORE importing numpy.

Usage::

    python benchmarks/bench_graph_build.py                  # 1M nodes, 20M nnz, 10M edges
    python benchmarks/bench_graph_build.py --smoke          # seconds
    python benchmarks/bench_graph_build.py --repeats 3 --json /tmp/build.json
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _util  # noqa: E402  (stdlib only: safe before pinning)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-nodes", type=int, default=1_000_000)
    p.add_argument("--nnz", type=int, default=20_000_000, help="target non-zeros of (a)")
    p.add_argument("--edges", type=int, default=10_000_000, help="random edges for (b)")
    p.add_argument("--alpha", type=float, default=1.0, help="Zipf exponent of item popularity")
    p.add_argument("--mean-len", type=float, default=20.0, help="mean synthetic sequence length")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1, help="repeat each build; report min and median")
    p.add_argument("--cpu", type=int, default=0, help="core to pin to")
    p.add_argument("--no-pin", action="store_true", help="do not pin / limit threads")
    p.add_argument("--target-s", type=float, default=30.0)
    p.add_argument("--json", default=None, help="write results as JSON here")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (a few seconds)")
    args = p.parse_args(argv)
    if args.smoke:
        args.num_nodes, args.nnz, args.edges = 20_000, 200_000, 100_000
    return args


def main(argv=None):
    args = parse_args(argv)
    if not args.no_pin:
        _util.limit_threads(args.cpu)

    import numpy as np
    import jax
    import scipy

    from graphs import powerlaw_sequences, random_edges
    from sevo_jax.graph import cooccurrence_graph, edge_list_graph, normalize, validate_adjacency
    from sevo_jax.operator import NormalizedGraph

    del scipy
    info = _util.machine_info()
    T = _util.Timer
    n = args.num_nodes
    results = {"a": {}, "b": {}}

    def record(case, stage, seconds):
        results[case].setdefault(stage, []).append(seconds)

    def to_graph(adj_norm):
        g = NormalizedGraph.from_scipy(adj_norm)
        jax.block_until_ready((g.indices, g.weights))
        return g

    def timed_build(case, builder, *inputs, **kwargs):
        """Time ``builder(*inputs, **kwargs)``, validation alone, ``normalize`` and ``from_scipy``."""
        with T() as t:
            a = builder(*inputs, **kwargs)
        record(case, builder.__name__, t.s)
        with T() as t:
            validate_adjacency(a)
        record(case, "(validate_adjacency alone, inside normalize)", t.s)
        with T() as t:
            an = normalize(a)
        record(case, "normalize", t.s)
        with T() as t:
            g = to_graph(an)
        record(case, "NormalizedGraph.from_scipy", t.s)
        assert g.nnz == an.nnz
        degrees = np.diff(a.indptr)
        return dict(nodes=n, nnz=int(a.nnz), isolated=int(np.count_nonzero(degrees == 0)),
                    max_degree=int(degrees.max()))

    jax.block_until_ready(jax.numpy.zeros(1))  # backend start-up is not part of a build
    meta = {}
    for rep in range(args.repeats):
        # (a) co-occurrence graph from Zipf-popularity sequences
        with T() as t:
            seqs, seq_info = powerlaw_sequences(n - 1, args.nnz, args.alpha, args.seed, mean_len=args.mean_len)
        record("a", "generate sequences (input, not timed in build)", t.s)
        meta["a"] = timed_build("a", cooccurrence_graph, seqs, n - 1, H=1, num_pads=1)
        meta["a"].update(tokens=seq_info["num_tokens"], sequences=seq_info["num_sequences"])
        del seqs

        # (b) edge list
        with T() as t:
            src, dst = random_edges(n, args.edges, args.seed)
        record("b", "generate random edges (input, not timed in build)", t.s)
        meta["b"] = timed_build("b", edge_list_graph, src, dst, n)
        meta["b"].update(edges=args.edges)
        del src, dst

    build_stages = {
        "a": ("cooccurrence_graph", "normalize", "NormalizedGraph.from_scipy"),
        "b": ("edge_list_graph", "normalize", "NormalizedGraph.from_scipy"),
    }
    for case in ("a", "b"):
        per_rep = [sum(results[case][s][r] for s in build_stages[case]) for r in range(args.repeats)]
        results[case]["TOTAL build (builder + normalize + from_scipy)"] = per_rep

    titles = {
        "a": "(a) cooccurrence_graph from Zipf(alpha={alpha}) sequences: {nodes} nodes, {nnz} nnz "
        "({tokens} tokens in {sequences} sequences; {isolated} isolated nodes, max degree {max_degree})",
        "b": "(b) edge_list_graph from {edges} random edges: {nodes} nodes, {nnz} nnz "
        "({isolated} isolated nodes, max degree {max_degree})",
    }
    pinned = "not pinned" if args.no_pin else f"pinned to CPU {args.cpu}, 1 thread per library"
    print("## Graph build on one CPU core\n")
    print(f"Machine: {_util.machine_line(info)}; {pinned}; peak RSS {_util.peak_rss_gb():.1f} GB\n")
    summary = {}
    for case in ("a", "b"):
        m = dict(meta[case])
        m = {k: (_util.fmt_int(v) if isinstance(v, int) else v) for k, v in m.items()}
        print("### " + titles[case].format(alpha=args.alpha, **m) + "\n")
        rows = []
        for stage, times in results[case].items():
            s = _util.summarize(times)
            rows.append([stage, _util.fmt_s(s["min_s"]), _util.fmt_s(s["median_s"])])
        print(_util.markdown_table(["stage", f"min of {args.repeats} (s)", "median (s)"], rows))
        total = min(results[case]["TOTAL build (builder + normalize + from_scipy)"])
        verdict = "meets" if total < args.target_s else "MISSES"
        print(f"\nTotal {total:.2f} s: {verdict} the {args.target_s:.0f} s target.\n")
        summary[case] = dict(total_min_s=total, meets_target=total < args.target_s)

    _util.write_json(
        args.json,
        dict(machine=info, args=vars(args), meta=meta, times_s=results, summary=summary,
             pinned=not args.no_pin, peak_rss_gb=_util.peak_rss_gb()),
    )


if __name__ == "__main__":
    main()
