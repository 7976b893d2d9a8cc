"""Row-sharded psi vs unsharded, and the per-table layout vs one global row split.

Runs on 8 devices: on a CPU-only machine 8 fake ones are created (XLA_FLAGS is set here
before jax is imported). Graph: bipartite users x items, 10 edges per node, d=32, L=3.

    python benchmarks/bench_sharding.py --users 400000 --items 600000   # 1M nodes / 10M edges
    python benchmarks/bench_sharding.py --smoke
"""
import argparse
import os
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax, jax.numpy as jnp, numpy as np, scipy.sparse as sp  # noqa: E401,E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import sevo_jax as sj  # noqa: E402
import sevo_jax.operator  # noqa: E402
from sevo_jax import sharding as sh  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--users", type=int, default=400_000)
parser.add_argument("--items", type=int, default=600_000)
parser.add_argument("--smoke", action="store_true", help="tiny sizes, a few seconds")
cli = parser.parse_args()
if cli.smoke:
    cli.users, cli.items = 400, 600
n_u, n_i, deg, d, L = cli.users, cli.items, 10, 32, 3
n = n_u + n_i
rng = np.random.default_rng(0)
e = n * deg // 2
r = rng.integers(0, n_u, e); c = rng.integers(n_u, n, e)   # bipartite user-item edges
a = sp.coo_matrix((np.ones(e), (r, c)), shape=(n, n)); a = (a + a.T).tocsr(); a.data[:] = 1.0
mesh = jax.make_mesh((8,), ("x",))
rows = sh.row_sharding(mesh, "x")
users = jax.device_put(jnp.asarray(rng.standard_normal((n_u, d)), jnp.float32), rows)
items = jax.device_put(jnp.asarray(rng.standard_normal((n_i, d)), jnp.float32), rows)
t0 = time.perf_counter(); g2 = sj.shard_graph(a, mesh, "x", (n_u, n_i)); t_build = time.perf_counter() - t0
g1 = sj.shard_graph(a, mesh, "x")            # one global block: the naive layout
ng = sj.as_normalized_graph(a)
print(f"n={n} nnz={a.nnz} d={d} L={L}; shard_graph build {t_build:.2f}s; {g2}")

def per_table(g, u, i, impl):  # chosen design: each table blocked separately, no reshard
    return sj.propagate(g, [u, i], 0.99, L, impl=impl)
def naive(g, u, i, impl):       # global concat, then a single row-sharded block
    x = jnp.concatenate([u, i])
    if g.local_sizes[0] * 8 != n:
        x = jax.sharding.reshard(x, NamedSharding(mesh, P()))
    y = sj.propagate(g, x, 0.99, L, impl=impl)
    return jax.sharding.reshard(y[:n_u], rows) if n_u % 8 == 0 else y[:n_u], y[n_u:]

def unsharded(g, u, i):
    y = sj.propagate(g, jnp.concatenate([u, i]), 0.99, L)
    return y[:n_u], y[n_u:]

def bench(name, f, *args):
    jf = jax.jit(f)
    t0 = time.perf_counter(); out = jax.block_until_ready(jf(*args)); tc = time.perf_counter() - t0
    hlo = jf.lower(*args).compile().as_text()
    colls = {k: len(re.findall(rf"= \S+ {k}(-start)?\(", hlo)) for k in ("all-gather", "all-to-all", "collective-permute", "all-reduce", "reduce-scatter")}
    ts = []
    for _ in range(5):
        t0 = time.perf_counter(); jax.block_until_ready(jf(*args)); ts.append(time.perf_counter() - t0)
    print(f"{name:28s} first call {tc:6.2f}s  median {np.median(ts)*1e3:8.1f} ms  collectives {colls}")
    return out

ref = bench("unsharded (1 device)", unsharded, ng, jax.device_get(users), jax.device_get(items))
for impl in sj.operator.MATMUL_IMPLS:
    o = bench(f"per-table layout {impl}", lambda g, u, i: per_table(g, u, i, impl), g2, users, items)
    assert max(float(jnp.abs(x - y).max()) for x, y in zip(o, ref)) < 1e-5
    o = bench(f"naive concat {impl}", lambda g, u, i: naive(g, u, i, impl), g1, users, items)
    assert max(float(jnp.abs(x - y).max()) for x, y in zip(o, ref)) < 1e-5
