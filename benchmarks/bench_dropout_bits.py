"""Transformer loss + gradient on real batches: 32-bit vs 16-bit dropout masks, one process.

For each of ``--models`` (SASRec, BERT4Rec, STOSA with their Beauty defaults), the jitted
``value_and_grad`` of the trainer's loss on the same training batches, with

* ``bits 32``: ``dropout_bits=32`` (flax ``nn.Dropout``'s masks: one threefry word per decision);
* ``bits 16``: ``dropout_bits=16`` (two decisions per threefry word, the default);
* ``before`` (with ``--before FILE``): the model class of another ``models.py`` (e.g. the one
  of commit 8c61242, before BERT4Rec and STOSA used the stored-factor Dropout, the Dense
  weight-gradient VJP and the hand-written LayerNorm backward), same parameters.

The ``bits 32`` loss and gradients must equal ``before``'s (the same masks from the same keys;
printed). Blocks alternate the variants' order; process CPU time, median over the batches of
the first batch's shape. Batches are unpacked unless ``--pack-rows``.

Usage::

    git show 8c61242:sevo_jax/models.py > /tmp/models_8c61242.py
    taskset -c 0 python benchmarks/bench_dropout_bits.py \\
        --data ../shared/data/amazon-beauty/Beauty.txt --before /tmp/models_8c61242.py

To check a rewrite of the 16-bit dropout, pass this checkout's own ``models.py`` from before it
(e.g. ``git show 1b54c22:sevo_jax/models.py``) and ``--pack-rows``: ``bits 16`` gets the same
masks, so its loss and gradients should equal ``before``'s (printed).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _util  # noqa: E402  (stdlib only)


def _load_module(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # flax dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="a data file (required unless --smoke)")
    p.add_argument("--models", nargs="+", default=None,
                   help="default: sasrec bert4rec stosa (--smoke: sasrec)")
    p.add_argument("--before", default=None, help="another models.py to compare with")
    p.add_argument("--batches", type=int, default=12)
    p.add_argument("--pack-rows", action="store_true",
                   help="the trainer's packed rows (default: the unpacked batches)")
    p.add_argument("--cpu", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="tiny synthetic data (seconds)")
    args = p.parse_args(argv)
    if args.data is None and not args.smoke:
        p.error("--data is required (or --smoke)")
    args.models = args.models or (["sasrec"] if args.smoke else ["sasrec", "bert4rec", "stosa"])
    _util.limit_threads(args.cpu)
    import jax
    import jax.numpy as jnp
    import numpy as np

    from sevo_jax import training

    info = _util.machine_info()
    print(_util.machine_line(info))
    before = _load_module(args.before, "models_before") if args.before else None
    ds, source = _util.model_data(args.data, args.smoke)
    if args.smoke:
        args.batches = 3
    rows = []
    for name in args.models:
        cfg = training.TrainConfig(model=name, optimizer="adamw", progress=False,
                                   pack_rows=args.pack_rows, **source).resolved()
        model, _, params, _ = training.init_training(cfg, ds)
        variants = {f"bits {b}": model.clone(dropout_bits=b) for b in (32, 16)}
        if before is not None:
            cls = getattr(before, type(model).__name__)
            fields = [f for f in cls.__dataclass_fields__ if f not in ("parent", "name")]
            variants = {"before": cls(**{f: getattr(model, f) for f in fields}), **variants}
        examples = training.training_examples(cfg, ds)
        batches = examples.epoch_batches(training.NegativeSampler(ds), cfg.batch_size,
                                         np.random.default_rng(0))
        batches = [b for _, b in zip(range(args.batches + 1), batches, strict=False)]
        shape = {k: v.shape for k, v in batches[0].items()}
        batches = [b for b in batches if {k: v.shape for k, v in b.items()} == shape]
        key = jax.random.PRNGKey(0)
        grads = {v: jax.jit(jax.value_and_grad(training.make_loss_fn(cfg, m)))
                 for v, m in variants.items()}
        first = {v: g(params, batches[0], key) for v, g in grads.items()}
        reference = "before" if before is not None else "bits 32"
        for v, (loss, grad) in first.items():
            diff = max(float(jnp.abs(a - b).max()) for a, b in
                       zip(jax.tree.leaves(grad), jax.tree.leaves(first[reference][1]),
                           strict=True))
            print(f"{name} {v}: loss {float(loss):.7f}; max |gradient - {reference}'s| {diff:.1e}")
        times: dict[str, list[float]] = {v: [] for v in grads}
        order = list(grads)
        for i, batch in enumerate(batches[1:]):
            for v in order if i % 2 == 0 else order[::-1]:
                t0 = time.process_time()
                jax.block_until_ready(grads[v](params, batch, key))
                times[v].append(time.process_time() - t0)
        base = float(np.median(times[reference]))
        for v, ts in times.items():
            med = float(np.median(ts))
            rows.append([name, v, f"{med * 1e3:.0f} ms", f"{med / base:.3f}", len(ts)])
    print(_util.markdown_table(["model", "variant", "loss + gradient (CPU time, median)",
                                "ratio", "batches"], rows))
    print("load average at the end:", os.getloadavg())


if __name__ == "__main__":
    main()
