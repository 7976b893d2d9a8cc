"""psi (SEvo smoothing, neumann, L=3) under jax.jit vs scipy CSR doing the same maths, on CPU.

For each case the same normalised graph and signal X (n x d, float32) go to

  * ``scipy``: ``Y = X; 3x: Y = X + beta * (A @ Y); return c * Y`` with a float32 CSR ``A``
    (scipy's sparse matmul is single-threaded);
  * ``chunked`` (the CPU default) / ``segment_sum`` / ``bcoo``: ``sevo_jax.psi.propagate``
    jitted with the graph passed as an ARGUMENT (a ``NormalizedGraph`` pytree) and ``impl=``
    each of ``sevo_jax.operator.MATMUL_IMPLS`` (``sparse_matmul`` describes them);

timed side by side in the same process (interleaved repetitions, warm-up/compilation
excluded, ``block_until_ready``), and the ratio jax/scipy is the median of the per-repetition
ratios. The issue's target is jax/scipy <= 1.1 on CPU.

Sweeps: nnz (n = nnz / avg_degree) at d = 64; d at a fixed nnz; node orderings (as generated
= random ids, degree-descending, reverse Cuthill-McKee) at a fixed nnz; on uniform and
power-law (Zipf co-occurrence) graphs. Each thread setting runs in its own subprocess:

  * ``all``: the default (XLA:CPU may use every core of the machine);
  * ``1``: pinned to one core (CPU affinity, as ``taskset -c 0``), BLAS/OpenMP threads = 1 and
    ``XLA_FLAGS=--xla_cpu_multi_thread_eigen=false`` -- the fair comparison with scipy.

Usage::

    python benchmarks/bench_smoothing.py > /tmp/bench_smoothing.md     # full (~15-25 min)
    python benchmarks/bench_smoothing.py --smoke                       # seconds
    python benchmarks/bench_smoothing.py --threads 1 --nnz 1e6,4e6 --json out.json

Writes a log-log plot (time vs nnz, time vs d) to ``benchmarks/smoothing_scaling.png``
(``--plot``; under ``--smoke`` to a temporary file unless ``--plot`` is given).
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _util  # noqa: E402  (stdlib only)

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_PLOT = os.path.join(HERE, "smoothing_scaling.png")


def _int_list(s: str) -> list[int]:
    return [int(float(x)) for x in s.split(",") if x.strip()]


def _str_list(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nnz", type=_int_list, default=_int_list("1e5,1e6,4e6,2e7"), help="nnz sweep (d = --d)")
    p.add_argument("--avg-degree", type=int, default=20, help="n = nnz / avg_degree")
    p.add_argument("--d", type=int, default=64, help="embedding width of the nnz sweep")
    p.add_argument("--d-sweep", type=_int_list, default=_int_list("16,32,64,128"))
    p.add_argument("--d-sweep-nnz", type=lambda s: int(float(s)), default=4_000_000)
    p.add_argument("--orders", type=_str_list, default=_str_list("none,degree,rcm"),
                   help="node orderings compared at --reorder-nnz (none = as generated)")
    p.add_argument("--reorder-nnz", type=lambda s: int(float(s)), default=4_000_000)
    p.add_argument("--graphs", type=_str_list, default=_str_list("uniform,powerlaw"))
    p.add_argument("--alpha", type=float, default=1.0, help="Zipf exponent of the power-law graph")
    p.add_argument("--impls", type=_str_list, default=_str_list("chunked,segment_sum,bcoo"),
                   help="comma-separated sevo_jax.operator.MATMUL_IMPLS")
    p.add_argument("--threads", type=_str_list, default=None,
                   help="thread settings, each in its own process: 'all' and/or '1' (one core); "
                   "default 'all,1' ('1' under --smoke)")
    p.add_argument("--cpu", type=int, default=0, help="core used by the '1' setting")
    p.add_argument("--beta", type=float, default=0.99)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5, help="timed repetitions (median, min)")
    p.add_argument("--slow-s", type=float, default=2.0,
                   help="cases whose slowest method takes longer than this per call ...")
    p.add_argument("--slow-repeats", type=int, default=3, help="... get only this many repetitions")
    p.add_argument("--min-sample-s", type=float, default=0.05,
                   help="small cases loop each sample until it lasts this long")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default=None, help="keep generated graphs here (npz)")
    p.add_argument("--plot", default=None, help=f"PNG path (default {DEFAULT_PLOT}); 'none' to skip")
    p.add_argument("--plot-all-modes", action="store_true", help="plot every thread setting, not just '1'")
    p.add_argument("--json", default=None, help="write all results as JSON here")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (a few seconds)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.nnz = [2_000, 20_000]
        args.d_sweep = [16, 64]
        args.d_sweep_nnz = 20_000
        args.reorder_nnz = 20_000
        args.orders = ["none", "rcm"]
        args.repeats = 2
        args.min_sample_s = 0.005
        if args.plot is None:
            args.plot = os.path.join(tempfile.gettempdir(), "smoothing_scaling_smoke.png")
    if args.threads is None:
        args.threads = ["1"] if args.smoke else ["all", "1"]
    if args.plot is None:
        args.plot = DEFAULT_PLOT
    bad = set(args.threads) - {"all", "1"}
    if bad:
        p.error(f"--threads takes 'all' and/or '1', got {sorted(bad)}")
    return args


# ----------------------------------------------------------------------------------------------
# worker (one thread setting, one process)
# ----------------------------------------------------------------------------------------------


def groups_for(args) -> list[dict]:
    """Measurement groups: each is one graph and one d, with the node orderings to compare.

    Everything in a group (every ordering x {scipy, impls}) is timed INTERLEAVED, so ratios
    between orderings are as robust to machine load as the jax/scipy ratios. The ordering
    group comes first so that the nnz and d sweeps reuse its ``none`` measurements.
    """
    groups = []
    for kind in args.graphs:
        if args.orders:
            groups.append(dict(sweep="order", kind=kind, nnz=args.reorder_nnz, d=args.d, orders=list(args.orders)))
        for nnz in args.nnz:
            groups.append(dict(sweep="nnz", kind=kind, nnz=nnz, d=args.d, orders=["none"]))
        for d in args.d_sweep:
            groups.append(dict(sweep="d", kind=kind, nnz=args.d_sweep_nnz, d=d, orders=["none"]))
    return groups


def worker(args) -> None:
    mode = args.worker
    if mode == "1":
        _util.limit_threads(args.cpu)

    import jax
    import jax.numpy as jnp
    import numpy as np
    import scipy.sparse as sp
    from scipy.sparse.csgraph import reverse_cuthill_mckee

    import graphs as graph_gen
    from sevo_jax.graph import csr_row_ids, normalize
    from sevo_jax.operator import NormalizedGraph
    from sevo_jax.psi import propagate

    beta, L = args.beta, args.layers
    c = (1.0 - beta) / (1.0 - beta ** (L + 1))

    def make_psi(impl):
        def psi(g, x):
            return propagate(g, x, beta, L, "neumann", impl=impl)

        return jax.jit(psi)

    psis = {impl: make_psi(impl) for impl in args.impls}

    def scipy_psi(a32, x):
        y = x
        for _ in range(L):
            y = x + beta * (a32 @ y)
        return c * y

    cache_dir = args.cache_dir

    def load_graph(kind, nnz):
        n = max(nnz // args.avg_degree, 16)
        path = os.path.join(cache_dir, f"{kind}_n{n}_nnz{nnz}_a{args.alpha}_s{args.seed}.npz") if cache_dir else None
        if path and os.path.exists(path):
            return sp.load_npz(path).tocsr(), 0.0
        t = time.perf_counter()
        if kind == "uniform":
            a = graph_gen.uniform_graph(n, nnz, args.seed)
        elif kind == "powerlaw":
            a = graph_gen.powerlaw_cooccurrence(n, nnz, args.alpha, args.seed)
        else:
            raise ValueError(f"unknown graph kind {kind!r}")
        an = normalize(a)
        gen_s = time.perf_counter() - t
        if path:
            sp.save_npz(path + ".tmp.npz", an, compressed=False)
            os.replace(path + ".tmp.npz", path)
        return an, gen_s

    def reorder(an, order):
        if order == "none":
            return an, None, 0.0
        t = time.perf_counter()
        if order == "degree":
            perm = np.argsort(-np.diff(an.indptr), kind="stable")
        elif order == "rcm":
            perm = reverse_cuthill_mckee(an, symmetric_mode=True)
        else:
            raise ValueError(f"unknown order {order!r}")
        ap = an[perm][:, perm].tocsr()
        ap.sort_indices()
        return ap, perm, time.perf_counter() - t

    def bandwidth_stat(a):
        """Mean |i - j| / n over stored entries (locality of the column accesses)."""
        rows = csr_row_ids(a).astype(np.int64)
        return float(np.mean(np.abs(rows - a.indices)) / a.shape[0]) if a.nnz else 0.0

    def paired_median_ratio(num, den):
        return statistics.median(a / b for a, b in zip(num, den))

    jax.block_until_ready(jnp.zeros(1))
    records = []
    graph_cache: dict = {}
    measured: dict = {}  # (kind, nnz, d, order) -> records, reused by later sweeps
    for group in groups_for(args):
        kind, nnz, d = group["kind"], group["nnz"], group["d"]
        todo = [o for o in group["orders"] if (kind, nnz, d, o) not in measured]
        if todo:
            if (kind, nnz) not in graph_cache:
                graph_cache.clear()  # one graph in memory at a time
                graph_cache[(kind, nnz)] = load_graph(kind, nnz)
            an, gen_s = graph_cache[(kind, nnz)]
            n = an.shape[0]
            x = np.random.default_rng(args.seed + d).standard_normal((n, d), dtype=np.float32)
            xj = jnp.asarray(x)
            methods, jax_calls, meta = {}, {}, {}
            for order in todo:
                ap, perm, reorder_s = reorder(an, order)
                xo = x if perm is None else np.ascontiguousarray(x[perm])
                xoj = xj if perm is None else jnp.asarray(xo)
                a32 = ap.astype(np.float32)
                g = NormalizedGraph.from_scipy(ap)
                jax.block_until_ready((g.indices, g.weights, xoj))
                meta[order] = dict(nnz_actual=int(ap.nnz), reorder_s=reorder_s, mean_abs_offset=bandwidth_stat(ap))
                methods[(order, "scipy")] = lambda a32=a32, xo=xo: scipy_psi(a32, xo)
                for impl, f in psis.items():
                    jax_calls[(order, impl)] = (lambda f=f, g=g, xoj=xoj: f(g, xoj))
                    methods[(order, impl)] = (lambda f=f, g=g, xoj=xoj: f(g, xoj).block_until_ready())
                del ap, a32

            # warm-up (compilation for jax) and a correctness check against scipy
            first_s, outs = {}, {}
            for name, fn in methods.items():
                t = time.perf_counter()
                outs[name] = np.asarray(fn() if name[1] == "scipy" else jax_calls[name]())
                first_s[name] = time.perf_counter() - t
            rel_err = {}
            for (order, mth), v in outs.items():
                ref = outs[(order, "scipy")]
                rel_err[(order, mth)] = float(np.abs(v - ref).max() / (float(np.abs(ref).max()) or 1.0))
            del outs
            # second warm call (skipped for slow scipy): steady-state estimate to size the inner loop
            est = {}
            for name, fn in methods.items():
                if name[1] == "scipy" and first_s[name] > 20 * args.min_sample_s:
                    est[name] = first_s[name]
                    continue
                t = time.perf_counter()
                fn()
                est[name] = time.perf_counter() - t
            number = {k: max(1, min(1000, int(args.min_sample_s / max(v, 1e-9)))) for k, v in est.items()}
            slow = max(est.values()) > args.slow_s
            repeats = min(args.repeats, args.slow_repeats) if slow else args.repeats

            wall = {k: [] for k in methods}
            cpu = {k: [] for k in methods}
            names = list(methods)
            for r in range(repeats):
                for name in names[r % len(names):] + names[: r % len(names)]:  # rotate the order
                    fn, k = methods[name], number[name]
                    c0, t0 = time.process_time(), time.perf_counter()
                    for _ in range(k):
                        fn()
                    wall[name].append((time.perf_counter() - t0) / k)
                    cpu[name].append((time.process_time() - c0) / k)

            threads = _util.num_threads()
            for name in names:
                order, mth = name
                rec = dict(kind=kind, nnz=nnz, d=d, order=order, mode=mode, n=n, method=mth,
                           **meta[order], **_util.summarize(wall[name]), samples=wall[name],
                           cpu_samples=cpu[name],
                           cpu_per_wall=statistics.median(cv / max(w, 1e-12) for cv, w in zip(cpu[name], wall[name])),
                           number=number[name], first_call_s=first_s[name], rel_err=rel_err[name],
                           process_threads=threads, graph_gen_s=gen_s)
                if mth != "scipy":
                    rec["ratio_vs_scipy"] = paired_median_ratio(wall[name], wall[(order, "scipy")])
                if order != "none" and ("none", mth) in wall:
                    rec["speedup_vs_none"] = paired_median_ratio(wall[("none", mth)], wall[name])
                measured.setdefault((kind, nnz, d, order), []).append(rec)
            print(f"[{mode}] {group['sweep']} {kind} nnz={nnz} n={n} d={d} reps={repeats} " + " ".join(
                f"{o}/{m}={_util.fmt_s(statistics.median(v))}" for (o, m), v in wall.items()),
                file=sys.stderr, flush=True)
            del methods, jax_calls, xj, x
        for order in group["orders"]:
            records += [dict(r, sweep=group["sweep"]) for r in measured[(kind, nnz, d, order)]]

    info = _util.machine_info()
    info["process_threads_at_end"] = _util.num_threads()
    info["jax_devices"] = [str(dv) for dv in jax.devices()]
    with open(args.worker_out, "w") as f:
        json.dump(dict(mode=mode, machine=info, records=records), f, default=str)


# ----------------------------------------------------------------------------------------------
# parent: spawn one worker per thread setting, then tables + plot
# ----------------------------------------------------------------------------------------------


def run_workers(args, argv) -> list[dict]:
    tmp = tempfile.mkdtemp(prefix="bench_smoothing_")
    if args.cache_dir is None:
        args.cache_dir = tmp
    os.makedirs(args.cache_dir, exist_ok=True)
    outs = []
    for mode in args.threads:
        out = os.path.join(tmp, f"worker_{mode}.json")
        cmd = [sys.executable, os.path.abspath(__file__), *argv, "--worker", mode,
               "--worker-out", out, "--cache-dir", args.cache_dir]
        env = dict(os.environ)
        subprocess.run(cmd, check=True, env=env)
        with open(out) as f:
            outs.append(json.load(f))
    if args.cache_dir == tmp:
        for fn in os.listdir(tmp):
            if fn.endswith(".npz"):
                os.remove(os.path.join(tmp, fn))
    return outs


def tables(args, outs) -> str:
    recs = [r for o in outs for r in o["records"]]
    impls = args.impls
    lines = ["## psi (neumann, L=%d, beta=%g) under jax.jit vs scipy CSR, float32, CPU\n" % (args.layers, args.beta)]
    lines.append("Thread settings (each its own process; scipy's CSR matmul is always single-threaded):\n")
    env_rows = []
    for o in outs:
        m = o["machine"]
        label = "all cores" if o["mode"] == "all" else "1 core"
        env_rows.append([label, m["allowed_cpus"], m["process_threads_at_end"], m["XLA_FLAGS"] or "(none)",
                         ", ".join(f"{k}={v}" for k, v in m["thread_env"].items()) or "(unset)",
                         "%.2f %.2f %.2f" % tuple(m["loadavg"])])
    lines.append(_util.markdown_table(
        ["setting", "process CPUs", "process threads", "XLA_FLAGS", "thread env", "loadavg at end"], env_rows))
    m0 = outs[0]["machine"]
    lines.append(f"\nMachine: {_util.machine_line(m0)}. Times: median of {args.repeats} interleaved "
                 f"repetitions per method ({args.slow_repeats} when a call takes over {args.slow_s:g} s; "
                 "small cases loop each sample); ratio = median of the "
                 "per-repetition ratios jax/scipy (< 1 = jax faster).\n")

    def row_block(sel, key_cols, key_fn):
        rows = []
        groups: dict = {}
        for r in sel:
            groups.setdefault(key_fn(r), {})[r["method"]] = r
        for key, by in groups.items():
            sc = by.get("scipy")
            row = list(key)
            row += [_util.fmt_s(by[mth]["median_s"]) if mth in by else "-" for mth in ["scipy", *impls]]
            row += [f"{by[i]['ratio_vs_scipy']:.2f}" if i in by else "-" for i in impls]
            errs = [by[i]["rel_err"] for i in impls if i in by]
            row.append(f"{max(errs):.1e}" if errs else "-")
            del sc
            rows.append(row)
        head = key_cols + ["scipy", *impls] + [f"{i}/scipy" for i in impls] + ["max rel err"]
        return _util.markdown_table(head, rows)

    mode_label = {"all": "all", "1": "1"}
    sel = [r for r in recs if r["sweep"] == "nnz"]
    if sel:
        lines.append(f"### Time vs nnz (d = {args.d}, n = nnz/{args.avg_degree})\n")
        lines.append(row_block(sel, ["graph", "nnz", "n", "cores"],
                               lambda r: (r["kind"], _util.fmt_int(r["nnz_actual"]), _util.fmt_int(r["n"]),
                                          mode_label[r["mode"]])))
    sel = [r for r in recs if r["sweep"] == "d"]
    if sel:
        lines.append(f"\n### Time vs d (nnz = {_util.fmt_int(args.d_sweep_nnz)})\n")
        lines.append(row_block(sel, ["graph", "d", "cores"],
                               lambda r: (r["kind"], r["d"], mode_label[r["mode"]])))
    sel = [r for r in recs if r["sweep"] == "order"]
    if sel:
        lines.append(f"\n### Node ordering (nnz = {_util.fmt_int(args.reorder_nnz)}, d = {args.d})\n")
        lines.append("`none` = ids as generated (random: hubs scattered); `degree` = by decreasing degree; "
                     "`rcm` = reverse Cuthill-McKee. `offset` = mean |i - j| / n over the stored entries "
                     "(lower = more local column accesses); `reorder` = one-off cost of computing and "
                     "applying the permutation.\n")
        lines.append(row_block(sel, ["graph", "order", "offset", "reorder", "cores"],
                               lambda r: (r["kind"], r["order"], f"{r['mean_abs_offset']:.3f}",
                                          _util.fmt_s(r["reorder_s"]), mode_label[r["mode"]])))
        rows = []
        for kind in args.graphs:
            for mode in args.threads:
                for order in args.orders:
                    if order == "none":
                        continue
                    row = [kind, order, mode_label[mode]]
                    for mth in ["scipy", *impls]:
                        cur = [r for r in sel if (r["kind"], r["mode"], r["method"], r["order"]) == (kind, mode, mth, order)]
                        sp_ = cur[0].get("speedup_vs_none") if cur else None
                        row.append(f"{sp_:.2f}x" if sp_ else "-")
                    rows.append(row)
        if rows:
            lines.append("\nSpeed-up from reordering (median of per-repetition ratios time(`none`) / "
                         "time(ordering), all orderings timed interleaved):\n")
            lines.append(_util.markdown_table(["graph", "order", "cores", "scipy", *impls], rows))
    # effective parallelism: process CPU time / wall time while a method runs
    rows = []
    for o in outs:
        row = ["all cores" if o["mode"] == "all" else "1 core"]
        for mth in ["scipy", *impls]:
            mine = [r for r in o["records"] if r["method"] == mth]
            vals = [r["cpu_per_wall"] for r in mine if r["median_s"] > 0.05] or [r["cpu_per_wall"] for r in mine]
            row.append(f"{statistics.median(vals):.2f}" if vals else "-")
        rows.append(row)
    lines.append("\n### Effective parallelism\n")
    lines.append("Process CPU time / wall time while each method runs (median over the cases slower than "
                 "50 ms, or all cases if none is; 1.0 = one busy thread, up to the number of cores):\n")
    lines.append(_util.markdown_table(["setting", "scipy", *impls], rows))
    return "\n".join(lines)


def plot(args, outs, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [r for o in outs for r in o["records"]]
    colors = {"scipy": "black", "bcoo": "tab:blue", "segment_sum": "tab:orange", "chunked": "tab:green"}
    markers = {"uniform": "o", "powerlaw": "s"}
    styles = {"all": "--", "1": "-"}
    # the fair comparison (one core) when it was measured; --plot-all-modes adds the other
    plot_modes = ["1"] if "1" in args.threads and not args.plot_all_modes else list(args.threads)
    plot_modes = sorted(plot_modes, key=lambda m: m != "1")
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2))
    for ax, sweep, xkey, xlabel in (
        (axes[0], "nnz", "nnz_actual", "stored non-zeros of Ã (nnz)"),
        (axes[1], "d", "d", "embedding width d"),
    ):
        for kind in args.graphs:
            for mode in plot_modes:
                for mth in ["scipy", *args.impls]:
                    if mth == "scipy" and mode != plot_modes[0]:
                        continue  # scipy is single-threaded: one line is enough
                    sel = sorted((r for r in recs if r["sweep"] == sweep and r["kind"] == kind
                                  and r["mode"] == mode and r["method"] == mth), key=lambda r: r[xkey])
                    if not sel:
                        continue
                    lab = f"{mth} ({kind}" + ("" if mth == "scipy" or len(plot_modes) == 1
                                              else f", {'all cores' if mode == 'all' else '1 core'}") + ")"
                    ax.plot([r[xkey] for r in sel], [r["median_s"] for r in sel], styles[mode],
                            marker=markers.get(kind, "x"), color=colors.get(mth.split(":")[0]), label=lab, alpha=0.85)
        ax.set_xscale("log", base=2 if sweep == "d" else 10)
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("time per psi call (s)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_title(f"psi time vs nnz (d={args.d}, n=nnz/{args.avg_degree})")
    axes[1].set_title(f"psi time vs d (nnz={_util.fmt_int(args.d_sweep_nnz)})")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    m = outs[0]["machine"]
    where = "one core" if plot_modes == ["1"] else "all cores" if plot_modes == ["all"] else "1 core (solid) / all cores (dashed)"
    fig.suptitle(f"SEvo psi (neumann, L={args.layers}, float32) on CPU, {where}: jax.jit vs scipy CSR "
                 f"[{m['cpu_model']}, {m['nproc']} cores, jax {m.get('jax', '?')}]")
    fig.tight_layout(rect=(0, 0.12, 1, 0.95))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return
    t0 = time.perf_counter()
    outs = run_workers(args, argv)
    text = tables(args, outs)
    print(text)
    if args.plot and args.plot.lower() != "none":
        plot(args, outs, args.plot)
        print(f"\nPlot: {args.plot}")
    print(f"\n(total wall time {time.perf_counter() - t0:.0f} s)")
    _util.write_json(args.json, dict(args=vars(args), workers=outs))


if __name__ == "__main__":
    main()
