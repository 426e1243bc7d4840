"""`PruneRule`: which leaves to prune (a path regex) and how (score, structure, sparsity)."""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence, Union

from jaxcompress.pruning.distributions import DISTRIBUTIONS
from jaxcompress.pruning.masks import check_n_m
from jaxcompress.pruning.schedules import Schedule, check_sparsity
from jaxcompress.pruning.scores import NORMALIZATIONS, NORMS
from jaxcompress.rules import Rule

__all__ = ["PruneRule", "SCORES", "STRUCTURES", "SCOPES"]

SCORES = ("magnitude", "random", "saliency")
STRUCTURES = ("unstructured", "filter", "channel", "block", "n:m")
SCOPES = ("layer", "global")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PruneRule(Rule):
    """Prune the leaves whose path fully matches ``pattern``.

    Attributes:
      sparsity: fraction of zeros in [0, 1): a float or a ``step -> sparsity`` schedule (see
        `schedules`; optax schedules work). Not used by ``structure="n:m"`` (that is ``1 - n/m``).
      score: ``"magnitude"`` (``|w|``), ``"saliency"`` (SNIP ``|w * g|``; needs gradients) or
        ``"random"``.
      structure: what is pruned as a unit: ``"unstructured"`` (elements), ``"filter"`` (slices
        along the last, output axis), ``"channel"`` (slices along the contracting axis,
        ``ndim - 2``), ``"block"`` (``block_size`` tiles of the last two axes) or ``"n:m"``
        (keep ``n`` of every ``m`` consecutive weights along ``axis``).
      n, m: for ``"n:m"``: ``n`` KEPT out of every ``m``.
      axis: for ``"n:m"``, the grouped axis; default the contracting axis of a Flax kernel
        (0 for Dense ``(in, out)``, 2 for Conv ``HWIO``).
      block_size: for ``"block"``: an int or ``(rows, cols)``.
      norm: ``"l1"`` or ``"l2"``, how element scores are summed into filter/channel/block scores.
      scope: ``"layer"`` (each leaf hits its own sparsity) or ``"global"`` (one threshold over all
        leaves this rule matched; unstructured only).
      normalize: for global scope: rescale each leaf's scores first (``None``, ``"l1"``,
        ``"l2"``, ``"max"``, ``"mean"``).
      distribution: for layer scope: ``"uniform"`` or ``"erk"`` (per-leaf sparsities whose total
        over the rule's leaves is ``sparsity``). For a custom per-path map use one rule per path.
      skip: claim the matched leaves and leave them dense (first match wins).

    >>> PruneRule(pattern=r".*kernel", sparsity=0.9).describe()
    'magnitude unstructured 90% layer uniform'
    >>> PruneRule(pattern=r".*kernel", structure="n:m", n=2, m=4).describe()
    'magnitude 2:4 (2 kept of 4, axis=contracting)'
    """

    sparsity: Union[float, Schedule, None] = None
    score: str = "magnitude"
    structure: str = "unstructured"
    n: int | None = None
    m: int | None = None
    axis: int | None = None
    block_size: Union[int, Sequence[int], None] = None
    norm: str = "l1"
    scope: str = "layer"
    normalize: str | None = None
    distribution: str = "uniform"
    skip: bool = False

    def __post_init__(self):
        Rule.__post_init__(self)
        where = f"PruneRule(pattern={self.pattern!r})"
        _one_of(where, "score", self.score, SCORES)
        _one_of(where, "structure", self.structure, STRUCTURES)
        _one_of(where, "norm", self.norm, NORMS)
        _one_of(where, "scope", self.scope, SCOPES)
        _one_of(where, "distribution", self.distribution, DISTRIBUTIONS)
        if self.normalize is not None:
            _one_of(where, "normalize", self.normalize, NORMALIZATIONS)
        if self.skip:
            return
        if self.structure == "n:m":
            if self.n is None or self.m is None:
                raise ValueError(f"{where}: structure='n:m' needs n and m")
            check_n_m(self.n, self.m, name=where)
            if self.sparsity is not None:
                raise ValueError(f"{where}: n:m fixes the sparsity at 1 - n/m; do not pass sparsity")
            if self.scope != "layer" or self.distribution != "uniform":
                raise ValueError(f"{where}: n:m is per group of m weights; scope/distribution do not apply")
        else:
            if self.sparsity is None:
                raise ValueError(f"{where}: sparsity is required (a float in [0, 1) or a schedule)")
            if not callable(self.sparsity):
                check_sparsity(self.sparsity, f"{where}: sparsity")
            if self.n is not None or self.m is not None:
                raise ValueError(f"{where}: n and m only apply to structure='n:m'")
        if self.structure == "block" and self.block_size is None:
            raise ValueError(f"{where}: structure='block' needs block_size")
        if self.structure != "block" and self.block_size is not None:
            raise ValueError(f"{where}: block_size only applies to structure='block'")
        if self.axis is not None and self.structure != "n:m":
            raise ValueError(f"{where}: axis only applies to structure='n:m' (filter = last axis, channel = ndim - 2)")
        if self.scope == "global":
            if self.structure != "unstructured":
                raise ValueError(f"{where}: scope='global' supports structure='unstructured' only")
            if self.distribution != "uniform":
                raise ValueError(f"{where}: a global threshold decides per-leaf sparsities itself; distribution must be 'uniform'")
        elif self.normalize is not None:
            raise ValueError(f"{where}: normalize only applies to scope='global'")

    def sparsity_at(self, step: Any) -> Any:
        """The rule's target sparsity at ``step`` (a float rule is constant)."""
        if callable(self.sparsity):
            return self.sparsity(step)
        return self.sparsity

    @property
    def n_of_m(self) -> tuple[int, int]:
        """``(n, m)`` of an ``"n:m"`` rule (validated at construction).

        >>> PruneRule(pattern="w", structure="n:m", n=2, m=4).n_of_m
        (2, 4)
        """
        if self.n is None or self.m is None:
            raise ValueError(f"PruneRule(pattern={self.pattern!r}): structure={self.structure!r} has no n:m")
        return self.n, self.m

    def describe(self) -> str:
        """A short human-readable summary for reports."""
        if self.skip:
            return "skip"
        if self.structure == "n:m":
            axis = "contracting" if self.axis is None else str(self.axis)
            return f"{self.score} {self.n}:{self.m} ({self.n} kept of {self.m}, axis={axis})"
        sparsity = "scheduled" if callable(self.sparsity) else f"{self.sparsity:.0%}"
        structure = self.structure
        if self.structure == "block":
            structure = f"block {self.block_size}"
        if self.structure in ("filter", "channel", "block"):
            structure += f" {self.norm}"
        scope = f"global normalize={self.normalize}" if self.scope == "global" else f"layer {self.distribution}"
        return f"{self.score} {structure} {sparsity} {scope}"


def _one_of(where: str, field: str, value: Any, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{where}: {field} must be one of {tuple(allowed)}, got {value!r}")
