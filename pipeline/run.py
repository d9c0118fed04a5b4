"""The end-to-end job, one object whose stages read in order (docs/DESIGN.md §6):

    setup → warm up a new head → prune before training → recover → prepare training → train
    (pruning mid-training when due) → evaluate → save → close

Launched under `accelerate launch` or `torchrun`; every rank runs this same code. Scoring is exact
across ranks (pipeline.distributed); MLflow is written by rank 0 only.
"""

from __future__ import annotations

import json
import resource
import signal
from datetime import timedelta
from functools import partial
from pathlib import Path

import datasets
import torch
import transformers

import earlycrop
from earlycrop.distill import Teacher
from earlycrop.memory import ModelShape

from .compute import phase_positions, training_flops
from .config import RunConfig, check_seq_len
from .dense_partitioned import load_dense
from .distributed import (build_whole_from_now_on, describe_launch, describe_peak_memory, is_collective_timeout, make_accelerator, peak_memory_per_rank, quiet_expected_tied_weights, whole_parameters, zero_stage)
from .finetune import dense_teacher, distillation_span, partitioned_dense_teacher, fine_tuning_teacher, make_distiller, recover, recovery_blocks, teacher_at_cut, warm_up_new_head
from .modeling import build_model
from .outputs import check_resume_identity, check_run_output_dir, git_revision, read_identity, run_identity, write_identity
from .plots import plot_run_losses
from .prepare import check_labels, check_tokenizer, prepare_data
from .pruning import PLAN_FILE, SCORES_FILE, Pruner, log_event
from .scoring import placeholder_plan, scoring_criterion
from .sharded import full_shapes
from .target import fit_target
from .timing import StageTimer
from .tracking import ONE_OFF_STEP, create_tracker, default_run_name, end_stale_run, flatten_config, run_info
from .train import BlockSampler, DeferredSigterm, Loop, TrainerState, evaluate, latest_checkpoint, load_trainer_state, train

__all__ = ["PLAN_FILE", "SCORES_FILE", "Job", "run"]


