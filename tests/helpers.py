"""Helpers shared by the gate, surgery and serialization tests: fixed inputs, logits, the family × layout × GQA
cases, and the dense-with-gates-zeroed reference that a pruned model must reproduce (docs/DESIGN.md §3)."""

from __future__ import annotations

import torch
from torch import nn

import earlycrop
from earlycrop import SelectionConfig, attach_gates, make_plan, params_after, prune
from tests.tiny_models import FAMILIES, batches, build

LLAMA_LIKE = ["llama", "qwen2", "mistral"]
# family × layout × gqa: GQA modes only mean something for the Llama-style families
CASES = [
    (family, layout, gqa)
    for family in FAMILIES
    for layout in ("uniform", "global")
    for gqa in (("per_group", "group") if family in LLAMA_LIKE else ("per_group",))
]


def case_id(case) -> str:
    return "-".join(case)


def inputs(family: str) -> dict[str, torch.Tensor]:
    """Two sequences, the second right-padded, so masks take part in the comparison."""
    ids = batches(family, n=1, seed=7)[0]["input_ids"]
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def logits(model: nn.Module, x: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**x).logits


def gated_logits(model: nn.Module, plan: earlycrop.Plan, x: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits of the dense model with the gates of every unit `plan` removes set to zero."""
    gates = attach_gates(model)
    try:
        with torch.no_grad():
            for hg, ng, keep_h, keep_n in zip(gates.heads, gates.neurons, plan.heads, plan.neurons):
                drop_h = sorted(set(range(hg.numel())) - set(keep_h))
                drop_n = sorted(set(range(ng.numel())) - set(keep_n))
                hg[drop_h] = 0.0
                ng[drop_n] = 0.0
        return logits(model, x)
    finally:
        gates.remove()


def pruned(family: str, layout: str, gqa: str, criterion: str = "earlycrop", heads: float = 0.5, mlp: float = 0.375):
    """(dense model copy's gated logits, pruned model, plan, prune result) for one case."""
    model = build(family)
    scores = earlycrop.score_units(model, criterion, batches(family, n=2))
    plan = make_plan(model, scores, SelectionConfig(heads=heads, mlp=mlp, layout=layout, gqa=gqa))
    x = inputs(family)
    reference = gated_logits(model, plan, x)
    predicted_params = params_after(model, plan)
    result = prune(model, plan)
    assert result.params_after == predicted_params == sum(p.numel() for p in model.parameters())
    return reference, model, plan, result
