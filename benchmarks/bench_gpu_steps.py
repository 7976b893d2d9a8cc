"""SASRec and GRU4Rec training steps on one accelerator: sevo_jax vs the paper's PyTorch code.

Made for the GPU machine (a 15-minute lease: ``benchmarks/gpu_lease.sh`` runs this and
``bench_gpu_smoothing.py``); runs on CPU too. The PyTorch side is ``bench_vs_pytorch``'s
re-implementation of MTandHJ/SEvo (models, ``torch.optim.AdamW``, ``AdamWSEvo``, psi with
``torch.sparse_csr``), moved to ``--device`` (default: cuda when torch sees one); sevo_jax runs
on JAX's default device. Both get the same Beauty batches (512 x 50, d = 64) and the same
initial parameters. Float32 matmuls are full float32 on both sides (JAX ``highest``
precision, torch without TF32) unless ``--tf32`` lets both use TF32.

For each model and AdamW / SEvo-AdamW:

* **agreement first**: one step with dropout off from the same parameters; the two losses must
  agree to ``--loss-tol`` (relative) and the updated item tables to ``--table-tol`` (max abs
  difference over max abs entry), else a one-line error and nothing is timed;
* **then speed**, dropout on (the real configuration): blocks of ``--steps`` steps alternate
  A B / B A over ``--repeats``; wall time per step (device synchronised after each block,
  not after each step, on both sides: ``block_until_ready`` / ``torch.cuda.synchronize``),
  medians and the median of per-block ratios sevo_jax / PyTorch (< 1: ours faster).

Usage::

    python benchmarks/bench_gpu_steps.py --beauty PATH/Beauty.txt
    python benchmarks/bench_gpu_steps.py --smoke          # tiny synthetic data, any device
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import _util  # noqa: E402  (stdlib only)
import bench_vs_pytorch as vs  # noqa: E402  (imports nothing heavy at module level)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--beauty", default=str(vs.DEFAULT_BEAUTY), help="Beauty.txt (seqtxt)")
    p.add_argument("--models", default="sasrec,gru4rec", help="comma list of: sasrec, gru4rec")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    p.add_argument("--repeats", type=int, default=7, help="timed blocks per side")
    p.add_argument("--steps", type=int, default=20, help="training steps per block")
    p.add_argument("--tf32", action="store_true", help="let both sides use TF32 matmuls")
    p.add_argument("--loss-tol", type=float, default=1e-4)
    p.add_argument("--table-tol", type=float, default=1e-3)
    p.add_argument("--smoke", action="store_true", help="tiny synthetic data, a few seconds")
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def synchronize(torch, device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def torch_side(ref, setup, torch, m: str, o: str, params, dropout: float, device: str):
    """The reference model with our initial ``params``, its optimizer, on ``device``."""
    module = vs.torch_model(ref, setup, m, dropout, mask_padding_keys=m == "sasrec" and
                            dropout == 0.0)
    vs.load_into(module, vs.flax_to_torch(m, params))
    module.to(device).train()
    return module, vs.torch_optimizer(ref, setup, module, o, setup.torch_csr.to(device))


def torch_step(module, optimizer, batch):
    loss = module.loss(*batch)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss


def agree(setup, ref, torch, m: str, o: str, device: str, args) -> dict:
    """One dropout-free step from the same parameters on both sides: losses and item tables."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    params, opt, step = vs.our_step(setup, m, o, 0.0)
    batch = setup.batches[m][0]
    p, _, loss = step(vs.fresh(params), vs.fresh(opt.init(params)),
                      {k: jnp.asarray(v) for k, v in setup.our_batches[m][0].items()},
                      jax.random.PRNGKey(0))
    module, topt = torch_side(ref, setup, torch, m, o, params, 0.0, device)
    tloss = torch_step(module, topt, tuple(t.to(device) for t in vs.torch_batch(m, batch)))
    ours_table = np.asarray(p["item_embedding"]["embedding"], np.float64)
    theirs_table = module.item.weight.detach().cpu().numpy().astype(np.float64)
    tloss_value = float(tloss.detach())
    loss_rel = abs(float(loss) - tloss_value) / max(abs(tloss_value), 1e-30)
    table_rel = vs.rel_max_abs(theirs_table, ours_table)
    for name, value, tol in (("loss", loss_rel, args.loss_tol),
                             ("item table", table_rel, args.table_tol)):
        if not value <= tol:
            raise SystemExit(f"bench_gpu_steps: {m} {o}: the first steps' {name} differ by "
                             f"{value:.3g} (relative), over the tolerance {tol:g}")
    return {"loss_rel": loss_rel, "table_rel": table_rel}


