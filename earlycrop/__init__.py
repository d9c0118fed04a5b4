"""Structured EarlyCroP for Hugging Face transformers: score, select, prune, save.

    scores = earlycrop.score_units(model, "earlycrop", batches)
    plan = earlycrop.make_plan(model, scores, earlycrop.SelectionConfig(heads=0.5, mlp=0.5))
    earlycrop.prune(model, plan, optimizer)

Extension points: `@register_adapter` on a `FamilyAdapter` subclass adds a model family (memory model,
run configs and model building included); `@register_criterion` on a `Criterion` subclass adds a criterion.

The names below are imported from their modules on first use, so `earlycrop.memory`, `earlycrop.budget` and
`earlycrop.plans` load without torch or transformers (`earlycrop plan` on a shape answers in about a second).
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

_EXPORTS: dict[str, str] = {
    **dict.fromkeys(("CRITERIA", "Criterion", "ScoringContext", "criterion_options", "make_criterion",
                     "register_criterion", "score_units", "unregister_criterion"), "criteria"),
    **dict.fromkeys(("DistillWeights", "Teacher", "distillation_loss", "hidden_state_loss", "logit_kl"), "distill"),
    **dict.fromkeys(("FAMILIES", "FamilyAdapter", "family_adapter", "get_adapter", "register_adapter",
                     "supported_families", "unregister_adapter"), "families"),
    **dict.fromkeys(("attach_gates", "gated"), "gates"),
    "Scores": "scores",
    **dict.fromkeys(("Plan", "SelectionConfig"), "plans"),
    **dict.fromkeys(("make_plan", "params_after"), "select"),
    **dict.fromkeys(("from_pretrained", "plain_loadable", "save_pretrained"), "serialization"),
    **dict.fromkeys(("PruneResult", "prune"), "surgery"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """`earlycrop.<name>` (and `from earlycrop import <name>`) imports the module that defines it, once; a
    submodule's name (`earlycrop.families`) imports that submodule."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    elif importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'earlycrop' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
