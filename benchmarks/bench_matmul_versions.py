"""``sparse_matmul`` (chunked, the CPU default) of this checkout vs an older ``operator.py``
vs scipy CSR, side by side in one process on one core. A version with ``blocked_coo`` reads
the blocks it builds once per graph, as ``NormalizedGraph`` does on CPU.

Graphs with n = nnz / 20 nodes, float32: ``random`` (random COO entries and weights, the
default), or ``uniform`` / ``powerlaw`` from ``benchmarks/graphs.py`` (Erdos-Renyi-like and
Zipf co-occurrence graphs, normalised as SEvo uses them). One product ``A @ X`` per call, CPU
time per call, 7 blocks alternating A B C / C B A, medians of per-block ratios. ``--layers L``
times psi's recursion instead, ``Y <- X + 0.99 A Y`` L times in one call (a ``fori_loop`` in
JAX, as ``sevo_jax.psi`` runs it; a Python loop of CSR products in scipy).

Usage::

    git show 24587db:sevo_jax/operator.py > /tmp/operator_before.py
    python benchmarks/bench_matmul_versions.py --before /tmp/operator_before.py \\
        --nnz 1e5,1e6 --d 16,32,48,64,128
    python benchmarks/bench_matmul_versions.py --before /tmp/operator_before.py \
        --graphs uniform,powerlaw --nnz 1e5,1e6,4e6 --d 16,32,64,128
    python benchmarks/bench_matmul_versions.py --smoke   # CI: this checkout against itself
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _util  # noqa: E402  (stdlib only)


def _ints(s: str) -> list[int]:
    return [int(float(x)) for x in s.split(",") if x.strip()]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", default=None,
                   help="an older sevo_jax/operator.py (default: this checkout's own)")
    p.add_argument("--nnz", type=_ints, default=_ints("1e5,1e6"))
    p.add_argument("--d", type=_ints, default=_ints("16,32,48,64,128"))
    p.add_argument("--graphs", type=lambda s: [g for g in s.split(",") if g], default=["random"],
                   help="comma list of random, uniform, powerlaw (default: random)")
    p.add_argument("--layers", type=int, default=0,
                   help="0: one product A @ X; L > 0: psi's recursion with L products")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--torch", action="store_true",
                   help="also time PyTorch's CSR product (torch.sparse_csr_tensor @ dense, one "
                        "thread), the other peer a user would pick")
    p.add_argument("--compile", action="store_true",
                   help="also time XLA's compile of each version (CPU s, 3 rounds, fresh jits)")
    p.add_argument("--cpu", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="tiny sizes (seconds)")
    args = p.parse_args(argv)
    if args.smoke:
        args.nnz, args.d, args.repeats = [2000], [8, 32], 2
    if args.before is None:
        args.before = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir,
                                   "sevo_jax", "operator.py")
    _util.limit_threads(args.cpu)
    import graphs as graph_gen
    import jax
    import jax.numpy as jnp
    import numpy as np
    import scipy.sparse as sp

    from sevo_jax import operator as now
    from sevo_jax.graph import normalize

    spec = importlib.util.spec_from_file_location("operator_before", args.before)
    if spec is None or spec.loader is None:
        raise SystemExit(f"bench_matmul_versions: --before: cannot load {args.before}")
    before = importlib.util.module_from_spec(spec)
    sys.modules["operator_before"] = before
    spec.loader.exec_module(before)

    rng = np.random.default_rng(0)
    print(_util.machine_line(_util.machine_info()))
    print("one product A @ X per call" if args.layers == 0 else
          f"psi's recursion, {args.layers} products per call")
    torch = None
    if args.torch:
        import torch

        torch.set_num_threads(1)
    extra = " torch CSR | now / torch |" if torch else ""
    print("| graph | nnz | d | scipy CSR | before | now | before / scipy | now / scipy "
          "| now / before |" + extra)
    print("|---|---|---|---|---|---|---|---|---|" + "---|---|" * bool(torch))
    compiles: list[str] = []
    for kind, nnz in ((k, m) for k in args.graphs for m in args.nnz):
        n = nnz // 20
        if kind == "random":
            a = sp.csr_matrix((rng.random(nnz).astype(np.float32),
                               (rng.integers(0, n, nnz), rng.integers(0, n, nnz))), shape=(n, n))
        elif kind == "uniform":
            a = normalize(graph_gen.uniform_graph(n, nnz, 0)).astype(np.float32)
        elif kind == "powerlaw":
            a = normalize(graph_gen.powerlaw_cooccurrence(n, nnz, 1.0, 0)).astype(np.float32)
        else:
            raise SystemExit(f"bench_matmul_versions: --graphs: unknown graph {kind!r}")
        a = sp.csr_matrix(a)
        a.sum_duplicates()
        a.sort_indices()
        coo = a.tocoo()
        idx = jnp.asarray(np.stack([coo.row, coo.col], 1).astype(np.int32))
        w = jnp.asarray(coo.data)

        def operands(mod, idx=idx, w=w, n=n):
            """The module's device COO: ``blocked_coo``'s once-per-graph blocks where it has
            them (as ``NormalizedGraph`` holds on CPU), else the plain entries; and the
            ``sparse_matmul`` keywords that read them."""
            if not hasattr(mod, "blocked_coo"):
                return (idx, w), {}
            bi, bw, used = mod.blocked_coo(np.asarray(idx), np.asarray(w), n)
            return (jnp.asarray(bi), jnp.asarray(bw)), {"blocked": (mod.MATMUL_BLOCK, used)}

        graph_of = {"before": operands(before), "now": operands(now)}  # once per graph

        def jitted(name, mod, n=n, layers=args.layers, graph_of=graph_of):
            kwargs = graph_of[name][1]

            def one(i, v, y):
                return mod.sparse_matmul(i, v, y, n, impl="chunked", **kwargs)
            if layers == 0:
                return jax.jit(one)

            def psi_like(i, v, y):
                return jax.lax.fori_loop(0, layers, lambda _, z: y + 0.99 * one(i, v, z), y)
            return jax.jit(psi_like)

        for d in args.d:
            x = rng.standard_normal((n, d)).astype(np.float32)
            xj = jnp.asarray(x)

            def scipy_product(a=a, x=x, layers=args.layers):
                if layers == 0:
                    return a @ x
                y = x
                for _ in range(layers):
                    y = x + np.float32(0.99) * (a @ y)
                return y

            ref = scipy_product()
            f_before, f_now = jitted("before", before), jitted("now", now)
            args_before, args_now = (graph_of[k][0] + (xj,) for k in ("before", "now"))
            if args.compile:
                spent: dict[str, list[float]] = {"before": [], "now": []}
                for r in range(3):
                    pairs = [("before", before, args_before), ("now", now, args_now)]
                    for name, mod, a_ in (pairs if r % 2 == 0 else pairs[::-1]):
                        lowered = jitted(name, mod).lower(*a_)
                        t = time.process_time()
                        lowered.compile()
                        spent[name].append(time.process_time() - t)
                compiles.append(f"| {kind} | {a.nnz:,} | {d} | "
                                f"{np.median(spent['before']):.2f} s | "
                                f"{np.median(spent['now']):.2f} s | "
                                f"{np.median(spent['now']) / np.median(spent['before']):.2f} |")
            fns = {"scipy": scipy_product,
                   "before": lambda f=f_before, g=args_before: f(*g).block_until_ready(),
                   "now": lambda f=f_now, g=args_now: f(*g).block_until_ready()}
            if torch is not None:
                at = torch.sparse_csr_tensor(torch.from_numpy(a.indptr.astype(np.int64)),
                                             torch.from_numpy(a.indices.astype(np.int64)),
                                             torch.from_numpy(a.data.astype(np.float32)),
                                             size=a.shape)
                xt = torch.from_numpy(x)

                def torch_product(at=at, xt=xt, layers=args.layers):
                    if layers == 0:
                        return (at @ xt).numpy()
                    y = xt
                    for _ in range(layers):
                        y = xt + 0.99 * (at @ y)
                    return y.numpy()
                fns["torch"] = torch_product
            for name, f in fns.items():
                if not np.allclose(np.asarray(f()), ref, atol=1e-4, rtol=1e-4):
                    raise SystemExit(f"bench_matmul_versions: {name} disagrees with scipy")
            calls = max(1, int(2e6 // nnz))
            times: dict[str, list[float]] = {k: [] for k in fns}
            for r in range(args.repeats):
                for name, f in (fns.items() if r % 2 == 0 else reversed(fns.items())):
                    t = time.process_time()
                    for _ in range(calls):
                        f()
                    times[name].append((time.process_time() - t) / calls)
            s, b, c = (np.array(times[k]) for k in ("scipy", "before", "now"))
            peer = ""
            if torch is not None:
                t_ = np.array(times["torch"])
                peer = f" {_util.fmt_s(float(np.median(t_)))} | {np.median(c / t_):.2f} |"
            print(f"| {kind} | {a.nnz:,} | {d} | {_util.fmt_s(float(np.median(s)))} "
                  f"| {_util.fmt_s(float(np.median(b)))} | {_util.fmt_s(float(np.median(c)))} "
                  f"| {np.median(b / s):.2f} | {np.median(c / s):.2f} | {np.median(c / b):.2f} |"
                  + peer, flush=True)
    if compiles:
        print("\nXLA compile (CPU s, median of 3, fresh jits)")
        print("| graph | nnz | d | before | now | now / before |\n|---|---|---|---|---|---|")
        print("\n".join(compiles))
    print("load average at the end:", os.getloadavg())


if __name__ == "__main__":
    main()
