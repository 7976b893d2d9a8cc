"""sevo_jax: SEvo (structure-aware embedding evolution, arXiv 2310.03032) as Optax transformations.

Where psi is applied: ``sevo_jax.psi.propagate`` (called by ``sevo_jax.transform.sevo_smooth``,
which every optimizer in ``sevo_jax.optimizers`` chains). The library core, imports in one
direction::

    graph.py            raw adjacencies A (builders) and normalize: Ã = D^-1/2 A D^-1/2 (scipy)
    operator.py         GraphOperator (the interface psi needs: matmul, apply, fingerprint) and
                        NormalizedGraph, the local COO operator with sparse_matmul
    operator_sharded.py ShardedGraph: the same operator split by rows across a mesh axis
    psi.py              propagate: psi(X) = c Y_L, Y_l = a X + beta Ã Y_{l-1}, written once
    transform.py        sevo_smooth: psi on the masked tables, as an optax.GradientTransformation
    optimizers.py       sevo_adamw (the paper's), sevo_adam, sevo_sgd, adamw_corrected

``masks.py`` (``select_tables``: choose the smoothed tables by name, for Linen params, NNX
state or plain dicts) stands beside the core and imports none of it. ``sharding.py`` (the
trainer's placement on a mesh), ``checkpoint.py`` and ``data``/``models``/``training``/``train``
(the experiment pipeline) build on the core; the core never imports them.
``xla_workarounds.py`` sets XLA:CPU flags at import (wrong YNN reductions in jaxlib 0.10;
512-bit vectors on CPUs with AVX-512);
``host_memory.py`` holds the glibc malloc settings the trainer's CLIs apply (no page faults on
XLA:CPU's per-step temporaries).
"""

from sevo_jax.xla_workarounds import disable_ynn_reductions, prefer_wide_vectors

disable_ynn_reductions()  # before JAX creates its CPU backend (sevo_jax/xla_workarounds.py)
prefer_wide_vectors()

from sevo_jax.graph import (  # noqa: E402
    category_graph,
    cooccurrence_graph,
    edge_list_graph,
    normalize,
    user_item_graph,
)
from sevo_jax.masks import select_tables  # noqa: E402
from sevo_jax.operator import GraphOperator, NormalizedGraph, as_normalized_graph  # noqa: E402
from sevo_jax.operator_sharded import ShardedGraph, shard_graph  # noqa: E402
from sevo_jax.optimizers import (  # noqa: E402
    ScaleByAdamCorrectedState,
    adamw_corrected,
    scale_by_adam_corrected,
    sevo_adam,
    sevo_adamw,
    sevo_sgd,
)
from sevo_jax.psi import APPROXIMATIONS, propagate  # noqa: E402
from sevo_jax.transform import SEvoSmoothState, sevo_smooth, smoothness  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "APPROXIMATIONS",
    "GraphOperator",
    "NormalizedGraph",
    "SEvoSmoothState",
    "ScaleByAdamCorrectedState",
    "ShardedGraph",
    "adamw_corrected",
    "as_normalized_graph",
    "category_graph",
    "cooccurrence_graph",
    "edge_list_graph",
    "normalize",
    "propagate",
    "scale_by_adam_corrected",
    "select_tables",
    "sevo_adam",
    "sevo_adamw",
    "sevo_sgd",
    "sevo_smooth",
    "shard_graph",
    "smoothness",
    "user_item_graph",
]
