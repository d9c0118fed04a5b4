"""`earlycrop run` under DeepSpeed ZeRO-3 with a cut before training: the dense model is loaded partitioned over the
ranks, scored on its partitions and cut block by block into the smaller model, which ZeRO-3 then trains; no rank ever
holds the dense model whole (docs/DESIGN.md §8). The same machinery as `earlycrop prune` (pipeline/sharded.py).

When something the run asks for needs the dense model whole on a rank (a new task head, its warm-up, a budget
search, a criterion that needs a double backward), the run builds it whole as before and says why.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from transformers import AutoConfig

import earlycrop
from earlycrop.criteria import Scores
from earlycrop.families import architecture_class

from .config import RunConfig
from .distributed import zero_stage
from .modeling import DTYPES
from .scoring import attaches_new_head, for_run, make
from .sharded import (consolidate_pruned, full_shapes, load_partitioned, partitioned_refusal, pruned_skeleton, score_partitioned,
                      zero3_config)


def whole_because(cfg: RunConfig, world_size: int) -> str | None:
    """Why this ZeRO-3 run must build its dense model whole on every rank; None when it can be partitioned."""
    p, m = cfg.prune, cfg.model
    recipe = for_run(cfg)
    reasons = [
        (p.prune_at != 0, "the cut is not before training (prune_at is not 0)"),
        (m.name_or_path is None, "the model is built from scratch (no folder to load partitions from)"),
        (m.name_or_path is not None and attaches_new_head(m.name_or_path, m.task), "a new task head is attached"),
        (m.dtype == "float64", "ZeRO-3 does not partition float64"),
        (cfg.train.head_warmup_steps > 0, "the new head's warm-up trains the dense model"),
        (cfg.target is not None or p.target_params is not None, "the budget search measures the dense model"),
        (recipe.objective != "task", f"objective {recipe.objective} scores through another model"),
        (partitioned_refusal(make(recipe)) is not None, f"criterion {recipe.criterion} with hvp {p.hvp} needs whole weights "
                                           "(earlycrop and grasp score partitioned with prune.hvp: finite_difference)"),
        (p.calibration_batches % world_size != 0, f"prune.calibration_batches={p.calibration_batches} does not divide "
                                                  f"over the {world_size} ranks"),
    ]
    return next((why for failed, why in reasons if failed), None)


def load_dense(cfg: RunConfig, accelerator: Accelerator):
    """Under ZeRO-3, the engine holding the dense model partitioned as it loads (None, with the reason printed,
    when the run needs it whole, or outside ZeRO-3)."""
    if zero_stage(accelerator) != 3:
        return None
    reason = whole_because(cfg, accelerator.num_processes)
    if reason is not None:
        accelerator.print(f"ZeRO-3: the dense model is built whole on every rank to be scored: {reason}")
        return None
    config = AutoConfig.from_pretrained(cfg.model.name_or_path, trust_remote_code=False)
    if not earlycrop.plain_loadable(config):
        accelerator.print("ZeRO-3: the dense model is built whole on every rank to be scored: its folder needs "
                          "earlycrop.from_pretrained (a layout plain transformers cannot load partitioned)")
        return None
    engine = load_partitioned(cfg.model.name_or_path, zero3_config(cfg.prune.calibration_batch_size),
                              dtype=DTYPES[cfg.model.dtype], model_class=architecture_class(config),
                              attn_implementation=cfg.model.attn_implementation)
    accelerator.print(f"ZeRO-3: the dense model is partitioned over the {accelerator.num_processes} ranks as it loads, "
                      "scored on its partitions and cut block by block")
    return engine


def score(engine, cfg: RunConfig, calibration: list, *, progress: bool) -> Scores:
    return score_partitioned(engine, make(for_run(cfg)), calibration, progress=progress)


def cut(engine, plan: earlycrop.Plan, device: torch.device) -> tuple[torch.nn.Module, earlycrop.PruneResult]:
    """The pruned model, whole on every rank, from the partitioned dense one (gathered one block at a time)."""
    dense = engine.module
    dtype = next(dense.parameters()).dtype
    with full_shapes(dense):
        target = pruned_skeleton(dense, plan, dtype)
    consolidate_pruned(dense, plan, target)
    before = sum(p.ds_numel for p in dense.parameters())
    result = earlycrop.PruneResult(before, sum(p.numel() for p in target.parameters()), earlycrop.plain_loadable(target))
    return target.to(device).train(), result


def skeleton(engine, plan: earlycrop.Plan, device: torch.device) -> torch.nn.Module:
    """A resumed run whose checkpoint holds the pruned shape: that shape, uninitialised (load_state fills it)."""
    dense = engine.module
    with full_shapes(dense):
        return pruned_skeleton(dense, plan, next(dense.parameters()).dtype).to(device).train()
