"""sevo_jax: SEvo (structure-aware embedding evolution) as composable Optax transformations.

Where psi is applied: ``sevo_jax.smoothing.propagate`` (called by ``sevo_smooth``).
"""

from sevo_jax.graph import (
    category_graph,
    cooccurrence_graph,
    edge_list_graph,
    normalize,
    user_item_graph,
)
from sevo_jax.optimizers import (
    ScaleByAdamCorrectedState,
    adamw_corrected,
    scale_by_adam_corrected,
    sevo_adam,
    sevo_adamw,
    sevo_sgd,
)
from sevo_jax.smoothing import (
    APPROXIMATIONS,
    NormalizedGraph,
    SEvoSmoothState,
    as_normalized_graph,
    propagate,
    sevo_smooth,
    smoothness,
)

__version__ = "0.1.0"

__all__ = [
    "APPROXIMATIONS",
    "NormalizedGraph",
    "SEvoSmoothState",
    "ScaleByAdamCorrectedState",
    "adamw_corrected",
    "as_normalized_graph",
    "category_graph",
    "cooccurrence_graph",
    "edge_list_graph",
    "normalize",
    "propagate",
    "scale_by_adam_corrected",
    "sevo_adam",
    "sevo_adamw",
    "sevo_sgd",
    "sevo_smooth",
    "smoothness",
    "user_item_graph",
]
