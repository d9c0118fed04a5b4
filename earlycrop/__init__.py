"""Structured EarlyCroP for Hugging Face transformers: score, select, prune, save.

    scores = earlycrop.score_units(model, "earlycrop", batches)
    plan = earlycrop.make_plan(model, scores, earlycrop.SelectionConfig(heads=0.5, mlp=0.5))
    earlycrop.prune(model, plan, optimizer)

Extension points: `@register_adapter` on a `FamilyAdapter` subclass adds a model family (memory model,
run configs and model building included); `@register_criterion` on a `Criterion` subclass adds a criterion.
"""

from .criteria import (
    CRITERIA,
    Criterion,
    ScoringContext,
    criterion_options,
    make_criterion,
    register_criterion,
    score_units,
    unregister_criterion,
)
from .distill import DistillWeights, Teacher, distillation_loss, hidden_state_loss, logit_kl
from .families import (
    FAMILIES,
    FamilyAdapter,
    family_adapter,
    get_adapter,
    register_adapter,
    supported_families,
    unregister_adapter,
)
from .gates import attach_gates, gated
from .scores import Scores
from .select import Plan, SelectionConfig, make_plan, params_after
from .serialization import from_pretrained, plain_loadable, save_pretrained
from .surgery import PruneResult, prune

__all__ = [
    "CRITERIA",
    "Criterion",
    "DistillWeights",
    "FAMILIES",
    "FamilyAdapter",
    "Plan",
    "PruneResult",
    "Scores",
    "ScoringContext",
    "SelectionConfig",
    "Teacher",
    "attach_gates",
    "criterion_options",
    "distillation_loss",
    "family_adapter",
    "from_pretrained",
    "gated",
    "get_adapter",
    "hidden_state_loss",
    "logit_kl",
    "make_criterion",
    "make_plan",
    "params_after",
    "plain_loadable",
    "prune",
    "register_adapter",
    "register_criterion",
    "save_pretrained",
    "score_units",
    "supported_families",
    "unregister_adapter",
    "unregister_criterion",
]
