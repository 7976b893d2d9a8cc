"""sevo_jax against the paper's PyTorch code, side by side: agreement first, then speed.

The reference is MTandHJ/SEvo (``SASRec/main.py``, ``GRU4Rec/main.py``, ``optims/AdamW.py``,
``optims/utils.py``), re-implemented here in PyTorch (benchmark-only; install with
``pip install 'sevo_jax[bench]'``, i.e. torch 2.13.0, the CPU build) as the reference runs it:

* ``TorchSASRec``: pre-LN blocks ``q = LN(x); x = MHA(q, x, x) + x; x = LN(x); x = FFN(x) + x``
  with ``nn.MultiheadAttention`` and ``Conv1d(kernel_size=1)`` feed-forward layers, LayerNorm
  eps 1e-8, padding rows zeroed after the embedding and after every block, the CAUSAL mask
  only (``mask_padding_keys=True`` adds sevo_jax's padding-key mask for the agreement check),
  BCE over the non-padding positions;
* ``TorchGRU4Rec``: ``Embedding -> Dropout -> nn.GRU(bias=False) -> Linear``, inputs
  RIGHT-padded to the batch's longest prefix, the user vector at the last item, BPR loss;
* ``torch.optim.AdamW`` (the reference's AdamW run) and ``TorchAdamWSEvo`` (the reference's
  ``AdamWSEvo``: a per-parameter loop; the item table's group takes the moment-estimate
  correction and its directions are smoothed by psi before ``p <- p (1 - lr wd) - lr psi``);
* psi (neumann, L = 3) on the reference's item graph (co-occurrence of neighbours in the last
  ``maxlen`` training items, ``D^-1/2 A D^-1/2`` without self-loops) with ``torch.sparse_csr``
  matmuls (the reference uses ``torch_sparse`` through ``LGConv``; not installed here).

Every model is fed the SAME batches as sevo_jax's trainer (``training.training_examples`` +
``NegativeSampler``; Beauty: 512 x 50, d = 64). Before anything is timed, with our initial
parameters copied into the torch modules and dropout off, the script checks and records (max
abs differences; it stops with a one-line error when one exceeds its tolerance):

* the normalised graph and psi (sevo_jax vs torch CSR vs scipy CSR);
* loss and every parameter's gradient of one batch (SASRec, GRU4Rec);
* three optimizer updates fed identical gradients (AdamW and SEvo-AdamW, both models), in
  units of the learning rate;
* three full training steps: losses, and each step's gradient against torch's at our current
  parameters (the parameters after three steps are recorded, not checked: they drift);
* the full-ranking validation metrics (HR@k, NDCG@k) and every user's target rank.

Then, in ONE process pinned to one core (``_util.limit_threads``: one thread per library,
``--xla_cpu_multi_thread_eigen=false``, ``torch.set_num_threads(1)``), blocks alternate A B /
B A and the tables give medians of per-block step times (wall and process CPU time) and the
median of per-repetition ratios sevo_jax / PyTorch (< 1: ours faster):

* training steps (dropout on, the real configuration), AdamW and SEvo-AdamW, SASRec and GRU4Rec;
* psi, L = 3, on the item graph: sevo_jax ``propagate`` vs torch CSR vs scipy CSR (float32);
* full-ranking evaluation of every user (valid split, batch 1024): users per second.

Usage::

    python benchmarks/bench_vs_pytorch.py --beauty PATH/Beauty.txt > /tmp/vs_pytorch.md   # < 10 min
    python benchmarks/bench_vs_pytorch.py --smoke --json /tmp/smoke.json   # CI, synthetic, seconds
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import _util  # noqa: E402  (stdlib only)

DEFAULT_BEAUTY = REPO.parent / "shared" / "data" / "amazon-beauty" / "Beauty.txt"
MODELS = ("sasrec", "gru4rec")
OPTIMIZERS = ("adamw", "sevo-adamw")

# Max abs differences allowed by the agreement checks (float32 on both sides). Gradients and
# parameters are compared relative to the largest entry of their leaf; optimizer updates in
# units of the learning rate: a parameter near 1 (LayerNorm scales) stores p - lr u to float32's
# spacing 1.2e-7 = 1.2e-4 lr, so two roundings alone reach ~2.4e-4 lr. After full training
# steps the two models' float32 gradients differ too, and Adam's g / (|g| + eps) turns a tiny
# relative difference in a gradient entry near eps into a visible one (Beauty, SASRec: 0.012 lr
# after 3 steps in rarely seen item rows), hence the looser bound there; the same-gradient
# update check is the tight one.
TOLERANCES = {
    "graph": 1e-6,
    "psi": 1e-5,
    "loss": 1e-5,
    "grad_rel": 1e-4,
    "update_same_grads_lr": 1e-3,
    "train_loss": 1e-4,
    "metrics": 2e-3,
    # float32 near-ties may swap a target and one item (Beauty, random init: 8e-4 of users)
    "rank_mismatch_fraction": 5e-3,
    "max_rank_difference": 1,
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--beauty", default=str(DEFAULT_BEAUTY), help="Beauty.txt (seqtxt format)")
    p.add_argument("--models", default="sasrec,gru4rec", help="comma list of: sasrec, gru4rec")
    p.add_argument("--repeats", type=int, default=5, help="timed repetitions (A B / B A blocks)")
    p.add_argument("--steps", type=int, default=3, help="training steps per block")
    p.add_argument("--psi-calls", type=int, default=10, help="psi calls per block")
    p.add_argument("--eval-repeats", type=int, default=3, help="full evaluation passes per side")
    p.add_argument("--eval-batch-size", type=int, default=1024)
    p.add_argument("--cpu", type=int, default=0, help="the core to pin to")
    p.add_argument("--smoke", action="store_true", help="tiny synthetic data, a few seconds")
    p.add_argument("--no-pack-rows", action="store_true",
                   help="feed our SASRec the unpacked batches too (default: packed, as the "
                        "trainer does; the torch side always gets the reference's unpacked ones)")
    p.add_argument("--json", default=None, help="write agreement values and raw times here")
    return p.parse_args(argv)


def log(msg: str) -> None:
    print(f"[bench_vs_pytorch] {msg}", file=sys.stderr, flush=True)


class DisagreementError(RuntimeError):
    pass


# ---- the reference in PyTorch ---------------------------------------------------------------------
# Built inside a function so that importing this module does not need torch.


def torch_reference():
    """The reference's models, optimizer and smoother as PyTorch classes (a namespace)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class FeedForward(nn.Module):
        """``x + Dropout(Conv(Dropout(ReLU(Conv(x)))))``, 1x1 convolutions over positions."""

        def __init__(self, d: int, dropout: float):
            super().__init__()
            self.conv1 = nn.Conv1d(d, d, kernel_size=1)
            self.conv2 = nn.Conv1d(d, d, kernel_size=1)
            self.drop1 = nn.Dropout(dropout)
            self.drop2 = nn.Dropout(dropout)

        def forward(self, x):
            y = self.drop1(self.conv1(x.transpose(1, 2))).relu()
            return self.drop2(self.conv2(y)).transpose(1, 2) + x

    class TorchSASRec(nn.Module):
        """SASRec as in the reference; ``mask_padding_keys`` switches on sevo_jax's extra mask."""

        def __init__(self, num_items, maxlen, d, num_blocks, num_heads, dropout,
                     mask_padding_keys=False):
            super().__init__()
            self.d, self.num_heads, self.mask_padding_keys = d, num_heads, mask_padding_keys
            self.item = nn.Embedding(num_items + 1, d, padding_idx=0)
            self.position = nn.Embedding(maxlen, d)
            self.emb_dropout = nn.Dropout(dropout)
            self.attention_norms = nn.ModuleList(nn.LayerNorm(d, eps=1e-8) for _ in range(num_blocks))
            self.attentions = nn.ModuleList(
                nn.MultiheadAttention(d, num_heads, dropout=dropout, batch_first=True)
                for _ in range(num_blocks))
            self.ffn_norms = nn.ModuleList(nn.LayerNorm(d, eps=1e-8) for _ in range(num_blocks))
            self.ffns = nn.ModuleList(FeedForward(d, dropout) for _ in range(num_blocks))
            self.final_norm = nn.LayerNorm(d, eps=1e-8)
            self.register_buffer("positions", torch.arange(maxlen)[None, :])
            self.register_buffer("causal", torch.ones(maxlen, maxlen, dtype=torch.bool).triu(1))
            for m in self.modules():  # the reference's init; Conv1d and in_proj keep torch's
                if isinstance(m, nn.Linear):
                    nn.init.xavier_normal_(m.weight)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
                elif isinstance(m, nn.Embedding):
                    nn.init.xavier_normal_(m.weight)

        def attention_mask(self, seqs):
            if not self.mask_padding_keys:
                return self.causal
            # causal + padding keys; a finite fill like Flax's, so all-padding rows stay finite
            blocked = self.causal[None] | (seqs == 0)[:, None, :]
            fill = torch.finfo(torch.float32).min
            mask = torch.zeros(blocked.shape).masked_fill(blocked, fill)
            return mask.repeat_interleave(self.num_heads, dim=0)

        def forward(self, seqs):
            padding = (seqs == 0)[..., None]
            x = self.item(seqs) * self.d ** 0.5 + self.position(self.positions)
            x = self.emb_dropout(x).masked_fill(padding, 0.0)
            mask = self.attention_mask(seqs)
            for norm1, attention, norm2, ffn in zip(self.attention_norms, self.attentions,
                                                    self.ffn_norms, self.ffns):
                q = norm1(x)
                x = attention(q, x, x, attn_mask=mask, need_weights=False)[0] + x
                x = ffn(norm2(x)).masked_fill(padding, 0.0)
            return self.final_norm(x)

        def loss(self, seqs, positives, negatives):
            h = self.forward(seqs)
            pos = (h * self.item(positives)).sum(-1)
            neg = (h * self.item(negatives)).sum(-1)
            keep = positives != 0
            pos, neg = pos[keep], neg[keep]
            return (F.binary_cross_entropy_with_logits(pos, torch.ones_like(pos))
                    + F.binary_cross_entropy_with_logits(neg, torch.zeros_like(neg)))

        def user_vectors(self, seqs):
            return self.forward(seqs)[:, -1, :]

    class TorchGRU4Rec(nn.Module):
        """GRU4Rec as in the reference: inputs right-padded, user vector at the last item."""

        def __init__(self, num_items, d, dropout):
            super().__init__()
            self.item = nn.Embedding(num_items + 1, d, padding_idx=0)
            self.emb_dropout = nn.Dropout(dropout)
            self.gru = nn.GRU(d, d, 1, bias=False, batch_first=True)
            self.dense = nn.Linear(d, d)  # torch's default init, as in the reference
            nn.init.xavier_normal_(self.item.weight)
            nn.init.xavier_uniform_(self.gru.weight_hh_l0)
            nn.init.xavier_uniform_(self.gru.weight_ih_l0)

        def user_vectors(self, seqs):
            last = (seqs != 0).sum(1) - 1
            out, _ = self.gru(self.emb_dropout(self.item(seqs)))
            out = self.dense(out)
            return out[torch.arange(seqs.shape[0]), last]

        def loss(self, seqs, positives, negatives):
            h = self.user_vectors(seqs)
            pos = (h * self.item(positives)).sum(-1)
            neg = (h * self.item(negatives)).sum(-1)
            return F.softplus(neg - pos).mean()  # freerec's BPRLoss

    class TorchSmoother:
        """psi, neumann: ``(1-b)/(1-b^(L+1)) sum_l b^l A^l x`` with a CSR ``A``."""

        def __init__(self, adjacency, beta, num_layers):
            self.adjacency, self.beta, self.num_layers = adjacency, beta, num_layers

        @torch.no_grad()
        def __call__(self, x):
            out, h = x, x
            for _ in range(self.num_layers):
                h = (self.adjacency @ h) * self.beta
                out = out + h
            return out * ((1 - self.beta) / (1 - self.beta ** (self.num_layers + 1)))

    class TorchAdamWSEvo(torch.optim.Optimizer):
        """The reference's ``AdamWSEvo``: groups with a ``smoother`` get the corrected moments
        and a smoothed direction, the others plain AdamW; one parameter at a time."""

        def __init__(self, groups, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
            super().__init__(groups, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

        @torch.no_grad()
        def step(self):
            for group in self.param_groups:
                b1, b2 = group["betas"]
                lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
                smoother = group.get("smoother")
                params, directions = [], []
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    state = self.state[p]
                    if not state:
                        state["step"] = torch.tensor(0.0)
                        state["m"] = torch.zeros_like(p)
                        state["v"] = torch.zeros_like(p)
                    state["step"] += 1
                    t = state["step"].item()
                    g, m, v = p.grad, state["m"], state["v"]
                    p.mul_(1 - lr * wd)
                    if smoother is None:
                        m.mul_(b1).add_(g, alpha=1 - b1)
                        v.mul_(b2).addcmul_(g, g, value=1 - b2)
                        denom = (v.sqrt() / math.sqrt(1 - b2 ** t)).add_(eps)
                        p.addcdiv_(m, denom, value=-lr / (1 - b1 ** t))
                        continue
                    s = max(1.0, t - 1)  # Theorem 3: rows absent from the batch (zero gradient)
                    absent = (g == 0).all(dim=-1, keepdim=True)
                    m_in = torch.where(absent, m / (1 - b1 ** s), g)  # before m, v change
                    v_in = torch.where(absent, v / (1 - b2 ** s), g * g)
                    m.mul_(b1).add_(m_in, alpha=1 - b1)
                    v.mul_(b2).add_(v_in, alpha=1 - b2)
                    denom = (v.sqrt() / math.sqrt(1 - b2 ** t)).add_(eps)
                    params.append(p)
                    directions.append((m / (1 - b1 ** t)) / denom)
                if params:
                    smoothed = smoother(torch.cat(directions)).split([d.shape[0] for d in directions])
                    for p, d in zip(params, smoothed):
                        p.add_(d, alpha=-lr)

    class Namespace:
        pass

    ns = Namespace()
    ns.TorchSASRec, ns.TorchGRU4Rec = TorchSASRec, TorchGRU4Rec
    ns.TorchSmoother, ns.TorchAdamWSEvo = TorchSmoother, TorchAdamWSEvo
    return ns


def reference_item_graph(sequences, num_items: int, maxlen: int):
    """The reference's ``get_item_graph`` (H = 1, one padding row) as a torch CSR matrix, built
    independently of sevo_jax: consecutive items of the last ``maxlen`` training items are
    neighbours (weight 1 per occurrence, both directions), then ``D^-1/2 A D^-1/2``."""
    import numpy as np
    import torch

    src, dst = [], []
    for seq in sequences:
        seq = np.asarray(seq[-maxlen:], np.int64)
        src.append(seq[:-1])
        dst.append(seq[1:])
    src, dst = np.concatenate(src), np.concatenate(dst)
    index = torch.from_numpy(np.stack([np.concatenate([src, dst]), np.concatenate([dst, src])]))
    n = num_items + 1
    a = torch.sparse_coo_tensor(index, torch.ones(index.shape[1], dtype=torch.float64), (n, n))
    a = a.coalesce()
    deg = torch.zeros(n, dtype=torch.float64).index_add_(0, a.indices()[0], a.values())
    inv_sqrt = deg.pow(-0.5).masked_fill(deg == 0, 0.0)
    rows, cols = a.indices()
    weights = (inv_sqrt[rows] * a.values() * inv_sqrt[cols]).float()
    return torch.sparse_coo_tensor(a.indices(), weights, (n, n)).coalesce().to_sparse_csr()


# ---- parameters between Flax and torch ------------------------------------------------------------


def flax_to_torch(model: str, params) -> dict:
    """Our params (or gradients, or updates: the maps are linear) in the torch modules' layout."""
    import numpy as np
    import torch

    t = lambda x: torch.from_numpy(np.array(x, np.float32))
    if model == "gru4rec":
        return {"item.weight": t(params["item_embedding"]["embedding"]),
                "gru.weight_ih_l0": t(np.asarray(params["gru"]["input_kernel"]).T),
                "gru.weight_hh_l0": t(np.asarray(params["gru"]["recurrent_kernel"]).T),
                "dense.weight": t(np.asarray(params["dense"]["kernel"]).T),
                "dense.bias": t(params["dense"]["bias"])}
    out = {"item.weight": t(params["item_embedding"]["embedding"]),
           "position.weight": t(params["position_embedding"]["embedding"]),
           "final_norm.weight": t(params["final_norm"]["scale"]),
           "final_norm.bias": t(params["final_norm"]["bias"])}
    blocks = sorted((k for k in params if k.startswith("blocks_")), key=lambda k: int(k[7:]))
    for i, name in enumerate(blocks):
        b = params[name]
        att = b["attention"]
        d = np.asarray(att["query"]["kernel"]).shape[0]

        def w(k, att=att, d=d):  # torch layout (out, in)
            return np.asarray(att[k]["kernel"]).reshape(d, -1).T

        out.update({
            f"attention_norms.{i}.weight": t(b["attention_norm"]["scale"]),
            f"attention_norms.{i}.bias": t(b["attention_norm"]["bias"]),
            f"attentions.{i}.in_proj_weight": t(np.concatenate([w("query"), w("key"), w("value")])),
            f"attentions.{i}.in_proj_bias": t(np.concatenate(
                [np.asarray(att[k]["bias"]).reshape(-1) for k in ("query", "key", "value")])),
            f"attentions.{i}.out_proj.weight": t(np.asarray(att["out"]["kernel"]).reshape(-1, d).T),
            f"attentions.{i}.out_proj.bias": t(att["out"]["bias"]),
            f"ffn_norms.{i}.weight": t(b["ffn_norm"]["scale"]),
            f"ffn_norms.{i}.bias": t(b["ffn_norm"]["bias"]),
            f"ffns.{i}.conv1.weight": t(np.asarray(b["ffn_in"]["kernel"]).T[..., None]),
            f"ffns.{i}.conv1.bias": t(b["ffn_in"]["bias"]),
            f"ffns.{i}.conv2.weight": t(np.asarray(b["ffn_out"]["kernel"]).T[..., None]),
            f"ffns.{i}.conv2.bias": t(b["ffn_out"]["bias"]),
        })
    return out


def load_into(module, tensors: dict) -> None:
    import torch

    own = dict(module.named_parameters())
    if set(own) != set(tensors):
        raise DisagreementError(f"parameter names differ: torch {sorted(set(own) - set(tensors))} "
                                f"vs ours {sorted(set(tensors) - set(own))}")
    with torch.no_grad():
        for name, p in own.items():
            if p.shape != tensors[name].shape:
                raise DisagreementError(f"{name}: torch shape {tuple(p.shape)} vs ours "
                                        f"{tuple(tensors[name].shape)}")
            p.copy_(tensors[name])


def right_padded(left):
    """Left-padded id rows -> right-padded, cut to the longest row (the reference's GRU4Rec input)."""
    import numpy as np

    lengths = (left != 0).sum(1)
    width = max(int(lengths.max(initial=1)), 1)
    T = left.shape[1]
    j = np.arange(width)[None, :]
    src = np.clip(T - lengths[:, None] + j, 0, T - 1)
    return np.where(j < lengths[:, None], np.take_along_axis(left, src, 1), 0)


def torch_batch(model: str, batch: dict):
    import numpy as np
    import torch

    inputs = right_padded(batch["inputs"]) if model == "gru4rec" else batch["inputs"]
    return tuple(torch.from_numpy(np.asarray(x, np.int64))
                 for x in (inputs, batch["targets"], batch["negatives"]))


# ---- the experiment --------------------------------------------------------------------------------


class Setup:
    """Data, configs, our model/optimizers and the torch counterparts of one run."""

    def __init__(self, args):
        import numpy as np

        from sevo_jax import data as data_lib
        from sevo_jax import training

        self.args = args
        if args.smoke:
            self.ds = data_lib.synthetic(num_users=120, num_items=150, num_clusters=5,
                                         seq_len=(5, 14), seed=0)
            self.source = "synthetic (smoke)"
            sizes = dict(maxlen=10, features=16, batch_size=32, eval_batch_size=64)
        else:
            if not os.path.exists(args.beauty):
                raise SystemExit(f"bench_vs_pytorch: {args.beauty} not found; pass --beauty "
                                 "PATH/Beauty.txt (or --smoke for synthetic data)")
            self.ds = data_lib.load_dataset("seqtxt", args.beauty)
            self.source = f"Beauty ({args.beauty})"
            sizes = dict(maxlen=50, features=64, batch_size=512,
                         eval_batch_size=args.eval_batch_size)
        fmt = "synthetic" if args.smoke else "seqtxt"
        data = None if args.smoke else args.beauty
        self.configs = {
            (m, o): training.TrainConfig(model=m, optimizer=o, format=fmt, data=data,
                                         progress=False, **sizes).resolved()
            for m in MODELS for o in OPTIMIZERS}
        if args.no_pack_rows:
            self.configs = {k: _util.unpacked(c) for k, c in self.configs.items()}
        base = self.configs[("sasrec", "sevo-adamw")]
        self.adjacency = training.build_graph(base, self.ds)
        # the torch side gets the reference's (unpacked) batches, ours the same batches as
        # the trainer lays them out (packed rows, training.pack_rows, unless --no-pack-rows)
        self.batches, self.our_batches = {}, {}
        for m in MODELS:
            cfg = self.configs[(m, "adamw")]
            it = training.training_examples(_util.unpacked(cfg), self.ds).epoch_batches(
                training.NegativeSampler(self.ds), cfg.batch_size, np.random.default_rng([0, 1]))
            self.batches[m] = [next(it) for _ in range(4 if not args.smoke else 2)]
            self.our_batches[m] = [training.pack_rows(b) if cfg.pack_rows else b
                                   for b in self.batches[m]]


def max_abs(a, b) -> float:
    import numpy as np

    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)), initial=0.0))


