"""Matched pairs as the paper builds them: a k=1 net and the k>1 net of about the same parameters.
`PairDesign` is a study's `pairs:` key; the functions construct the nets."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from pydantic import Field, model_validator

from models.architecture import Architecture
from models.architecture import parameter_count
from orchestrator.run.config import Strict


class PairDesign(Strict):
    """Matched pairs as in the paper: a k=1 net and the net with k=factor functions and about
    the same parameters (`matched_multi` below). Give the deep nets' per-stage
    blocks, or parameter budgets to pick them."""
    deep: list[tuple[int, int, int]] | None = Field(None, max_length=100)
    budgets: list[Annotated[float, Field(gt=0, le=1e9)]] | None = Field(None, max_length=100)
    factors: list[int] = Field(default_factory=lambda: [4], min_length=1, max_length=64)
    width: int = Field(1, ge=1, le=64)

    @model_validator(mode="after")
    def _one_source(self) -> "PairDesign":
        if (self.deep is None) == (self.budgets is None):
            raise ValueError("pairs: give either deep (per-stage blocks) or budgets (parameters)")
        if any(not 2 <= c <= 64 for c in self.factors):
            raise ValueError("pairs.factors: each factor must be 2 to 64")
        if any(not 1 <= n <= 1000 for deep in self.deep or [] for n in deep):
            raise ValueError("pairs.deep: blocks per stage must be 1 to 1000")
        return self

    def deep_nets(self) -> list[tuple[int, ...]]:
        if self.budgets is None:
            assert self.deep is not None, "_one_source asks for deep or budgets"
            return [tuple(d) for d in self.deep]
        return [deep_for_budget(b, self.width) for b in self.budgets]

    def configurations(self) -> list[dict]:
        out = []
        for deep in self.deep_nets():
            out.append({"blocks": list(deep), "k": 1, "width": self.width})
            for c in self.factors:
                out.append({"blocks": list(matched_multi(tuple(deep), c, width=self.width)),
                            "k": c, "width": self.width})
        return out


@dataclass(frozen=True)
class Pair:
    """A k=1 net and the k>1 net of about the same parameters; `depth` is the latter's."""
    deep: str
    multi: str
    depth: int



def next_deep(deeps: list[tuple[int, ...]], side: str) -> tuple[int, ...] | None:
    """The deep net one step past the shallowest or deepest of `deeps` (the step between the
    two nearest that end, per stage), or None (fewer than two, or a stage without a block)."""
    deeps = sorted(set(deeps), key=lambda b: (sum(b), b))
    if len(deeps) < 2:
        return None
    end, inner = (deeps[0], deeps[1]) if side == "shallower" else (deeps[-1], deeps[-2])
    made = tuple(2 * e - i for e, i in zip(end, inner))
    return made if min(made) >= 1 and made != end else None


def matched_multi(deep_blocks: tuple[int, ...], factor: int, tolerance: float = 0.03,
                  width: int = 1) -> tuple[int, ...]:
    """The paper's construction: the multi-residual net with k=factor and 1/factor of the deep
    net's blocks per stage (rounded up); then, while its parameters are more than `tolerance`
    away from the deep net's, the one-block change (remove or add, any stage) that brings them
    closest, as the paper removed a block to turn (5,5,5) into (5,4,5)."""
    def gap(blocks) -> float:
        return abs(parameter_count(Architecture(blocks=blocks, k=factor, width=width)) / target - 1)

    target = parameter_count(Architecture(blocks=tuple(deep_blocks), k=1, width=width))
    blocks = tuple(-(-n // factor) for n in deep_blocks)
    while gap(blocks) > tolerance:
        moves = [tuple(b + (d if i == s else 0) for i, b in enumerate(blocks))
                 for s in range(len(blocks)) for d in (-1, 1)]
        best = min((m for m in moves if min(m) >= 1), key=gap)
        if gap(best) >= gap(blocks):
            break  # no single block brings it closer
        blocks = best
    return blocks


def deep_for_budget(budget: float, width: int = 1) -> tuple[int, ...]:
    """The k=1 net with near-uniform stages (later stages never longer) closest to `budget`."""
    best = None
    for n in range(1, 200):
        for cut in ((0, 0, 0), (0, 0, 1), (0, 1, 1)):
            blocks = tuple(n - c for c in cut)
            if min(blocks) < 1:
                continue
            p = parameter_count(Architecture(blocks=blocks, k=1, width=width))
            gap = abs(p - budget) / budget
            if best is None or gap < best[0]:
                best = (gap, blocks)
            if p > 2 * budget:
                return best[1]
    assert best is not None, "n=1 with no cut is always a net"
    return best[1]
