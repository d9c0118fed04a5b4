"""What a run's training cost in FLOPs, by phase (issue 13's cost side: a distilled or recovered run pays for
its teacher, an early cut pays for its dense steps).

Every figure is the memory model's closed form (`earlycrop.memory.ModelShape.flops_per_token`: 6N plus attention
scores, forward + backward) times the positions the run computed, padding included, summed over ranks. A
forward alone is a third of it. Scoring passes are not counted here: their wall time is `time_score_s`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from earlycrop.memory import ModelShape


@dataclass(frozen=True)
class Positions:
    """Token positions (batch × seq_len, over all ranks) computed in each phase of a run."""

    dense_training: float  # optimizer steps before the cut (all of them for a dense run)
    pruned_training: float  # optimizer steps after the cut
    teacher: float  # teacher forwards: distillation during fine-tuning and recovery
    recovery: float  # the student's recovery steps (forward + backward toward the teacher)
    head_warmup: float  # dense forwards with only the new head trained (its backward is negligible)


def phase_positions(*, tokens: float, tokens_per_step: float, pruned_at: int | None, recovery_steps: int,
                    recovery_tokens_per_step: float, head_warmup_steps: int,
                    distilled: Literal["no", "after_cut", "throughout"]) -> Positions:
    """Split a run's trained positions at the cut; the teacher reads what the student reads while it teaches
    (from the cut on when it is the dense model taken there, from step 0 when it is a folder)."""
    before = tokens if pruned_at is None else min(tokens, pruned_at * tokens_per_step)
    after = tokens - before
    recovery = recovery_steps * recovery_tokens_per_step
    taught = {"no": 0.0, "after_cut": after, "throughout": tokens}[distilled]
    return Positions(dense_training=before, pruned_training=after, teacher=taught + recovery,
                     recovery=recovery, head_warmup=head_warmup_steps * recovery_tokens_per_step)


def training_flops(dense: ModelShape, final: ModelShape, seq_len: int, positions: Positions) -> dict[str, float]:
    """FLOPs per phase the run went through (a phase it skipped is left out, not an empty bar in MLflow) and in
    total (`flops_total`), keyed as the run summary and MLflow's `flops/` section show them."""
    dense_train, final_train = dense.flops_per_token(seq_len), final.flops_per_token(seq_len)
    phases = {
        "flops_train_dense": dense_train * positions.dense_training,
        "flops_train_pruned": final_train * positions.pruned_training,
        "flops_teacher": dense_train / 3 * positions.teacher,
        "flops_recovery": final_train * positions.recovery,
        "flops_head_warmup": dense_train / 3 * positions.head_warmup,
    }
    return {**{k: v for k, v in phases.items() if v}, "flops_total": sum(phases.values())}