def rel_max_abs(a, b) -> float:
    import numpy as np

    scale = float(np.max(np.abs(np.asarray(a, np.float64)), initial=0.0))
    return max_abs(a, b) / max(scale, 1e-30)


def check(agreement: dict, name: str, value: float, tolerance_key: str) -> None:
    """Record ``value`` under ``agreement["checked"]``; stop if it exceeds its tolerance."""
    tol = TOLERANCES[tolerance_key]
    agreement["checked"][name] = {"value": value, "tolerance": tol}
    if not value <= tol:  # also catches NaN
        raise DisagreementError(f"agreement check {name}: max abs difference {value:.3g} exceeds "
                                f"the tolerance {tol:g}")


def our_model_and_params(setup, m: str, dropout: float | None = None, seed: int = 0):
    """Our model (dropout of the config unless given) and its initial parameters."""
    import dataclasses

    import jax
    import jax.numpy as jnp

    from sevo_jax import training

    cfg = setup.configs[(m, "adamw")]
    if dropout is not None:
        cfg = dataclasses.replace(cfg, dropout=dropout)
    model = training.build_model(cfg, setup.ds)
    key = ("params", m, seed)  # the same for every dropout rate
    if key not in setup.cache:
        init = jax.jit(lambda k: model.init(k, jnp.zeros((1, cfg.maxlen), jnp.int32),
                                            deterministic=True)["params"])
        setup.cache[key] = init(jax.random.PRNGKey(seed))
    return model, setup.cache[key]


