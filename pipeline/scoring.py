"""Which criterion and objective score a model, and the scoring itself: shared by `earlycrop run`
and `earlycrop prune`, so both resolve `auto` and score the same way (docs/DESIGN.md §1).

`auto` criterion: earlycrop, also for a pretrained model that gets a NEW task head: on the real
all-MiniLM-L6-v2 (benchmarks/recovery.py, 5 seeds, 50% removed, uniform) it ended with the lowest test loss of
every criterion (magnitude, snip, fisher, activation, random), cut before fine-tuning or early in it, at equal or
better accuracy; magnitude had led only on a tiny pretrained BERT (benchmarks/encoder_quality.py). `auto` objective: the
checkpoint's own pre-training loss when a pretrained model gets a new head and was saved with a
pre-training head (gradients through a random head say little about pretrained features), else the task loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

import earlycrop
from earlycrop.criteria import Batch, Scores

from . import data as data_lib
from .config import RunConfig
from .distributed import score_sharded
from .modeling import has_pretraining_head, load_pretraining_model, saved_as_classifier


@dataclass(frozen=True)
class Scoring:
    """A resolved scoring recipe: criterion, objective and the criterion's options."""

    criterion: str
    objective: str
    options: dict = field(default_factory=dict)


def attaches_new_head(name_or_path: str | None, task: str) -> bool:
    """Whether a run puts a NEW, randomly initialised task head on a pretrained model."""
    return name_or_path is not None and task == "sequence_classification" and not saved_as_classifier(name_or_path)


def resolve(criterion: str, objective: str, *, name_or_path: str | None, task: str, **options) -> Scoring:
    """`auto` criterion and objective made concrete for this model and task (see the module docstring)."""
    new_head = attaches_new_head(name_or_path, task)
    if criterion == "auto":
        criterion = "earlycrop"
    if objective == "auto":
        objective = "pretraining" if new_head and has_pretraining_head(name_or_path) else "task"
    return Scoring(criterion, objective, options)


def placeholder_plan(model: nn.Module, selection: earlycrop.SelectionConfig) -> earlycrop.Plan:
    """Selection on placeholder scores, so impossible ratios fail before any scoring work."""
    layers = earlycrop.get_adapter(model).layers(model)
    placeholder = Scores(heads=[torch.zeros(l.num_heads) for l in layers], neurons=[torch.zeros(l.intermediate_size) for l in layers])
    return earlycrop.make_plan(model, placeholder, selection)


def for_run(cfg: RunConfig) -> Scoring:
    """The scoring recipe of a run config."""
    p = cfg.prune
    return resolve(p.criterion, p.objective, name_or_path=cfg.model.name_or_path, task=cfg.model.task,
                   hvp=p.hvp, fd_step=p.fd_step, seed=cfg.seed)


def scoring_criterion(cfg: RunConfig) -> str:
    return for_run(cfg).criterion


def scoring_objective(cfg: RunConfig) -> str:
    return for_run(cfg).objective


def pretraining_scorer(cfg: RunConfig, model: nn.Module, calibration: list[Batch], tokenizer) -> tuple[nn.Module, list[Batch]]:
    """The checkpoint's pre-training model carrying `model`'s current encoder weights, and the calibration
    text as pre-training batches (statically masked for a masked LM, shifted-token labels for a causal LM)."""
    scorer = load_pretraining_model(cfg.model.name_or_path, cfg.model).to(next(model.parameters()).device)
    missing, _ = scorer.base_model.load_state_dict(model.base_model.state_dict(), strict=False)
    if missing:
        raise ValueError(f"the task model's encoder does not match the checkpoint's pre-training model (missing {missing[:3]})")
    ours = [(l.num_heads, l.intermediate_size) for l in earlycrop.get_adapter(model).layers(model)]
    theirs = [(l.num_heads, l.intermediate_size) for l in earlycrop.get_adapter(scorer).layers(scorer)]
    if ours != theirs:
        raise ValueError(f"the checkpoint's pre-training model has other units ({theirs}) than the task model ({ours})")
    batches = []
    for i, batch in enumerate(calibration):
        text = {k: batch[k] for k in ("input_ids", "attention_mask") if k in batch}
        if type(scorer).__name__.endswith("ForMaskedLM"):
            batches.append(data_lib.mask_for_mlm(text, tokenizer, cfg.data.mlm_probability, cfg.seed + 1000 + i))
        else:
            labels = text["input_ids"].masked_fill(text.get("attention_mask", torch.ones_like(text["input_ids"])) == 0, -100)
            batches.append({**text, "labels": labels})
    return scorer, batches


def make(scoring: Scoring) -> earlycrop.Criterion:
    """The recipe's criterion, given the options it accepts."""
    return earlycrop.make_criterion(scoring.criterion, **earlycrop.criterion_options(scoring.criterion, **scoring.options))


def score(model: nn.Module, scoring: Scoring, calibration: list[Batch], *, pretraining=None,
          progress: bool = False) -> Scores:
    """Scores over every rank's shard of `calibration`. `pretraining` builds the pre-training scorer
    (a callable `(model, calibration) -> (scorer, batches)`) when the objective asks for it."""
    criterion = make(scoring)
    scorer, batches = model, calibration
    if scoring.objective == "pretraining" and criterion.uses_data:
        if pretraining is None:
            raise ValueError("objective=pretraining needs the checkpoint's pre-training head, which this model has none of")
        scorer, batches = pretraining(model, calibration)
    return score_sharded(scorer, criterion, batches, progress=progress)
