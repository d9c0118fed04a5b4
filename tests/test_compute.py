"""A run's training FLOPs by phase (pipeline/compute.py): an early cut pays for its dense steps at the dense
rate and the rest at the pruned rate; a distilled run pays a teacher forward for every position it trains on."""

from __future__ import annotations

import pytest

from earlycrop.memory import ModelShape
from pipeline.compute import phase_positions
from pipeline.config import load_config
from pipeline.run import Job

CONFIG = "configs/ci_tiny.yaml"
FAST = ["tracking=false", "train.max_steps=4", "train.eval_every=100", "train.checkpoint_every=0"]


def job_summary(tmp_path, *extra: str) -> tuple[Job, dict]:
    job = Job(load_config(CONFIG, [f"output_dir={tmp_path}", *FAST, *extra]))
    return job, job.run()


def test_positions_split_at_the_cut_and_the_teacher_reads_what_the_student_trains_on():
    p = phase_positions(tokens=1000, tokens_per_step=100, pruned_at=3, recovery_steps=2, recovery_tokens_per_step=50,
                        head_warmup_steps=4, distilled="after_cut")
    assert (p.dense_training, p.pruned_training, p.recovery, p.head_warmup) == (300, 700, 100, 200)
    assert p.teacher == 700 + 100
    dense_run = phase_positions(tokens=1000, tokens_per_step=100, pruned_at=None, recovery_steps=0,
                                recovery_tokens_per_step=50, head_warmup_steps=0, distilled="no")
    assert (dense_run.dense_training, dense_run.pruned_training, dense_run.teacher) == (1000, 0, 0)


def test_an_early_cut_is_charged_dense_then_pruned(tmp_path):
    job, summary = job_summary(tmp_path, "prune.prune_at=2")
    seq = job.cfg.data.seq_len
    per_step = job.cfg.train.micro_batch_size * seq
    final = ModelShape.from_model(job.accelerator.unwrap_model(job.model))
    assert final.num_params() < job.dense_shape.num_params()
    assert summary["flops_train_dense"] == pytest.approx(job.dense_shape.flops_per_token(seq) * 2 * per_step)
    assert summary["flops_train_pruned"] == pytest.approx(final.flops_per_token(seq) * 2 * per_step)
    assert "flops_teacher" not in summary and "flops_recovery" not in summary, "phases the run skipped are left out"
    assert summary["flops_total"] == pytest.approx(summary["flops_train_dense"] + summary["flops_train_pruned"])


def test_a_distilled_run_pays_a_dense_forward_per_trained_position(tmp_path):
    job, summary = job_summary(tmp_path, "train.distill.enabled=true", "train.distill.hidden=1.0")
    positions = 4 * job.cfg.train.micro_batch_size * job.cfg.data.seq_len
    assert "flops_train_dense" not in summary
    assert summary["flops_teacher"] == pytest.approx(job.dense_shape.flops_per_token(job.cfg.data.seq_len) / 3 * positions)
    final = ModelShape.from_model(job.accelerator.unwrap_model(job.model))
    assert summary["flops_train_pruned"] == pytest.approx(final.flops_per_token(job.cfg.data.seq_len) * positions)
    assert summary["flops_total"] == pytest.approx(summary["flops_train_pruned"] + summary["flops_teacher"])