def torch_model(ref, setup, m: str, dropout: float, mask_padding_keys: bool):
    cfg = setup.configs[(m, "adamw")]
    if m == "sasrec":
        return ref.TorchSASRec(setup.ds.num_items, cfg.maxlen, cfg.features, cfg.num_blocks,
                               cfg.num_heads, dropout, mask_padding_keys)
    return ref.TorchGRU4Rec(setup.ds.num_items, cfg.features, dropout)


def torch_optimizer(ref, setup, module, o: str, adjacency_csr):
    import torch

    cfg = setup.configs[("sasrec", o)]
    kw = dict(lr=cfg.lr, betas=(cfg.b1, cfg.b2), eps=cfg.eps, weight_decay=cfg.weight_decay)
    if o == "adamw":
        return torch.optim.AdamW(module.parameters(), **kw)
    table = module.item.weight
    others = [p for p in module.parameters() if p is not table]
    smoother = ref.TorchSmoother(adjacency_csr, cfg.beta, cfg.num_layers)
    return ref.TorchAdamWSEvo([{"params": [table], "smoother": smoother}, {"params": others}], **kw)


def our_optimizer(setup, m: str, o: str):
    from sevo_jax import training

    key = ("optimizer", m, o)
    if key not in setup.cache:
        cfg = setup.configs[(m, o)]
        setup.cache[key] = training.build_optimizer(
            cfg, setup.adjacency if o.startswith("sevo") else None)
    return setup.cache[key]