class Job:
    """One run of a config. State lives on the object; each stage reads and sets it in the order of `run`."""

    def __init__(self, cfg: RunConfig, *, resume: bool = False, overwrite: bool = False):
        self.cfg, self.resume, self.overwrite = cfg, resume, overwrite
        self.out = Path(cfg.output_dir)
        self.timer = StageTimer()
        self.state = TrainerState()
        self.checkpoint: Path | None = None
        self.teacher: Teacher | None = None  # the dense model as built (recovery, and distillation by default)
        self.distill_teacher: Teacher | None = None  # what fine-tuning distils from
        self.pruner: Pruner | None = None
        self.start_metrics: dict[str, float] = {}

    def run(self) -> dict:
        """Every stage in order; the tracker's run is marked FAILED if any stage raises."""
        self.setup()
        try:
            self.warm_up_head()
            self.prune_before_training()
            self.recover()
            self.prepare_training()
            self.train()
            with DeferredSigterm(self.accelerator.print, "the final evaluation and save") as sigterm:
                summary = self.evaluate()
                self.save(summary)
        except RuntimeError as exc:
            self.tracker.close(status="FAILED")
            if not is_collective_timeout(exc):
                raise
            raise RuntimeError(f"rank {self.accelerator.process_index}: no answer from another rank within "
                               f"collective_timeout_s={self.cfg.collective_timeout_s} during '{self.timer.current}' (a peer "
                               "stopped, hung or died); raise collective_timeout_s if that stage is slower") from exc
        except BaseException:
            self.tracker.close(status="FAILED")
            raise
        self.close()
        if sigterm.requested:
            self.accelerator.print("SIGTERM: the final evaluation and save finished; exiting")
            raise SystemExit(128 + signal.SIGTERM)
        return summary

    # -- setup: accelerator, resume point, data, the dense model, a dry run of the plan, the tracker
    def setup(self) -> None:
        cfg = self.cfg
        t = cfg.train
        self.accelerator = make_accelerator(t.gradient_accumulation_steps, t.mixed_precision, t.micro_batch_size, t.max_grad_norm,
                                            timeout=timedelta(seconds=cfg.collective_timeout_s))
        if not self.accelerator.is_main_process:
            datasets.disable_progress_bars()
            transformers.logging.set_verbosity_error()
        self.check_engine()
        self.claim_output_dir()
        self.checkpoint = latest_checkpoint(self.out, self.identity) if self.resume else None
        if self.resume and self.checkpoint is None:
            self.accelerator.print(f"--resume: no complete checkpoint of this run in {self.out}/checkpoints, starting from scratch")
        if self.checkpoint is not None:
            self.state = load_trainer_state(self.checkpoint)
        if cfg.model.name_or_path is not None:
            check_seq_len(cfg.model.name_or_path, cfg.data.seq_len, "data.seq_len")
        with self.timer("data"):
            self.prepared = prepare_data(cfg, self.accelerator)
        tok = self.prepared.tokenizer
        self.dense_engine = load_dense(cfg, self.accelerator)  # ZeRO-3: partitioned as it loads, where the run allows
        with whole_parameters(self.accelerator):
            self.model = self.dense_engine.module if self.dense_engine else build_model(
                cfg.model, len(tok), tok.pad_token_id, cfg.seed, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
        with full_shapes(self.model):  # a partitioned model shows its whole shapes to the checks
            check_tokenizer(self.model, tok)
            check_labels(self.model, self.prepared)
            quiet_expected_tied_weights(self.model)
            self.accelerator.print(f"earlycrop run: {describe_launch(self.accelerator, next(self.model.parameters()).dtype)}")
            self.dense_params = sum(p.numel() for p in self.model.parameters())
            self.dense_shape = ModelShape.from_model(self.model)
            self.sparsity = self.dry_run()
        self.tracker = self.open_tracker()

    def claim_output_dir(self) -> None:
        """Never run over another run: a previous run in output_dir needs --resume (same identity, checked
        field by field) or --overwrite; this run's identity then goes into output_dir and every checkpoint."""
        self.identity = run_identity(self.cfg)
        info = self.out / "run_info.json"
        self.previous_run = json.loads(info.read_text()) if info.is_file() else None
        main = self.accelerator.is_main_process
        # every rank checks (so every rank fails alike, none waits at a barrier); only rank 0 moves or writes
        if main or not self.overwrite:
            check_run_output_dir(self.out, self.resume, self.overwrite)
        saved = read_identity(self.out) if self.resume else None
        if saved is not None:
            check_resume_identity(saved, self.identity)
        self.accelerator.wait_for_everyone()
        if main:
            write_identity(self.out, self.identity)
        self.accelerator.wait_for_everyone()

    def check_engine(self) -> None:
        """Pruning mid-training needs DDP or ZeRO-1/2/3, whose weights and moments are gathered and sliced."""
        stage, prune_at = zero_stage(self.accelerator), self.cfg.prune.prune_at
        if stage == 0 and prune_at not in (0, "never"):
            raise ValueError("prune_at > 0 under DeepSpeed needs ZeRO stage 1, 2 or 3 (or plain DDP); stage 0 is not supported")

    def dry_run(self) -> float:
        """The plan on placeholder scores: impossible ratios or budgets fail before any scoring; returns the
        fraction of parameters the plan removes (the `auto` rule's S)."""
        if self.cfg.prune.prune_at == "never":
            return 0.0
        if self.cfg.target is None:
            plan = placeholder_plan(self.model, self.cfg.prune.selection())
        else:
            plan = fit_target(self.cfg, self.accelerator, self.model, None).plan
        return 1.0 - earlycrop.params_after(self.model, plan) / self.dense_params

    def open_tracker(self):
        """The MLflow run (rank 0), continued when resuming; its id is kept in run_info.json."""
        cfg, acc = self.cfg, self.accelerator
        info = self.out / "run_info.json"
        run_id = json.loads(info.read_text()).get("run_id") if self.checkpoint and info.is_file() else None
        pruning = cfg.prune.prune_at != "never"
        tags = {**({"criterion": scoring_criterion(cfg), "heads": cfg.prune.heads, "mlp": cfg.prune.mlp,
                    "layout": cfg.prune.layout} if pruning else {}),  # a dense run is not tagged with a criterion it never used
                "prune_at": cfg.prune.prune_at, "git_revision": git_revision(),
                "family": earlycrop.get_adapter(self.model).name, "world_size": acc.num_processes}
        tracker = create_tracker(is_main_process=acc.is_main_process, output_dir=self.out, tracking_uri=cfg.tracking_uri,
                                 experiment=cfg.experiment, run_name=self.run_name(tags["family"]), enabled=cfg.tracking,
                                 fallback_to_local=cfg.tracking_fallback_local, run_id=run_id, tags=tags)
        try:
            if acc.is_main_process:
                info.write_text(json.dumps(run_info(tracker)))
            previous = self.previous_run or {}
            if acc.is_main_process and previous.get("run_id") not in (None, run_id):
                # a killed run that will not be continued: no longer RUNNING forever in the UI
                end_stale_run(previous.get("tracking_uri"), previous["run_id"])
            if run_id is None:
                tracker.log_params(flatten_config(cfg.model_dump()))
            tracker.log_metrics({"params_dense": float(self.dense_params)}, step=0)
        except BaseException:
            tracker.close(status="FAILED")
            raise
        return tracker

    def run_name(self, family: str) -> str:
        """The config's run_name, else one that says what the run is (`llama-earlycrop-h50-m50-uniform-s0`)."""
        cfg, p = self.cfg, self.cfg.prune
        if cfg.run_name or p.prune_at == "never":
            return cfg.run_name or default_run_name(family, cfg.seed)
        budget = cfg.target.budget if cfg.target else f"params<={p.target_params}" if p.target_params else None
        return default_run_name(family, cfg.seed, criterion=scoring_criterion(cfg), heads=p.heads, mlp=p.mlp,
                                layout=p.layout, prune_at=p.prune_at, budget=budget)

    # -- before training: head warm-up, the cut (or its replay on resume), recovery toward the dense model
    def warm_up_head(self) -> None:
        if self.checkpoint is None and self.cfg.train.head_warmup_steps:
            with self.timer("head_warmup"):
                warm_up_new_head(self.cfg, self.accelerator, self.model, self.prepared, self.tracker)

    def prune_before_training(self) -> None:
        """Make the pruner; cut now when prune_at is 0, or rebuild the pruned shape a checkpoint holds. The teacher
        is the dense model as built: copied first, or under ZeRO-3 the partitioned one itself, once it is scored
        (a teacher is frozen). It is rebuilt on resume, never checkpointed."""
        cfg, d = self.cfg, self.cfg.train.distill
        wants_teacher = cfg.train.recovery_steps or (d.enabled and d.teacher is None and cfg.prune.prune_at == 0)
        if wants_teacher and self.dense_engine is None:
            self.teacher = dense_teacher(cfg, self.accelerator, self.model)
        cut_made = self.checkpoint is not None and self.state.pruned_at is not None
        self.distill_teacher = fine_tuning_teacher(cfg, self.model, self.accelerator, self.out, cut_made=cut_made)
        if cfg.prune.prune_at != "never":
            self.cut_before_training()
        if self.dense_engine is not None:  # scored and cut: the teacher, or freed
            self.teacher = partitioned_dense_teacher(cfg, self.accelerator, self.dense_engine, wanted=wants_teacher)
        self.distill_teacher = self.distill_teacher or self.teacher
        self.dense_engine = None  # a partitioned teacher keeps its own reference

    def cut_before_training(self) -> None:
        # resuming reuses saved scores of the same provenance (a later cut replays weights the run reproduces exactly)
        cfg = self.cfg
        reuse = self.resume and (self.checkpoint is None or cfg.prune.prune_at != 0)
        self.pruner = Pruner(cfg, self.accelerator, self.prepared, self.out, self.timer, sparsity=self.sparsity, reuse_scores=reuse)
        if self.checkpoint is not None and self.state.pruned_at is not None:
            self.model = self.pruner.reapply(self.model, self.dense_engine)
        elif cfg.prune.prune_at == 0:
            self.model, event = self.pruner.prune_before_training(self.model, self.dense_engine)
            self.state.pruned_at = 0
            log_event(self.tracker, event, self.out)
            self.accelerator.print(f"pruned before training: {self.dense_params:,} → {event.result.params_after:,} parameters")

    def recover(self) -> None:
        """Hidden-state distillation of the pruned model toward the dense one on unlabelled text (not on resume:
        the checkpoint holds the recovered weights)."""
        if not self.cfg.train.recovery_steps or self.checkpoint is not None:
            return
        with self.timer("recovery"):
            losses = recover(self.cfg, self.accelerator, self.model, self.teacher, recovery_blocks(self.cfg, self.prepared))
        self.teacher = None  # the dense model as built teaches recovery; fine-tuning holds its own reference
        self.tracker.log_metrics({"recovery_loss_first": losses[0], "recovery_loss_last": losses[-1]}, step=0)
        self.accelerator.print(f"recovered the pruned model toward the dense one ({len(losses)} steps): "
                               f"hidden-state loss {losses[0]:.4f} → {losses[-1]:.4f}")

    # -- training: accelerate.prepare, resume the engine state, the visible loop
    def prepare_training(self) -> None:
        cfg, acc = self.cfg, self.accelerator
        optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        self.model, self.optimizer = acc.prepare(self.model, optimizer)
        if self.pruner is not None and self.pruner.rule is not None:
            acc.register_for_checkpointing(self.pruner.rule)
        if self.checkpoint is not None:
            acc.load_state(str(self.checkpoint))
            acc.print(f"resumed from {self.checkpoint} at step {self.state.step}")
        if self.checkpoint is None:
            # the model training starts from (pruned at step 0, or dense): what the cut cost before any training
            with self.timer("eval"):
                self.start_metrics = self.validate()
            self.tracker.log_metrics(self.start_metrics, step=0)
            self.state.history.append({"step": 0, **self.start_metrics})

    def train(self) -> None:
        cfg, acc = self.cfg, self.accelerator
        sampler = BlockSampler(self.prepared.train_blocks, cfg.train.micro_batch_size, acc.process_index, acc.num_processes, cfg.seed)
        mid_training = self.pruner is not None and self.pruner.mid_training
        loop = Loop(
            accelerator=acc, model=self.model, optimizer=self.optimizer, sampler=sampler, val_blocks=self.prepared.val_blocks,
            cfg=cfg.train, output_dir=self.out, restart_schedule=cfg.prune.schedule_after_prune == "restart",
            log=lambda metrics, step: self.tracker.log_metrics(metrics, step=step),
            pruner=self.pruner if mid_training else None, on_prune=self.log_cut,
            distiller=make_distiller(cfg, self.distill_teacher) if self.distill_teacher and cfg.train.distill.enabled else None,
            make_distiller=partial(make_distiller, cfg) if teacher_at_cut(cfg) else None, identity=self.identity,
        )
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self.model = self.optimizer = None  # the loop holds them; a cut replaces them (and the old engine is freed)
        with self.timer("train"):
            self.state = train(loop, self.state)
        self.model, self.optimizer = loop.model, loop.optimizer

    def log_cut(self, event) -> None:
        """Track a cut made by the training loop."""
        log_event(self.tracker, event, self.out, self.pruner.rule)
        self.accelerator.print(f"pruned at step {event.step}: {self.dense_params:,} → {event.result.params_after:,} parameters")

    # -- after training: final metrics, the model, the summary
    def validate(self) -> dict[str, float]:
        t = self.cfg.train
        return evaluate(self.accelerator, self.model, self.prepared.val_blocks, t.micro_batch_size, t.eval_batches)

    def evaluate(self) -> dict:
        with self.timer("eval"):
            final = self.validate()
        self.tracker.log_metrics(final, step=self.state.step)
        unwrapped = self.accelerator.unwrap_model(self.model)
        summary = {**final, **{f"{k}_at_start": v for k, v in self.start_metrics.items()},
                   "params_dense": self.dense_params, "params_final": sum(getattr(p, "ds_numel", p.numel()) for p in unwrapped.parameters()),
                   "steps": self.state.step, "pruned_at": self.state.pruned_at, "finished": self.state.step >= self.cfg.train.max_steps,
                   **{f"time_{k}_s": v for k, v in self.timer.seconds.items()}, **self.flops()}
        if torch.cuda.is_available():
            summary["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
        else:
            summary["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        peaks = peak_memory_per_rank()  # a collective: every rank takes part
        summary.update({f"peak_memory_rank{rank}_bytes": peak for rank, peak in enumerate(peaks)})
        self.accelerator.print(describe_peak_memory(peaks))
        # one-off figures (times, parameters, steps, peak memory) once, at the step MLflow draws as a labelled bar;
        # the evaluations are on the val curves already, params_dense went at step 0 and the cut's step as prune/step
        on_a_curve = {*final, *(f"{k}_at_start" for k in self.start_metrics), "params_dense", "pruned_at"}
        self.tracker.log_metrics({k: float(v) for k, v in summary.items() if k not in on_a_curve
                                  and isinstance(v, (int, float)) and not isinstance(v, bool)}, step=ONE_OFF_STEP)
        return summary

    def flops(self) -> dict[str, float]:
        """Training FLOPs by phase (pipeline.compute): dense and pruned steps, teacher, recovery, head warm-up."""
        t, world, seq = self.cfg.train, self.accelerator.num_processes, self.prepared.train_blocks["input_ids"].shape[1]
        plan = self.pruner.plan if self.pruner is not None and self.state.pruned_at is not None else None
        final = self.dense_shape.with_counts(**plan.counts()) if plan else self.dense_shape
        positions = phase_positions(
            tokens=self.state.tokens, tokens_per_step=t.micro_batch_size * t.gradient_accumulation_steps * world * seq,
            pruned_at=self.state.pruned_at, recovery_steps=t.recovery_steps, recovery_tokens_per_step=t.micro_batch_size * world * seq,
            head_warmup_steps=t.head_warmup_steps, distilled=distillation_span(self.cfg))
        return training_flops(self.dense_shape, final, seq, positions)

    def save(self, summary: dict) -> None:
        """The final model (only a finished run: a SIGTERM-stopped one leaves its checkpoint), plots, summary."""
        if not summary["finished"]:
            return
        acc = self.accelerator
        with self.timer("save"):
            state_dict = acc.get_state_dict(self.model)
            build_whole_from_now_on(acc)
            if acc.is_main_process:
                final_dir = self.out / "model"
                acc.unwrap_model(self.model).save_pretrained(final_dir, state_dict=state_dict)
                self.prepared.tokenizer.save_pretrained(final_dir)
                self.tracker.log_model_dir(final_dir, "model", registered_model_name=self.cfg.register_model,
                                           step=self.state.step)
        self.tracker.log_figure(plot_run_losses(self.state.history, (self.state.step, summary["val_loss"])), "loss_curves.png")
        if acc.is_main_process:
            (self.out / "summary.json").write_text(json.dumps(summary, indent=1))

    def close(self) -> None:
        self.tracker.close()
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()


def run(cfg: RunConfig, resume: bool = False, overwrite: bool = False) -> dict:
    """Run the whole job; returns the final metrics (on every rank)."""
    return Job(cfg, resume=resume, overwrite=overwrite).run()
