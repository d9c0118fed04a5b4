"""Per-unit importance scores: the data a criterion produces and selection consumes.

Its own module so that selection (and the budget search) use scores without depending on criteria.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch


@dataclass
class Scores:
    """Per-layer importance: heads [H_l] and neurons [I_l] for every layer l; larger = keep."""

    heads: list[torch.Tensor]
    neurons: list[torch.Tensor]

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """float32 tensors for safetensors: `heads` [L × H], `neurons` [L × I] when every layer is the
        same size (always for a dense model), else one `heads.<l>` / `neurons.<l>` per layer."""
        out: dict[str, torch.Tensor] = {}
        for key, rows in (("heads", self.heads), ("neurons", self.neurons)):
            rows = [r.detach().float().cpu().contiguous() for r in rows]
            if len({r.numel() for r in rows}) == 1:
                out[key] = torch.stack(rows)
            else:
                out.update({f"{key}.{i}": r for i, r in enumerate(rows)})
        return out

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor]) -> Scores:
        def rows(key: str) -> list[torch.Tensor]:
            if key in tensors:
                return list(tensors[key].unbind(0))
            n = sum(1 for k in tensors if k.startswith(f"{key}."))
            return [tensors[f"{key}.{i}"] for i in range(n)]

        return cls(heads=rows("heads"), neurons=rows("neurons"))

    def check_finite(self, criterion: str) -> None:
        """Refuse NaN/Inf scores, naming the layer: they would otherwise pick units silently."""
        for kind, rows in (("heads", self.heads), ("neurons", self.neurons)):
            for layer, r in enumerate(rows):
                if not torch.isfinite(r).all():
                    raise FloatingPointError(
                        f"scoring: criterion {criterion!r} produced NaN/Inf {kind} scores in layer {layer} "
                        f"({int((~torch.isfinite(r)).sum())} of {r.numel()} units): check that layer's weights, "
                        "the loss on the calibration batches and the learning rate"
                    )