def fresh(tree):
    """Copies of every array: the step donates params and state, and SEvo's state holds the
    optimizer's own graph arrays, which a donation would delete for later ``init`` calls."""
    import jax
    import jax.numpy as jnp

    return jax.tree_util.tree_map(jnp.array, tree)


def our_step(setup, m: str, o: str, dropout: float):
    """``(params, optimizer, step)``: the library's jitted training step (cached, so that
    ``--smoke`` compiles each once)."""
    import dataclasses

    from sevo_jax import training

    key = ("step", m, o, dropout)
    if key not in setup.cache:
        model, params = our_model_and_params(setup, m, dropout)
        opt = our_optimizer(setup, m, o)
        cfg = dataclasses.replace(setup.configs[(m, o)], dropout=dropout)
        setup.cache[key] = (params, opt, training.make_train_step(training.make_loss_fn(cfg, model), opt))
    return setup.cache[key]


def our_scorer(setup, m: str):
    from sevo_jax import training

    key = ("scorer", m)
    if key not in setup.cache:
        model, params = our_model_and_params(setup, m, 0.0)
        cfg = setup.configs[(m, "adamw")]
        setup.cache[key] = (params, training.make_scorer(cfg, model, num_items=setup.ds.num_items))
    return setup.cache[key]


def run_agreement(setup, ref) -> dict:
    """Every check of the module docstring; returns {name: max abs difference}."""
    import dataclasses

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    import scipy.sparse as sp
    import torch

    import sevo_jax
    from sevo_jax import training

    agreement = {"checked": {}, "info": {}}
    cfg = setup.configs[("sasrec", "sevo-adamw")]
    ours_graph = sevo_jax.as_normalized_graph(setup.adjacency)
    ours_csr = sp.csr_matrix(ours_graph.to_scipy())
    torch_csr = reference_item_graph(setup.ds.train_sequences(), setup.ds.num_items, cfg.maxlen)
    theirs = sp.csr_matrix((torch_csr.values().numpy(), torch_csr.col_indices().numpy(),
                            torch_csr.crow_indices().numpy()), shape=tuple(torch_csr.shape))
    if ours_csr.shape != theirs.shape or (ours_csr != 0).nnz != (theirs != 0).nnz:
        raise DisagreementError(f"graph structure differs: ours {ours_csr.shape} nnz {ours_csr.nnz}, "
                                f"reference {theirs.shape} nnz {theirs.nnz}")
    check(agreement, "graph_weights", float(abs(ours_csr - theirs).max()), "graph")

    x = np.random.default_rng(0).standard_normal((ours_csr.shape[0], cfg.features)).astype(np.float32)
    psi_ours = np.asarray(sevo_jax.propagate(ours_graph, jnp.asarray(x), cfg.beta, cfg.num_layers))
    psi_torch = ref.TorchSmoother(torch_csr, cfg.beta, cfg.num_layers)(torch.from_numpy(x)).numpy()
    psi_scipy = scipy_psi(ours_csr.astype(np.float32), x, cfg.beta, cfg.num_layers)
    check(agreement, "psi_vs_torch", max_abs(psi_ours, psi_torch), "psi")
    check(agreement, "psi_vs_scipy", max_abs(psi_ours, psi_scipy), "psi")

    for m in MODELS:
        if m not in setup.models:
            continue
        model, params = our_model_and_params(setup, m, dropout=0.0)
        no_dropout = {o: dataclasses.replace(setup.configs[(m, o)], dropout=0.0) for o in OPTIMIZERS}
        loss_and_grad = jax.jit(jax.value_and_grad(training.make_loss_fn(no_dropout["adamw"], model)))
        batch = setup.batches[m][0]
        jbatch = {k: jnp.asarray(v) for k, v in setup.our_batches[m][0].items()}
        loss, grads = loss_and_grad(params, jbatch, jax.random.PRNGKey(0))
        module = torch_model(ref, setup, m, 0.0, mask_padding_keys=True)
        load_into(module, flax_to_torch(m, params))
        module.eval()
        t_loss = module.loss(*torch_batch(m, batch))
        t_loss.backward()
        check(agreement, f"{m}_loss", abs(float(loss) - t_loss.item()), "loss")
        ours_g = flax_to_torch(m, grads)
        worst = max((rel_max_abs(ours_g[n], p.grad), n) for n, p in module.named_parameters())
        check(agreement, f"{m}_grad_rel", worst[0], "grad_rel")
        agreement["info"][f"{m}_grad_rel_worst_leaf"] = worst[1]

        # optimizers fed identical gradients (ours, converted): those of batches 0, 1, 0 at the
        # initial parameters, so that rows absent from one batch take the moment correction
        nb = len(setup.batches[m])
        batch_grads = [grads] + [
            loss_and_grad(params, {k: jnp.asarray(v) for k, v in setup.our_batches[m][i].items()},
                          jax.random.PRNGKey(0))[1] for i in range(1, min(nb, 2))]
        for o in OPTIMIZERS:
            opt = our_optimizer(setup, m, o)
            state = fresh(opt.init(params))
            p_ours = params

            @jax.jit
            def apply(g, state, p, opt=opt):
                updates, state = opt.update(g, state, p)
                return optax.apply_updates(p, updates), state

            mod = torch_model(ref, setup, m, 0.0, mask_padding_keys=True)
            load_into(mod, flax_to_torch(m, params))
            topt = torch_optimizer(ref, setup, mod, o, torch_csr)
            worst = 0.0
            for k in range(3):
                g = batch_grads[k % len(batch_grads)]
                before = flax_to_torch(m, p_ours)
                p_ours, state = apply(g, state, p_ours)
                after = flax_to_torch(m, p_ours)
                tg = flax_to_torch(m, g)
                t_before = {n: p.detach().clone() for n, p in mod.named_parameters()}
                for n, p in mod.named_parameters():
                    p.grad = tg[n].clone()
                topt.step()
                for n, p in mod.named_parameters():
                    du_ours = after[n] - before[n]
                    du_torch = p.detach() - t_before[n]
                    worst = max(worst, max_abs(du_ours, du_torch) / setup.configs[(m, o)].lr)
            check(agreement, f"{m}_{o}_update_same_grads_lr", worst, "update_same_grads_lr")

            # three full training steps, dropout off
            _, _, step = our_step(setup, m, o, 0.0)
            p_run, s_run = fresh(params), fresh(opt.init(params))
            mod = torch_model(ref, setup, m, 0.0, mask_padding_keys=True)
            load_into(mod, flax_to_torch(m, params))
            mod.train()
            topt = torch_optimizer(ref, setup, mod, o, torch_csr)
            loss_diff = step_grad_rel = 0.0
            for k in range(3):
                b = setup.batches[m][k % len(setup.batches[m])]
                ours_b = {kk: jnp.asarray(v) for kk, v in
                          setup.our_batches[m][k % len(setup.batches[m])].items()}
                # each step's gradient against torch's at OUR current parameters: the two
                # trajectories below drift apart (Adam turns float32 noise in near-zero
                # gradients into +-lr steps), this comparison does not
                at_ours = torch_model(ref, setup, m, 0.0, mask_padding_keys=True)
                load_into(at_ours, flax_to_torch(m, p_run))
                at_ours.train()
                at_ours.loss(*torch_batch(m, b)).backward()
                g_ours = flax_to_torch(m, loss_and_grad(p_run, ours_b, jax.random.PRNGKey(k))[1])
                step_grad_rel = max(step_grad_rel, max(rel_max_abs(g_ours[n], q.grad)
                                                       for n, q in at_ours.named_parameters()))
                p_run, s_run, l_ours = step(p_run, s_run, ours_b, jax.random.PRNGKey(k))
                l_t = mod.loss(*torch_batch(m, b))
                topt.zero_grad()
                l_t.backward()
                topt.step()
                loss_diff = max(loss_diff, abs(float(l_ours) - l_t.item()))
            final = flax_to_torch(m, p_run)
            diffs = {n: (final[n] - p.detach()).abs() / setup.configs[(m, o)].lr
                     for n, p in mod.named_parameters()}
            d = setup.configs[(m, o)].features
            key_bias = 0.0
            for n in [n for n in diffs if n.endswith("in_proj_bias")]:
                # the key projection's bias has an exactly zero gradient (softmax ignores a
                # shift shared by a row's logits); Adam turns its float32 noise into +-lr steps
                key_bias = max(key_bias, float(diffs[n][d:2 * d].max()))
                diffs[n][d:2 * d] = 0.0
            check(agreement, f"{m}_{o}_train_loss", loss_diff, "train_loss")
            check(agreement, f"{m}_{o}_train_step_grad_rel", step_grad_rel, "grad_rel")
            worst = max((float(v.max()), n) for n, v in diffs.items())
            agreement["info"][f"{m}_{o}_train_param_worst_leaf"] = worst[1]
            # recorded, not checked: after three steps an entry whose gradient is near zero
            # can differ by ~lr (Beauty, SASRec AdamW: 0.01 lr or 1.2 lr depending on XLA's
            # reduction order; BENCHMARKS.md "XLA:CPU's YNN reductions")
            agreement["info"][f"{m}_{o}_train_param_lr"] = worst[0]
            if m == "sasrec":
                agreement["info"][f"{m}_{o}_train_key_bias_lr"] = key_bias

        # full-ranking metrics with the initial parameters
        ecfg = setup.configs[(m, "adamw")]
        _, scorer = our_scorer(setup, m)
        ours_metrics = training.evaluate(ecfg, scorer, params, setup.ds, "valid")
        module.eval()
        theirs_ranks = []
        theirs_metrics = torch_evaluate(m, ecfg, module, setup.ds, ranks=theirs_ranks)
        check(agreement, f"{m}_metrics", max(abs(ours_metrics[k] - theirs_metrics[k])
                                             for k in ours_metrics), "metrics")
        # every user's target rank (a random model ranks most targets far below top 10, where
        # the metrics above cannot see them): ours from the library's pieces
        ours_ranks = our_ranks(setup, m, model, params)
        theirs_ranks = np.concatenate(theirs_ranks)
        check(agreement, f"{m}_rank_mismatch_fraction",
              float(np.mean(ours_ranks != theirs_ranks)), "rank_mismatch_fraction")
        check(agreement, f"{m}_max_rank_difference",
              float(np.abs(ours_ranks - theirs_ranks).max()), "max_rank_difference")
        agreement["info"][f"{m}_valid_ndcg10_ours_torch"] = (ours_metrics["NDCG@10"],
                                                             theirs_metrics["NDCG@10"])
    return agreement


