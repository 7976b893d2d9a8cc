"""psi (neumann, L=3, d=64) in JAX against PyTorch's CSR sparse matmul, same device, same run.

Made for the GPU machine (``../shared`` is absent there: every graph is generated here, by
``benchmarks/graphs.py``), but runs anywhere; PyTorch is optional (its rows are skipped when it
is not installed). For each graph (uniform and power-law) it times, interleaved:

* ``torch_csr``: ``torch.sparse.mm`` on a CSR tensor (cuSPARSE on GPU), fp32;
* ``jax_bcoo``: ``jax.experimental.sparse`` BCOO matmul;
* ``jax_segment_sum``: gather + sorted ``segment_sum`` (the library's GPU default);
* ``jax_segment_sum_degree``: the same after renumbering nodes by descending degree;
* ``jax_bf16_gather``: the signal gathered in bf16, multiplied and accumulated in fp32.

It reports the median time, the ratio to ``torch_csr`` and the achieved bandwidth, counting per
layer the bytes of one pass over the edges (column index, row index, weight: 12 B each) plus
one gathered row per edge (``d`` x 4 B, 2 B in bf16) and one read and write of the
(n, d) signal, against the card's peak.

    python benchmarks/bench_gpu_smoothing.py                 # 1M nodes / 20M nnz / d=64 / L=3
    python benchmarks/bench_gpu_smoothing.py --smoke         # tiny, any device
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks import _util, graphs  # noqa: E402
from sevo_jax import graph as graph_lib  # noqa: E402
from sevo_jax.operator import NormalizedGraph, blocks_as_coo  # noqa: E402
from sevo_jax.psi import psi_recursion  # noqa: E402

BETA, APPROX = 0.99, "neumann"
PEAK_GBS = {"H100": 3350.0, "H200": 4800.0, "A100": 2039.0}  # HBM peak, GB/s


def peak_bandwidth(device) -> float | None:
    kind = getattr(device, "device_kind", "")
    return next((v for k, v in PEAK_GBS.items() if k in kind), None)


def degree_order(a):
    """Permutation putting high-degree nodes first (better locality for hot rows)."""
    order = np.argsort(-np.diff(a.indptr), kind="stable")
    return a[order][:, order].tocsr(), order


def jax_variants(a_norm, x_np, L):
    g = NormalizedGraph.from_scipy(a_norm)
    a_deg, order = degree_order(a_norm)
    g_deg = NormalizedGraph.from_scipy(a_deg)
    x = jnp.asarray(x_np)
    x_deg = jnp.asarray(x_np[order])

    def bf16_matmul(graph):
        def matmul(y):
            # (row, col) pairs; on CPU (the smoke run) the leaves are blocked_coo's blocks
            idx = blocks_as_coo(graph.indices) if graph.host.blocked else graph.indices
            gathered = y.astype(jnp.bfloat16)[idx[:, 1]].astype(jnp.float32)
            return jax.ops.segment_sum(graph.weights[:, None] * gathered, idx[:, 0],
                                       num_segments=graph.num_nodes, indices_are_sorted=True)
        return matmul

    def build(matmul_of):
        return jax.jit(lambda graph, x: psi_recursion(matmul_of(graph), x, BETA, L, APPROX))

    return {
        "jax_bcoo": (build(lambda gr: lambda y: gr.matmul(y, impl="bcoo")), (g, x)),
        "jax_segment_sum": (build(lambda gr: lambda y: gr.matmul(y, impl="segment_sum")), (g, x)),
        "jax_segment_sum_degree": (build(lambda gr: lambda y: gr.matmul(y, impl="segment_sum")), (g_deg, x_deg)),
        "jax_bf16_gather": (build(bf16_matmul), (g, x)),
    }


def torch_variant(a_norm, x_np, L):
    try:
        import torch
        import warnings

        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
    except ImportError:
        return None
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    a = a_norm.astype(np.float32)
    csr = torch.sparse_csr_tensor(torch.from_numpy(a.indptr.astype(np.int64)),
                                  torch.from_numpy(a.indices.astype(np.int64)),
                                  torch.from_numpy(a.data), size=a.shape, device=dev,
                                  check_invariants=False)  # built from a valid scipy CSR
    x = torch.from_numpy(x_np).to(dev)
    c = (1 - BETA) / (1 - BETA ** (L + 1))

    def run():
        y = x
        for _ in range(L):
            y = x + BETA * torch.sparse.mm(csr, y)
        y = c * y
        if dev == "cuda":
            torch.cuda.synchronize()
        return y

    return run


def time_call(fn, repeats):
    fn()  # warm-up (compilation, cuSPARSE handle)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def bench_graph(name, a_raw, d, L, repeats):
    a_norm = graph_lib.normalize(a_raw)
    rng = np.random.default_rng(0)
    x_np = rng.standard_normal((a_norm.shape[0], d), dtype=np.float32)
    fns = {k: (lambda f=f, args=args: jax.block_until_ready(f(*args))) for k, (f, args) in
           jax_variants(a_norm, x_np, L).items()}
    t = torch_variant(a_norm, x_np, L)
    if t is not None:
        fns = {"torch_csr": t, **fns}
    times = {k: [] for k in fns}
    for k, fn in fns.items():
        fn()
    for _ in range(repeats):  # interleaved so drift hits every variant alike
        for k, fn in fns.items():
            times[k] += time_call(fn, 1)
    ref = np.median(times["torch_csr"]) if "torch_csr" in times else None
    n, nnz = a_norm.shape[0], a_norm.nnz
    peak = peak_bandwidth(jax.devices()[0])
    rows = []
    for k, ts in times.items():
        med = float(np.median(ts))
        row_bytes = 2 if k == "jax_bf16_gather" else 4
        moved = L * (nnz * (12 + d * row_bytes) + 2 * n * d * 4)
        gbs = moved / med / 1e9
        rows.append([name, k, _util.fmt_s(med), f"{med / ref:.2f}" if ref else "-", f"{gbs:.0f}",
                     f"{100 * gbs / peak:.0f}%" if peak else "-"])
    return rows, {"n": n, "nnz": nnz}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, default=1_000_000)
    p.add_argument("--nnz", type=int, default=20_000_000)
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--L", type=int, default=3)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, a few seconds")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.smoke:
        args.nodes, args.nnz, args.repeats = 2_000, 20_000, 2
    graphs_to_run = {
        "uniform": graphs.uniform_graph(args.nodes, args.nnz, seed=0),
        "power-law": graphs.powerlaw_cooccurrence(args.nodes, args.nnz, alpha=1.0, seed=0),
    }
    all_rows, meta = [], {}
    for name, a in graphs_to_run.items():
        rows, meta[name] = bench_graph(name, a, args.d, args.L, args.repeats)
        all_rows += rows
    info = _util.machine_info()
    dev = jax.devices()[0]
    print(f"`{' '.join(['python', *sys.argv])}`; {_util.machine_line(info)}; device {dev.device_kind} "
          f"({jax.default_backend()}); d={args.d}, L={args.L}; " +
          "; ".join(f"{k}: n={_util.fmt_int(v['n'])}, nnz={_util.fmt_int(v['nnz'])}" for k, v in meta.items()))
    print()
    print(_util.markdown_table(["graph", "variant", "median", "x torch_csr", "GB/s", "of peak"], all_rows))
    _util.write_json(args.json, {"machine": info, "device": dev.device_kind, "rows": all_rows, "graphs": meta})


if __name__ == "__main__":
    main()
