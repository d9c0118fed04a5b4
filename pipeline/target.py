"""Pruning to a hardware budget inside a run (`target:` in the config): the memory model's view of
this job, the budget search on real scores, and the dense-vs-pruned report (docs/DESIGN.md §7)."""

from __future__ import annotations

import time

import torch
from accelerate import Accelerator

import earlycrop
from earlycrop.budget import Budget, BudgetReport, BudgetResult, budget_report, fit_to_budget
from earlycrop.criteria import Scores
from earlycrop.memory import TrainingSetup

from .config import RunConfig
from .distributed import zero_stage


def training_setup(cfg: RunConfig, accelerator: Accelerator) -> TrainingSetup:
    """How this job trains, as far as the memory model is concerned."""
    precision = {"no": "fp32", "bf16": "bf16_mixed", "fp16": "fp16_mixed"}[accelerator.mixed_precision]
    return TrainingSetup(
        precision=precision, micro_batch=cfg.train.micro_batch_size, seq_len=cfg.data.seq_len,
        activation_checkpointing=cfg.target.activation_checkpointing if cfg.target else False,
        zero_stage=zero_stage(accelerator) or 0, num_gpus=accelerator.num_processes,
        device="cuda" if torch.cuda.is_available() else "cpu", attention=cfg.model.attn_implementation,
    )


def fit_target(cfg: RunConfig, accelerator: Accelerator, model, scores: Scores | None) -> BudgetResult:
    """The least pruned plan that trains within `target.budget` (placeholder scores: a shape-only dry run)."""
    p = cfg.prune
    base = earlycrop.SelectionConfig(p.heads if cfg.target.search == "mlp" else 0.0,
                                     p.mlp if cfg.target.search == "heads" else 0.0, p.layout, p.round_to, p.gqa)
    return fit_to_budget(model, scores, base, training_setup(cfg, accelerator), cfg.target.budget,
                         search=cfg.target.search, headroom=cfg.target.headroom)


def target_report(cfg: RunConfig, accelerator: Accelerator, dense_model, plan: earlycrop.Plan) -> BudgetReport | None:
    """Dense vs pruned parameters, FLOPs, memory per GPU and fewest GPUs per ZeRO stage (printed and logged)."""
    if cfg.target is None:
        return None
    budget = Budget.parse(cfg.target.budget)
    report = budget_report(dense_model, plan, training_setup(cfg, accelerator), budget.gpu_bytes, headroom=cfg.target.headroom)
    accelerator.print(report.format())
    return report


def measured_tokens_per_s(model, batch: dict[str, torch.Tensor], repeats: int = 2) -> float | None:
    """Forward+backward throughput on one calibration batch; None when the model does not fit."""
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    was_training = model.training
    model.train()
    try:
        model(**batch).loss.backward()  # warm-up
        start = time.perf_counter()
        for _ in range(repeats):
            model(**batch).loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return repeats * batch["input_ids"].numel() / (time.perf_counter() - start)
    except torch.OutOfMemoryError:
        return None
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
        if device.type == "cuda":
            torch.cuda.empty_cache()