def our_ranks(setup, m: str, model, params):
    """0-based valid-target ranks of every user from ``metrics.target_ranks`` on our scores."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from sevo_jax import metrics, training

    cfg = setup.configs[(m, "adamw")]

    @jax.jit
    def ranks(inputs, targets, seen):
        user = model.apply({"params": params}, inputs, deterministic=True)
        user = user[:, -1] if m == "sasrec" else user
        scores = model.apply({"params": params}, user, method="score_all")
        exclude = jnp.zeros(scores.shape, bool).at[jnp.arange(seen.shape[0])[:, None], seen].set(True)
        return metrics.target_ranks(scores, targets, exclude)

    inputs = training.eval_inputs(cfg, setup.ds, "valid")
    seen = setup.ds.seen_items("valid")
    width = training.exclusion_width(setup.ds)  # one seen-items width (the last batch is short)
    out = []
    for start in range(0, setup.ds.num_users, cfg.eval_batch_size):
        rows = np.arange(start, min(start + cfg.eval_batch_size, setup.ds.num_users))
        out.append(np.asarray(ranks(inputs[rows], setup.ds.valid[rows].astype(np.int32),
                                    training.padded_rows(seen, rows, width=width))))
    return np.concatenate(out)


def scipy_psi(a, x, beta, num_layers):
    out, h = x, x
    for _ in range(num_layers):
        h = (a @ h) * beta
        out = out + h
    return out * ((1 - beta) / (1 - beta ** (num_layers + 1)))


def torch_evaluate(m: str, cfg, module, ds, ks=(1, 5, 10), ranks: list | None = None) -> dict:
    """Full ranking of the valid split like ``training.evaluate``: earlier items masked, the
    target always a candidate, ties counted against the target. Appends each batch's 0-based
    target ranks to ``ranks`` if given."""
    import numpy as np
    import torch

    from sevo_jax import training

    inputs = training.eval_inputs(cfg, ds, "valid")
    seen = ds.seen_items("valid")
    targets = torch.from_numpy(ds.valid.astype(np.int64))
    sums = {f"{name}@{k}": 0.0 for name in ("HR", "NDCG") for k in ks}
    bs = cfg.eval_batch_size
    with torch.no_grad():
        for start in range(0, ds.num_users, bs):
            stop = min(start + bs, ds.num_users)
            seqs = inputs[start:stop]
            if m == "gru4rec":
                seqs = right_padded(seqs)
            h = module.user_vectors(torch.from_numpy(seqs.astype(np.int64)))
            scores = h @ module.item.weight.T
            tgt = targets[start:stop]
            rows = torch.arange(stop - start)
            target_score = scores[rows, tgt][:, None]
            block = seen[start:stop]
            scores[torch.from_numpy(np.repeat(np.arange(stop - start), np.diff(block.indptr))),
                   torch.from_numpy(block.indices.astype(np.int64))] = -math.inf
            scores[:, 0] = -math.inf
            scores[rows, tgt] = -math.inf
            rank = (scores >= target_score).sum(1).double()
            if ranks is not None:
                ranks.append(rank.numpy())
            for k in ks:
                hit = rank < k
                sums[f"HR@{k}"] += float(hit.sum())
                sums[f"NDCG@{k}"] += float((hit / torch.log2(rank + 2)).sum())
    return {k: v / ds.num_users for k, v in sums.items()}


# ---- timing ---------------------------------------------------------------------------------------


def alternate(fns: dict, repeats: int) -> dict:
    """``fns``: name -> callable timing ONE block and returning nothing. Blocks alternate in
    order / reversed order; returns name -> {"wall": [...], "cpu": [...]} per block."""
    names = list(fns)
    out = {n: {"wall": [], "cpu": []} for n in names}
    for r in range(repeats):
        for n in (names if r % 2 == 0 else names[::-1]):
            c0, t0 = time.process_time(), time.perf_counter()
            fns[n]()
            out[n]["wall"].append(time.perf_counter() - t0)
            out[n]["cpu"].append(time.process_time() - c0)
    return out


def summarize_pair(times: dict, ours: str, theirs: str, per: int) -> dict:
    res = {}
    for kind in ("wall", "cpu"):
        a = [x / per for x in times[ours][kind]]
        b = [x / per for x in times[theirs][kind]]
        res[kind] = {"ours_median_s": statistics.median(a), "torch_median_s": statistics.median(b),
                     "ratio": statistics.median(x / y for x, y in zip(a, b)),
                     "ratio_min": min(x / y for x, y in zip(a, b)),
                     "ratio_max": max(x / y for x, y in zip(a, b))}
    return res


def step_block(step, state: dict, batches: list, keys: list, steps: int):
    """A callable running ``steps`` calls of the jitted train ``step`` from ``state`` (``p``,
    ``s``, ``i``: params, optimizer state, steps taken; updated), cycling through ``batches``
    and ``keys``, then waiting for the device."""
    import jax

    def run():
        p, s, loss = state["p"], state["s"], None
        for _ in range(steps):
            i = state["i"]
            p, s, loss = step(p, s, batches[i % len(batches)], keys[i % len(keys)])
            state["i"] += 1
        jax.block_until_ready((p, s, loss))
        state["p"], state["s"] = p, s

    return run


def time_train_steps(setup, ref, m: str, o: str) -> dict:
    import jax
    import jax.numpy as jnp

    args, cfg = setup.args, setup.configs[(m, o)]
    dropout = 0.0 if args.smoke else cfg.dropout  # --smoke: reuse the agreement's compiled step
    params, opt, compiled = our_step(setup, m, o, dropout)
    jbatches = [jax.device_put({k: jnp.asarray(v) for k, v in b.items()})
                for b in setup.our_batches[m]]
    tbatches = [torch_batch(m, b) for b in setup.batches[m]]
    keys = list(jax.random.split(jax.random.PRNGKey(1), 16))
    state = {"p": fresh(params), "s": fresh(opt.init(params)), "i": 1}
    t0 = time.perf_counter()
    state["p"], state["s"], loss = compiled(state["p"], state["s"], jbatches[0], keys[0])
    jax.block_until_ready(loss)
    first_step_s = time.perf_counter() - t0

    module = torch_model(ref, setup, m, dropout, mask_padding_keys=False)  # the reference
    load_into(module, flax_to_torch(m, params))
    module.train()
    topt = torch_optimizer(ref, setup, module, o, setup.torch_csr)
    tstate = {"i": 0}

    ours = step_block(compiled, state, jbatches, keys, args.steps)

    def theirs():
        for _ in range(args.steps):
            b = tbatches[tstate["i"] % len(tbatches)]
            loss = module.loss(*b)
            topt.zero_grad()
            loss.backward()
            topt.step()
            loss.item()
            tstate["i"] += 1

    ours()
    theirs()  # warm-up: first steps' allocations
    times = alternate({"ours": ours, "torch": theirs}, args.repeats)
    return {"first_step_s": first_step_s, **summarize_pair(times, "ours", "torch", args.steps),
            "raw": times}


def time_psi(setup, ref) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import scipy.sparse as sp
    import torch

    import sevo_jax

    args, cfg = setup.args, setup.configs[("sasrec", "sevo-adamw")]
    graph = sevo_jax.as_normalized_graph(setup.adjacency)
    csr32 = sp.csr_matrix(graph.to_scipy()).astype(np.float32)
    x = np.random.default_rng(1).standard_normal((graph.num_nodes, cfg.features)).astype(np.float32)
    jx, tx = jnp.asarray(x), torch.from_numpy(x)
    smoother = ref.TorchSmoother(setup.torch_csr, cfg.beta, cfg.num_layers)
    run = {
        "ours": lambda: jax.block_until_ready(sevo_jax.propagate(graph, jx, cfg.beta, cfg.num_layers)),
        "torch": lambda: smoother(tx),
        "scipy": lambda: scipy_psi(csr32, x, cfg.beta, cfg.num_layers),
    }
    for f in run.values():
        f()
    blocks = {n: (lambda f=f: [f() for _ in range(args.psi_calls)]) for n, f in run.items()}
    times = alternate(blocks, max(args.repeats, 3))
    return {"nodes": graph.num_nodes, "nnz": graph.nnz, "d": cfg.features,
            "vs_torch": summarize_pair(times, "ours", "torch", args.psi_calls),
            "vs_scipy": summarize_pair(times, "ours", "scipy", args.psi_calls),
            "scipy_median_s": statistics.median(t / args.psi_calls for t in times["scipy"]["cpu"]),
            "raw": times}


def time_evaluation(setup, ref, m: str) -> dict:
    from sevo_jax import training

    cfg = setup.configs[(m, "adamw")]
    params, scorer = our_scorer(setup, m)
    module = torch_model(ref, setup, m, 0.0, mask_padding_keys=False)  # the reference
    load_into(module, flax_to_torch(m, params))
    module.eval()
    t0 = time.perf_counter()
    training.evaluate(cfg, scorer, params, setup.ds, "valid")  # compiles every padded width
    first_pass_s = time.perf_counter() - t0
    torch_evaluate(m, cfg, module, setup.ds)
    times = alternate({"ours": lambda: training.evaluate(cfg, scorer, params, setup.ds, "valid"),
                       "torch": lambda: torch_evaluate(m, cfg, module, setup.ds)},
                      setup.args.eval_repeats)
    res = summarize_pair(times, "ours", "torch", 1)
    users = setup.ds.num_users
    for kind in ("wall", "cpu"):
        res[kind]["ours_users_per_s"] = users / res[kind]["ours_median_s"]
        res[kind]["torch_users_per_s"] = users / res[kind]["torch_median_s"]
    return {"users": users, "batch": cfg.eval_batch_size, "first_pass_s": first_pass_s, **res,
            "raw": times}


# ---- report ---------------------------------------------------------------------------------------


def _ms(x: float) -> str:
    return f"{x * 1e3:.1f} ms" if x < 10 else f"{x:.1f} s"


def report(results: dict, argv, info: dict) -> str:
    cmd = "python benchmarks/bench_vs_pytorch.py" + ("" if not argv else " " + " ".join(argv))
    lines = ["## sevo_jax vs the PyTorch reference (MTandHJ/SEvo), side by side", "",
             f"Command: `{cmd}`  ", f"Machine: {_util.machine_line(info)}; torch "
             f"{results['torch_version']}  ", f"Data: {results['source']}; one process pinned to "
             "one core, one thread per library; blocks alternate A B / B A.", "",
             "Agreement (checked before timing; max abs differences, dropout off, our initial "
             "parameters copied into the torch modules; SASRec with the padding-key mask on "
             "in torch for the check only):", ""]
    rows = [[k, f"{v['value']:.2e}", f"{v['tolerance']:g}"]
            for k, v in results["agreement"]["checked"].items()]
    lines += [_util.markdown_table(["check", "value", "tolerance"], rows), ""]
    info = results["agreement"]["info"]
    lines += ["Not checked: " + "; ".join(
        f"{k} = {v:.3g}" if isinstance(v, float) else f"{k} = {v}" for k, v in info.items()) + ".", ""]
    head = ["what", "sevo_jax (CPU time)", "PyTorch (CPU time)",
            "ratio sevo_jax / PyTorch, CPU (min-max)", "ratio, wall"]
    rows = []
    for key, r in results["train"].items():
        c, w = r["cpu"], r["wall"]
        rows.append([f"{key} train step (first step with compilation {r['first_step_s']:.1f} s)",
                     _ms(c["ours_median_s"]),
                     _ms(c["torch_median_s"]),
                     f"**{c['ratio']:.2f}** ({c['ratio_min']:.2f}-{c['ratio_max']:.2f})",
                     f"{w['ratio']:.2f}"])
    if "psi" in results:
        p = results["psi"]
        for other in ("torch", "scipy"):
            c, w = p[f"vs_{other}"]["cpu"], p[f"vs_{other}"]["wall"]
            rows.append([f"psi L=3, {p['nodes']:,} nodes, {p['nnz']:,} nnz, d={p['d']} "
                         f"(vs {other} CSR)", _ms(c["ours_median_s"]), _ms(c["torch_median_s"]),
                         f"**{c['ratio']:.2f}** ({c['ratio_min']:.2f}-{c['ratio_max']:.2f})",
                         f"{w['ratio']:.2f}"])
    for m, r in results.get("eval", {}).items():
        c, w = r["cpu"], r["wall"]
        rows.append([f"{m} full-ranking evaluation, {r['users']:,} users, batch {r['batch']} "
                     f"(users/s; first pass with compilation {r['first_pass_s']:.1f} s)",
                     f"{c['ours_users_per_s']:,.0f} users/s", f"{c['torch_users_per_s']:,.0f} users/s",
                     f"**{c['ratio']:.2f}** ({c['ratio_min']:.2f}-{c['ratio_max']:.2f}) (time)",
                     f"{w['ratio']:.2f}"])
    lines += [_util.markdown_table(head, rows), ""]
    lines.append("Times: median over blocks of the per-step (per-call, per-pass) time; ratios: "
                 "median of the per-repetition ratios of sevo_jax's time to PyTorch's "
                 "(< 1: sevo_jax faster; for psi the second column is the named peer).")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    _util.limit_threads(args.cpu)  # before numpy / jax / torch load
    if args.smoke:  # checks that everything runs and agrees; the times mean nothing
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + " --xla_backend_optimization_level=0").strip()
        args.repeats, args.steps, args.psi_calls, args.eval_repeats = 2, 1, 2, 2
    try:
        import torch
    except ImportError:
        raise SystemExit("bench_vs_pytorch: PyTorch is not installed; pip install "
                         "'sevo_jax[bench]' (torch==2.13.0)") from None
    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set in this process
        pass
    torch.manual_seed(0)
    models = [s.strip() for s in args.models.split(",") if s.strip()]
    for m in models:
        if m not in MODELS:
            raise SystemExit(f"bench_vs_pytorch: --models: unknown model {m!r}; use {', '.join(MODELS)}")

    ref = torch_reference()
    log("data, graph and batches ...")
    setup = Setup(args)
    setup.models = models
    setup.cache = {}
    cfg = setup.configs[("sasrec", "sevo-adamw")]
    setup.torch_csr = reference_item_graph(setup.ds.train_sequences(), setup.ds.num_items, cfg.maxlen)

    log("agreement checks ...")
    try:
        agreement = run_agreement(setup, ref)
    except DisagreementError as e:
        raise SystemExit(f"bench_vs_pytorch: {e}") from None
    results = {"source": setup.source, "torch_version": torch.__version__,
               "agreement": agreement, "tolerances": TOLERANCES, "train": {}, "eval": {}}
    for m in models:
        for o in OPTIMIZERS:
            log(f"timing {m} {o} train steps ...")
            results["train"][f"{m} {o}"] = time_train_steps(setup, ref, m, o)
    log("timing psi ...")
    results["psi"] = time_psi(setup, ref)
    for m in models:
        log(f"timing {m} evaluation ...")
        results["eval"][m] = time_evaluation(setup, ref, m)

    import jax  # noqa: F401  (versions for the machine line)
    import numpy  # noqa: F401
    import scipy  # noqa: F401

    info = _util.machine_info()
    print(report(results, argv, info))
    _util.write_json(args.json, {"machine": info, "argv": argv, **results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