def time_steps(setup, ref, torch, m: str, o: str, device: str, args) -> dict:
    import jax
    import jax.numpy as jnp

    dropout = setup.configs[(m, o)].dropout
    params, opt, step = vs.our_step(setup, m, o, dropout)
    jbatches = [jax.device_put({k: jnp.asarray(v) for k, v in b.items()})
                for b in setup.our_batches[m]]
    keys = list(jax.random.split(jax.random.PRNGKey(1), 16))
    state = {"p": vs.fresh(params), "s": vs.fresh(opt.init(params)), "i": 0}
    t0 = time.perf_counter()
    state["p"], state["s"], loss = step(state["p"], state["s"], jbatches[0], keys[0])
    jax.block_until_ready(loss)
    first_step_s = time.perf_counter() - t0

    module, topt = torch_side(ref, setup, torch, m, o, params, dropout, device)
    tbatches = [tuple(t.to(device) for t in vs.torch_batch(m, b)) for b in setup.batches[m]]
    tstate = {"i": 0}

    ours = vs.step_block(step, state, jbatches, keys, args.steps)

    def theirs():
        for _ in range(args.steps):
            torch_step(module, topt, tbatches[tstate["i"] % len(tbatches)])
            tstate["i"] += 1
        synchronize(torch, device)

    ours()
    theirs()  # warm-up: allocations, cuSPARSE/cuBLAS handles
    times = {"ours": [], "torch": []}
    for r in range(args.repeats):
        for name, fn in ((("ours", ours), ("torch", theirs)) if r % 2 == 0
                         else (("torch", theirs), ("ours", ours))):
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) / args.steps)
    ratios = [a / b for a, b in zip(times["ours"], times["torch"], strict=True)]
    return {"first_step_s": first_step_s, "ours_s": statistics.median(times["ours"]),
            "torch_s": statistics.median(times["torch"]), "ratio": statistics.median(ratios),
            "ratio_min": min(ratios), "ratio_max": max(ratios), "raw": times}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.smoke:
        args.repeats, args.steps = 2, 2
    try:
        import torch
    except ImportError:
        raise SystemExit("bench_gpu_steps: PyTorch is not installed") from None
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    import jax

    jax.config.update("jax_default_matmul_precision", "tensorfloat32" if args.tf32 else "highest")
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    torch.manual_seed(0)
    models = [s.strip() for s in args.models.split(",") if s.strip()]
    unknown = [m for m in models if m not in vs.MODELS]
    if unknown:
        raise SystemExit(f"bench_gpu_steps: --models: unknown model {unknown[0]!r}; use "
                         f"{', '.join(vs.MODELS)}")
    setup = vs.Setup(argparse.Namespace(smoke=args.smoke, beauty=args.beauty,
                                        eval_batch_size=1024, no_pack_rows=False))
    setup.cache = {}
    cfg = setup.configs[("sasrec", "sevo-adamw")]
    setup.torch_csr = vs.reference_item_graph(setup.ds.train_sequences(), setup.ds.num_items,
                                              cfg.maxlen)
    ref = vs.torch_reference()
    jax_device = jax.devices()[0]
    gpu_name = torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu"
    rows, results = [], {"device": {"jax": str(jax_device), "torch": device, "name": gpu_name},
                         "tf32": args.tf32, "source": setup.source}
    for m in models:
        for o in vs.OPTIMIZERS:
            print(f"[bench_gpu_steps] {m} {o}: agreement, then timing ...", flush=True)
            check = agree(setup, ref, torch, m, o, device, args)
            timing = time_steps(setup, ref, torch, m, o, device, args)
            results[f"{m} {o}"] = {"agreement": check, **timing}
            rows.append([f"{m} {o}", f"{timing['ours_s'] * 1e3:.2f} ms",
                         f"{timing['torch_s'] * 1e3:.2f} ms",
                         f"**{timing['ratio']:.2f}** ({timing['ratio_min']:.2f}-"
                         f"{timing['ratio_max']:.2f})", f"{timing['first_step_s']:.1f} s",
                         f"{check['loss_rel']:.1e} / {check['table_rel']:.1e}"])
    print(_util.machine_line(_util.machine_info()))
    print(f"JAX device {jax_device} (jax {jax.__version__}); torch {torch.__version__} on "
          f"{device} ({gpu_name}); {'TF32' if args.tf32 else 'full float32'} matmuls; "
          f"{setup.source}; {args.repeats} blocks of {args.steps} steps per side")
    print(_util.markdown_table(
        ["train step", "sevo_jax (wall)", "PyTorch (wall)", "ratio (min-max)",
         "our first step (compile)", "agreement: loss / item table (rel)"], rows))
    _util.write_json(args.json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
