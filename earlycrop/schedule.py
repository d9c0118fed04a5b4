"""When to prune: the paper's weight-distance rule, with "epoch" replaced by N optimizer steps.

w_1 = the prunable weights after the first interval; after interval e, d_e = ‖w_e − w_1‖ / ‖w_1‖;
τ = d_2 · min(1 − S − 0.1, 0.99) (S = fraction removed; τ ≤ 0 never fires); prune after the first
interval e ≥ 3 with |d_e − d_{e−1}| < τ, or at the cap (docs/DESIGN.md §2).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass
class WeightDistanceRule:
    """Decides, from weight snapshots every `interval` steps, when pruning should happen.

    `state_dict` / `load_state_dict` let a resumed run continue the same trace (register the rule
    for checkpointing). w_1 is kept as float32 CPU copies, one per tensor: no giant concatenation.
    """

    interval: int
    cap: int
    sparsity: float
    trace: list[tuple[int, float]] = field(default_factory=list)
    w1: list[torch.Tensor] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.interval < 1 or self.cap < 1:
            raise ValueError("auto pruning needs interval >= 1 and cap >= 1 steps")
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity {self.sparsity} must be in [0, 1)")

    @property
    def threshold(self) -> float | None:
        if len(self.trace) < 2:
            return None
        return self.trace[1][1] * min(1.0 - self.sparsity - 0.1, 0.99)

    def _distance(self, weights: list[torch.Tensor], reduce: Callable[[torch.Tensor], torch.Tensor] | None) -> float:
        moved = sum(float((w.detach().float().cpu() - w1).square().sum()) for w, w1 in zip(weights, self.w1))
        base = sum(float(w1.square().sum()) for w1 in self.w1)
        if reduce is not None:  # each rank holds a share of the weights: sum the squares over the ranks
            moved, base = reduce(torch.tensor([moved, base], dtype=torch.float64)).tolist()
        return (moved / max(base, 1e-30)) ** 0.5

    def observe(self, step: int, weights: list[torch.Tensor],
                reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> bool:
        """Record the weights after optimizer step `step`; True when pruning should happen now. `weights` may
        be this rank's shares of the weights (ZeRO-3 partitions) with `reduce` summing over the ranks."""
        if step >= self.cap:
            return True
        if step % self.interval:
            return False
        if self.w1 is None:
            self.w1 = [w.detach().float().cpu().clone() for w in weights]
            self.trace.append((step, 0.0))
            return False
        self.trace.append((step, self._distance(weights, reduce)))
        # trace[0] is w_1 itself (d_1 = 0): interval e >= 3 has index >= 2
        tau = self.threshold
        if len(self.trace) < 3 or tau is None or tau <= 0:
            return False
        return abs(self.trace[-1][1] - self.trace[-2][1]) < tau

    def state_dict(self) -> dict:
        return {"trace": [list(t) for t in self.trace], "w1": self.w1 or []}

    def load_state_dict(self, state: dict) -> None:
        self.trace = [(int(s), float(d)) for s, d in state["trace"]]
        self.w1 = list(state["w1"]) or None
