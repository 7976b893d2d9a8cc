"""SASRec loss + gradient, the three backward-pass fixes of issue 14 on and off, one process.

Variants (``before``: all off, as up to commit 24587db), added one at a time:

* ``flax.linen.Dropout`` vs ``sevo_jax.models.Dropout``: both draw the same masks from the same
  keys (the shim passes ``make_rng`` of the same module path to ``nn.Dropout``); only where
  XLA:CPU gets the masks in the backward pass differs (recomputed from the random bits inside
  the backward fusions vs the forward's stored ``keep / (1 - rate)`` factors);
* ``lax.dot_general`` vs the models' Dense contraction (a matmul whose custom VJP forms the
  weight gradient ``x^T g`` directly; XLA:CPU otherwise turns the transpose of ``g^T x`` into a
  copy of the ``(B*T, d)`` activation before each weight-gradient dot);
* ``flax.linen.LayerNorm`` vs ``sevo_jax.models.LayerNorm`` (the same maths and parameters with
  a hand-written backward pass).

Losses and gradients of all variants agree (printed).
Synthetic Beauty-sized batch: 512 x 50, d = 64, 12,101 items, dropout 0.3, one core, one thread.
Blocks alternate A B / B A; the ratio is the median of per-block ratios of process CPU time.

Usage::

    python benchmarks/bench_sasrec_backward.py --repeats 8
    python benchmarks/bench_sasrec_backward.py --smoke     # CI: tiny sizes, checks agreement
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _util  # noqa: E402  (stdlib only)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--calls", type=int, default=3, help="gradient calls per block")
    p.add_argument("--cpu", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="tiny sizes (seconds)")
    args = p.parse_args(argv)
    _util.limit_threads(args.cpu)
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np

    from sevo_jax import models

    class FlaxDropout(nn.Module):
        """``nn.Dropout`` fed the key ``models.Dropout`` would draw (same module path)."""

        rate: float
        mask_bits: int = 32  # models.Dropout's signature; flax's masks are the 32-bit ones

        @nn.compact
        def __call__(self, x, deterministic):
            if self.rate == 0.0 or deterministic:
                return x
            return nn.Dropout(self.rate)(x, deterministic=False, rng=self.make_rng("dropout"))

    FlaxDropout.__name__ = "Dropout"  # Flax names instances after the class: same paths, same keys

    batch, num_items, length = (8, 50, 10) if args.smoke else (512, 12101, 50)
    if args.smoke:
        args.repeats, args.calls = 2, 1
    rng = np.random.default_rng(0)
    seqs = np.zeros((batch, length), np.int32)
    for i, n in enumerate(rng.integers(3, length + 1, batch)):
        seqs[i, length - n:] = rng.integers(1, num_items + 1, n)
    targets = np.roll(seqs, -1, 1)
    targets[:, -1] = rng.integers(1, num_items + 1, batch)
    targets[seqs == 0] = 0
    negatives = rng.integers(1, num_items + 1, (batch, length)).astype(np.int32)
    inputs, targets = jnp.asarray(seqs), jnp.asarray(targets)
    items = jnp.stack([targets, jnp.asarray(negatives)], -1)
    # 32-bit masks: flax's, so that every variant draws the same (16-bit: bench_dropout_bits)
    model = models.SASRec(num_items, maxlen=length, features=16 if args.smoke else 64,
                          dropout_bits=32)
    params = model.init(jax.random.key(0), inputs[:2], deterministic=True)["params"]
    key = jax.random.key(1)

    def loss(params, key):
        hidden = model.apply({"params": params}, inputs, deterministic=False, rngs={"dropout": key})
        logits = model.apply({"params": params}, hidden, items, method="score")
        return models.sasrec_loss(logits[..., 0], logits[..., 1], targets != 0)

    def compiled(dropout_cls, dot_general, layer_norm_cls):
        saved = models.Dropout, models._dense_dot_general, models.LayerNorm
        models.Dropout, models._dense_dot_general, models.LayerNorm = (
            dropout_cls, dot_general, layer_norm_cls)
        try:
            return jax.jit(jax.value_and_grad(loss)).lower(params, key).compile()
        finally:
            models.Dropout, models._dense_dot_general, models.LayerNorm = saved

    dot, ours = jax.lax.dot_general, models._dense_dot_general
    fns = {"before": compiled(FlaxDropout, dot, nn.LayerNorm),
           "+ models.Dropout": compiled(models.Dropout, dot, nn.LayerNorm),
           "+ Dense matmul VJP": compiled(models.Dropout, ours, nn.LayerNorm),
           "+ models.LayerNorm (now)": compiled(models.Dropout, ours, models.LayerNorm)}
    (la, ga), *rest = (f(params, key) for f in fns.values())
    for name, (lb, gb) in zip(list(fns)[1:], rest, strict=True):
        diff = max(float(jnp.abs(a - b).max())
                   for a, b in zip(jax.tree.leaves(ga), jax.tree.leaves(gb), strict=True))
        print(f"{name}: loss {float(lb):.7f} vs before {float(la):.7f}; "
              f"max |gradient difference| {diff:.1e}")
        if abs(float(lb) - float(la)) > 1e-6 or diff > 1e-6:
            raise SystemExit(f"bench_sasrec_backward: {name} does not compute the same loss "
                             f"and gradient (loss {float(lb)} vs {float(la)}, {diff=})")
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(args.repeats):
        for name, f in (fns.items() if r % 2 == 0 else reversed(fns.items())):
            t = time.process_time()
            for _ in range(args.calls):
                jax.block_until_ready(f(params, key))
            times[name].append((time.process_time() - t) / args.calls)
    base = np.array(times["before"])
    print(_util.machine_line(_util.machine_info()))
    rows = [[k, _util.fmt_s(float(np.median(v))), f"{np.median(np.array(v) / base):.3f}"]
            for k, v in times.items()]
    print(_util.markdown_table(["variant", "loss + gradient (CPU time, median)",
                                "ratio to before"], rows))


if __name__ == "__main__":
    main()
