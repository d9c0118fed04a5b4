"""The pruning stage of a run: score → select → cut, before training, at a fixed step or when the
`auto` rule fires (docs/DESIGN.md §2–3).

The training loop asks a `Pruner` whether pruning is `due` and receives the pruned model and its
sliced optimizer from `prune_in_training`; the pruner never reaches into the loop or the job.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from accelerate import Accelerator
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import earlycrop
from earlycrop.budget import BudgetReport
from earlycrop.criteria import Scores
from earlycrop.distill import Teacher
from earlycrop.schedule import WeightDistanceRule

from . import dense_partitioned, scoring
from .config import RunConfig
from .distributed import check_same_on_all_ranks, prepare_pruned, release_zero3, training_state, zero_stage
from .finetune import snapshot_teacher, teacher_at_cut
from .plots import plot_kept_units, plot_scores
from .prepare import Prepared
from .sharded import PartitionedRule, full_shapes
from .target import fit_target, measured_tokens_per_s, target_report
from .timing import StageTimer
from .tracking import ONE_OFF_STEP

SCORES_FILE = "scores.safetensors"
PLAN_FILE = "plan.json"


@dataclass
class PruneEvent:
    """What one cut did, for tracking and the printed summary."""

    step: int
    scores: Scores
    plan: earlycrop.Plan
    result: earlycrop.PruneResult
    report: BudgetReport | None = None
    tokens_per_s: dict[str, float] | None = None  # forward+backward, dense and pruned, when a budget was asked for
    teacher: Teacher | None = None  # the dense model just before a cut after step 0, when distillation asks for it


def scores_metadata(path: Path) -> dict[str, str]:
    with safe_open(path, "pt") as f:
        return f.metadata() or {}


class Pruner:
    """Scores, selects and cuts the model of one run; holds the `auto` rule and when the cut happened."""

    def __init__(self, cfg: RunConfig, accelerator: Accelerator, prepared: Prepared, out: Path, timer: StageTimer,
                 *, sparsity: float, reuse_scores: bool):
        self.cfg, self.accelerator, self.prepared, self.out, self.timer = cfg, accelerator, prepared, out, timer
        self.reuse_scores = reuse_scores
        p = cfg.prune
        self.scoring = scoring.for_run(cfg)
        # S = the fraction of parameters the plan removes; checkpointed so --resume keeps w_1 and the trace
        rule = PartitionedRule if zero_stage(accelerator) == 3 else WeightDistanceRule
        self.rule = rule(p.auto_interval, p.auto_cap, min(sparsity, 0.99)) if p.prune_at == "auto" else None
        self.plan: earlycrop.Plan | None = None  # the cut made (or replayed on resume)

    @property
    def mid_training(self) -> bool:
        return self.cfg.prune.prune_at not in (0, "never")

    def due(self, step: int, model, pruned_at: int | None) -> bool:
        """Whether the cut happens before optimizer step `step` (the `auto` rule observes every step)."""
        if pruned_at is not None or not self.mid_training:
            return False
        if self.rule is None:
            return step == self.cfg.prune.prune_at
        # d_e over all weights, as the paper's rule (docs/DESIGN.md §2), not only the prunable ones
        weights = list(self.accelerator.unwrap_model(model).parameters())
        if isinstance(self.rule, PartitionedRule):
            return step > 0 and self.rule.observe_partitioned(step, weights)
        return step > 0 and self.rule.observe(step, weights)

    def rule_metrics(self, step: int) -> dict[str, float]:
        """The `auto` rule's latest weight distance, once per interval, for the training log."""
        if self.rule is None or not self.rule.trace or step % self.cfg.prune.auto_interval:
            return {}
        return {"auto_weight_distance": self.rule.trace[-1][1]}

    def score_and_plan(self, model, engine=None) -> tuple[Scores, earlycrop.Plan]:
        """Scores over all ranks' shards (or the saved ones when resuming), then the plan every rank agrees on;
        `engine`: the ZeRO-3 engine of a partitioned `model`, scored on its partitions."""
        with self.timer("score"):
            scores = self._scores(model, engine)
        meta = {"criterion": self.scoring.criterion, "objective": self.scoring.objective}
        if self.cfg.target is None:
            with full_shapes(model):
                plan = earlycrop.make_plan(model, scores, self.cfg.prune.selection(), meta=meta)
        else:
            fitted = fit_target(self.cfg, self.accelerator, model, scores)
            plan = fitted.plan
            plan.meta.update(**meta, target=self.cfg.target.budget)
            self.accelerator.print(fitted.summary())
        ties = plan.meta.get("ties") or {}
        if any(ties.values()):
            self.accelerator.print(f"note: {ties.get('heads', 0)} head units and {ties.get('neurons', 0)} neurons scored equal "
                                   "across the cut; the lowest indices were kept (the criterion did not tell them apart)")
        check_same_on_all_ranks(plan.to_json(), "pruning plan")
        if self.accelerator.is_main_process:
            plan.save(self.out / PLAN_FILE)
        self.plan = plan
        return scores, plan

    def _provenance(self) -> dict[str, str]:
        cfg = self.cfg
        return {"criterion": self.scoring.criterion, "hvp": cfg.prune.hvp, "fd_step": str(cfg.prune.fd_step),
                "seed": str(cfg.seed), "source": cfg.data.source, "calibration_batches": str(cfg.prune.calibration_batches),
                "calibration_batch_size": str(cfg.prune.calibration_batch_size), "seq_len": str(cfg.data.seq_len),
                "objective": self.scoring.objective, "head_warmup_steps": str(cfg.train.head_warmup_steps)}

    def _scores(self, model, engine=None) -> Scores:
        path, provenance = self.out / SCORES_FILE, self._provenance()
        if self.reuse_scores and path.is_file() and scores_metadata(path) == provenance:
            self.accelerator.print(f"reusing scores from {path}")
            return Scores.from_tensors(load_file(path))
        main = self.accelerator.is_main_process
        if engine is not None:
            scores = dense_partitioned.score(engine, self.cfg, self.prepared.calibration, progress=main)
        else:
            scores = scoring.score(model, self.scoring, self.prepared.calibration, pretraining=self._pretraining_scorer,
                                   progress=main)
        if self.accelerator.is_main_process:
            tmp = path.with_suffix(".tmp")
            save_file(scores.to_tensors(), tmp, metadata=provenance)
            os.replace(tmp, path)
        return scores

    def _pretraining_scorer(self, model, calibration):
        scorer, batches = scoring.pretraining_scorer(self.cfg, model, calibration, self.prepared.tokenizer)
        self.accelerator.print(f"scoring through the checkpoint's pre-training head ({type(scorer).__name__})")
        return scorer, batches

    def prune_before_training(self, model, engine=None) -> tuple[object, PruneEvent]:
        """CroP-S: score the model as built, cut it, and measure the speed-up when a budget was asked for. Under
        ZeRO-3 `engine` holds the dense model partitioned: scored there and cut into a new, smaller model."""
        if engine is not None:
            scores, plan = self.score_and_plan(engine.module, engine)
            with self.timer("prune"):
                pruned, result = dense_partitioned.cut(engine, plan, self.accelerator.device)
            return pruned, PruneEvent(0, scores, plan, result)
        model.to(self.accelerator.device)  # score on the GPU when there is one
        scores, plan = self.score_and_plan(model)
        report = target_report(self.cfg, self.accelerator, model, plan)
        dense_speed = measured_tokens_per_s(model, self.prepared.calibration[0]) if report else None
        with self.timer("prune"):
            result = earlycrop.prune(model, plan)
        speeds = None
        if report:
            speeds = {"dense": dense_speed, "pruned": measured_tokens_per_s(model, self.prepared.calibration[0])}
            self.accelerator.print("forward+backward tokens/s: " + ", ".join(
                f"{k} {v:,.0f}" if v else f"{k} does not fit" for k, v in speeds.items()))
        return model, PruneEvent(0, scores, plan, result, report, speeds)

    def prune_in_training(self, model, optimizer, step: int) -> tuple[object, object, PruneEvent]:
        """Cut the prepared model at `step`; the Adam moments are sliced with it and handed to the re-prepared
        model (under DeepSpeed gathered from the engine first), so training continues without a restart."""
        # under ZeRO-3 the partitioned model is gathered whole (one parameter at a time) and scored like DDP's
        unwrapped, raw = training_state(self.accelerator, optimizer, self.accelerator.unwrap_model(model), step,
                                        self.cfg.train.lr, self.cfg.train.weight_decay)
        self.accelerator.free_memory()  # the old engine (its partitions and buffers) goes before scoring
        if zero_stage(self.accelerator) == 3:
            release_zero3(model)
        scores, plan = self.score_and_plan(unwrapped)
        report = target_report(self.cfg, self.accelerator, unwrapped, plan)
        teacher = snapshot_teacher(self.cfg, self.accelerator, unwrapped, self.out) if teacher_at_cut(self.cfg) else None
        if isinstance(self.rule, PartitionedRule):
            self.rule.finish()
        with self.timer("prune"):
            result = earlycrop.prune(unwrapped, plan, raw)
        model, optimizer = prepare_pruned(self.accelerator, unwrapped, raw)
        return model, optimizer, PruneEvent(step, scores, plan, result, report, teacher=teacher)

    def reapply(self, model, engine=None):
        """A resumed run whose checkpoint holds the pruned shape: rebuild that shape (from the partitioned dense
        model under ZeRO-3), load_state fills the weights."""
        self.plan = earlycrop.Plan.load(self.out / PLAN_FILE)
        if engine is not None:
            return dense_partitioned.skeleton(engine, self.plan, self.accelerator.device)
        earlycrop.prune(model, self.plan)
        return model


