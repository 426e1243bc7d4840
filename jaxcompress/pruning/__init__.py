"""Pruning: scores, exact masks, sparsity distributions and schedules, `prune_params` for
one-shot pruning and `prune(inner, rules)` (an `optax.GradientTransformation`) for training,
including dynamic sparse training (`SET`, `RigL`). Everything here is also exported from
`jaxcompress` itself (``jaxcompress.prune`` is the optax transform; the package is named
``pruning`` so that the two never shadow each other).

Modules, one idea each: `topk` (exact top-k by bisection, no sort), `scores`, `masks`
(unstructured / filter / channel / block / N:M), `distributions` (uniform, ERK), `schedules`,
`rule` (`PruneRule`), `plan` (rules -> per-leaf decisions and masks), `masktree` (apply/check
mask trees), `params` (`prune_params`), `inner_state` (param-shaped optimizer state),
`optax_wrapper` (`prune`, `prune_masks`, `prune_errors`), `dst` (SET / RigL).
"""

from jaxcompress.pruning.distributions import erk_sparsities, uniform_sparsities
from jaxcompress.pruning.dst import SET, RigL, drop_and_grow
from jaxcompress.pruning.masks import (
    block_mask,
    global_masks,
    magnitude_mask,
    n_m_mask,
    structured_mask,
    unstructured_mask,
)
from jaxcompress.pruning.masktree import apply_masks, check_masks, mask_sparsity
from jaxcompress.pruning.optax_wrapper import PruneFaults, PruneState, prune, prune_errors, prune_masks
from jaxcompress.pruning.params import prune_params
from jaxcompress.pruning.plan import PruneDecision, PrunePlan, plan_pruning
from jaxcompress.pruning.rule import PruneRule
from jaxcompress.pruning.schedules import constant, cosine_drop_fraction, one_shot, polynomial
from jaxcompress.pruning.scores import magnitude, random_scores, saliency
from jaxcompress.pruning.topk import LazyScore, global_top_k_masks, top_k_mask, top_k_masks

__all__ = [
    "LazyScore",
    "PruneDecision",
    "PrunePlan",
    "PruneRule",
    "PruneFaults",
    "PruneState",
    "RigL",
    "SET",
    "apply_masks",
    "block_mask",
    "check_masks",
    "constant",
    "cosine_drop_fraction",
    "drop_and_grow",
    "erk_sparsities",
    "global_masks",
    "global_top_k_masks",
    "magnitude",
    "magnitude_mask",
    "mask_sparsity",
    "n_m_mask",
    "one_shot",
    "plan_pruning",
    "polynomial",
    "prune",
    "prune_errors",
    "prune_masks",
    "prune_params",
    "random_scores",
    "saliency",
    "structured_mask",
    "top_k_mask",
    "top_k_masks",
    "uniform_sparsities",
    "unstructured_mask",
]
