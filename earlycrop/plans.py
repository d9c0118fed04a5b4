"""`SelectionConfig` (how much to remove and how to spread it) and `Plan` (the kept units per layer): plain data,
JSON on disk, no torch, so a shape-only plan (`earlycrop plan`) imports neither torch nor transformers.
`earlycrop.select.make_plan` turns scores into a Plan."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal


@dataclass
class SelectionConfig:
    """How much to remove and how to spread it.

    `heads` and `mlp` are the fractions REMOVED. `layout: uniform` keeps the same count in every
    layer (the result loads with plain `from_pretrained` where the family allows); `global`
    ranks all layers together, as the paper does. `round_to` rounds kept neuron counts to a
    multiple (GPU matrix units like 8 or 64). For GQA models, `gqa: per_group` removes the same
    number of query heads from every key/value group; `gqa: group` removes whole groups.
    `target_params` replaces both ratios by the smallest equal ratio that meets the budget.
    """

    heads: float = 0.0
    mlp: float = 0.0
    layout: Literal["uniform", "global"] = "uniform"
    round_to: int = 1
    gqa: Literal["per_group", "group"] = "per_group"
    target_params: int | None = None

    def __post_init__(self) -> None:
        for key in ("heads", "mlp"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"{key}={value!r}: the fraction removed must be in [0, 1)")
        if self.layout not in ("uniform", "global"):
            raise ValueError(f"layout={self.layout!r}: choose 'uniform' or 'global'")
        if self.gqa not in ("per_group", "group"):
            raise ValueError(f"gqa={self.gqa!r}: choose 'per_group' or 'group'")
        if not isinstance(self.round_to, int) or self.round_to < 1:
            raise ValueError(f"round_to={self.round_to!r}: must be a positive integer")
        if self.target_params is not None and self.target_params <= 0:
            raise ValueError(f"target_params={self.target_params!r}: must be a positive parameter count")


@dataclass
class Plan:
    """Kept units per layer, as indices into the model the plan was made for."""

    family: str
    layout: str
    heads: list[list[int]]
    kv_heads: list[list[int]]
    neurons: list[list[int]]
    dense_heads: list[int]
    dense_kv_heads: list[int]
    dense_neurons: list[int]
    meta: dict = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return len(self.heads)

    def counts(self) -> dict[str, list[int]]:
        return {
            "heads": [len(h) for h in self.heads],
            "kv_heads": [len(h) for h in self.kv_heads],
            "neurons": [len(n) for n in self.neurons],
        }

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        """A file to read: one line per layer for the kept indices, one line for each dense count list (indent=1
        gave a line per index, 11,008 for one Llama MLP), meta indented. Deterministic text: ranks compare
        plans by its hash. Any JSON layout loads (`load` parses JSON), so older plan files still read."""
        fields = []
        for key, value in self.to_dict().items():
            if key in ("heads", "kv_heads", "neurons") and value:
                text = "[\n" + ",\n".join(f"  {json.dumps(row)}" for row in value) + "\n ]"
            elif key.startswith("dense_"):
                text = json.dumps(value)
            else:
                text = json.dumps(value, indent=1).replace("\n", "\n ")
            fields.append(f" {json.dumps(key)}: {text}")
        return "{\n" + ",\n".join(fields) + "\n}\n"

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def from_dict(cls, data: dict) -> Plan:
        return cls(**data)

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        return cls.from_dict(json.loads(Path(path).read_text()))