def log_event(tracker, event: PruneEvent, out: Path, rule: WeightDistanceRule | None = None) -> None:
    """Plan, scores, kept-unit and score plots, and the budget report of one cut (its figures are one-offs: the cut's
    step is the value of prune/step)."""
    counts = event.plan.counts()
    if event.report is not None:
        tracker.log_metrics({f"budget.{k}": float(v) for k, v in event.report.to_dict().items()}, step=ONE_OFF_STEP)
        tracker.log_dict({"report": event.report.format()}, "budget_report.json")
    if event.tokens_per_s:
        tracker.log_metrics({f"budget.{k}.tokens_per_s": v for k, v in event.tokens_per_s.items() if v}, step=ONE_OFF_STEP)
    tracker.log_metrics({"params_pruned": float(event.result.params_after), "prune_step": float(event.step)}, step=ONE_OFF_STEP)
    tracker.log_dict(event.plan.to_dict(), "plan.json")
    tracker.log_artifact(out / SCORES_FILE, "scores")
    tracker.set_tags({"plain_loadable": event.result.plain_loadable})
    tracker.log_figure(plot_kept_units(counts["heads"], event.plan.dense_heads, counts["neurons"], event.plan.dense_neurons),
                       "kept_units.png")
    tracker.log_figure(plot_scores([h.tolist() for h in event.scores.heads], [n.tolist() for n in event.scores.neurons],
                                   event.plan.heads, event.plan.neurons), "scores.png")
    if rule is not None:
        tracker.log_dict({"trace": rule.trace, "threshold": rule.threshold, "pruned_at": event.step}, "auto_schedule.json")
