"""Recovery and distillation inside the job (pipeline/finetune.py): the teacher is the dense model and
stays frozen, the terms are logged, recovery moves the pruned model toward the dense one, a distilled
run resumes bit-identically (the teacher is rebuilt, never checkpointed), and N ranks recover like one."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.config import load_config
from pipeline.finetune import recover, recovery_blocks
from pipeline.run import Job

from . import launching

CONFIG = "configs/ci_tiny.yaml"
DISTILL = ["tracking=false", "train.distill.enabled=true", "train.distill.hidden=1.0", "train.distill.logits=0.5",
           "train.recovery_steps=6", "train.scheduler=constant", "train.warmup_steps=0", "train.checkpoint_every=0"]


def digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode() + tensor.detach().cpu().numpy().tobytes())
    return h.hexdigest()


def test_teacher_is_the_dense_model_and_is_never_updated(tmp_path):
    job = Job(load_config(CONFIG, [f"output_dir={tmp_path}", *DISTILL, "train.max_steps=4"]))
    job.setup()
    dense = digest(job.model)
    job.warm_up_head()
    job.prune_before_training()
    teacher = job.teacher
    assert job.distill_teacher is teacher and digest(teacher.model) == dense, "the teacher is the dense model as built"
    assert all(not p.requires_grad for p in teacher.model.parameters())
    job.recover()
    job.prepare_training()
    job.train()
    summary = job.evaluate()
    job.close()
    assert digest(teacher.model) == dense, "recovery and distilled training must not touch the teacher"
    assert all(p.grad is None for p in teacher.model.parameters())
    assert summary["params_final"] < summary["params_dense"] and summary["time_recovery_s"] > 0
    logged = [h for h in job.state.history if "distill_hidden" in h]
    assert logged and all(h["distill_hidden"] > 0 and h["distill_logits"] > 0 and "distill_task" in h for h in logged)


def test_a_fine_tuned_teacher_folder_teaches_through_its_head(tmp_path):
    dense = Job(load_config(CONFIG, [f"output_dir={tmp_path / 'dense'}", "tracking=false"]))
    dense.setup()
    dense.model.save_pretrained(tmp_path / "teacher")
    dense.tracker.close()
    job = Job(load_config(CONFIG, [f"output_dir={tmp_path / 'run'}", *DISTILL, "train.recovery_steps=0", "train.max_steps=2",
                                   f"train.distill.teacher={tmp_path / 'teacher'}", "train.log_every=1"]))
    job.run()
    assert job.teacher is None and digest(job.distill_teacher.model) == digest(dense.model)
    assert all(h["distill_logits"] > 0 for h in job.state.history if "train_loss" in h)
    with pytest.raises(ValueError, match=r"train.distill.teacher=.* is a LlamaForCausalLM with 2 layers; the student"):
        other = Job(load_config(CONFIG, [f"output_dir={tmp_path / 'other'}", *DISTILL, "model.init.num_hidden_layers=1",
                                         f"train.distill.teacher={tmp_path / 'teacher'}"]))
        other.setup()
        try:
            other.prune_before_training()
        finally:
            other.tracker.close()


def test_recovery_moves_the_pruned_model_toward_the_dense_one(tmp_path):
    job = Job(load_config(CONFIG, [f"output_dir={tmp_path}", *DISTILL, "train.recovery_steps=30", "train.lr=1e-3"]))
    job.setup()
    job.prune_before_training()
    losses = recover(job.cfg, job.accelerator, job.model, job.teacher, recovery_blocks(job.cfg, job.prepared))
    job.tracker.close()
    assert len(losses) == 30 and losses[-1] < 0.5 * losses[0]


def test_a_distilled_run_resumes_bit_identically(tmp_path):
    whole = tmp_path / "whole"
    Job(load_config(CONFIG, [f"output_dir={whole}", *DISTILL, "train.max_steps=8"])).run()
    part = tmp_path / "part"
    Job(load_config(CONFIG, [f"output_dir={part}", *DISTILL, "train.max_steps=8", "train.checkpoint_every=4"])).run()
    # keep only the step-4 checkpoint, as if the run had been killed after it
    checkpoints = sorted((part / "checkpoints").glob("step_*"))
    for later in checkpoints[1:]:
        shutil.rmtree(later)
    (part / "model").rename(part / "model.first")
    Job(load_config(CONFIG, [f"output_dir={part}", *DISTILL, "train.max_steps=8", "train.checkpoint_every=4"]),
        resume=True).run()
    resumed, reference = load_file(part / "model" / "model.safetensors"), load_file(whole / "model" / "model.safetensors")
    assert resumed.keys() == reference.keys()
    for key in reference:
        assert torch.equal(resumed[key], reference[key]), key


def test_recovery_needs_the_cut_before_training_and_distillation_needs_a_cut(tmp_path):
    with pytest.raises(ValueError, match=r"train.recovery_steps needs prune.prune_at: 0"):
        load_config(CONFIG, [f"output_dir={tmp_path}", "train.recovery_steps=4", "prune.prune_at=4"])
    with pytest.raises(ValueError, match=r"train.distill distils the pruned model from the dense one: it needs a cut"):
        load_config(CONFIG, [f"output_dir={tmp_path}", "train.distill.enabled=true", "prune.prune_at=never"])
    assert load_config(CONFIG, [f"output_dir={tmp_path}", "train.distill.enabled=true", "prune.prune_at=4"]).prune.prune_at == 4


EARLY = [*DISTILL, "train.recovery_steps=0", "prune.prune_at=2", "train.max_steps=6", "train.log_every=1"]


def test_an_early_cut_distils_from_the_dense_model_as_trained_until_the_cut(tmp_path):
    dense = tmp_path / "dense"
    Job(load_config(CONFIG, [f"output_dir={dense}", *EARLY, "train.distill.enabled=false", "prune.prune_at=never",
                             "train.max_steps=2"])).run()
    job = Job(load_config(CONFIG, [f"output_dir={tmp_path / 'run'}", *EARLY]))
    job.run()
    saved = load_file(tmp_path / "run" / "teacher_at_cut" / "model.safetensors")
    reference = load_file(dense / "model" / "model.safetensors")
    assert saved.keys() == reference.keys()
    for key in reference:  # the teacher is the dense model after the 2 steps before the cut, bit for bit
        assert torch.equal(saved[key], reference[key]), key
    logged = {h["step"]: h for h in job.state.history if "train_loss" in h}
    assert all("distill_logits" not in logged[step] for step in (1, 2)), "no teacher before the cut"
    assert all(logged[step]["distill_logits"] > 0 and logged[step]["distill_hidden"] > 0 for step in (3, 4, 5, 6))


def test_a_run_distilled_after_an_early_cut_resumes_bit_identically(tmp_path):
    whole, part = tmp_path / "whole", tmp_path / "part"
    Job(load_config(CONFIG, [f"output_dir={whole}", *EARLY])).run()
    Job(load_config(CONFIG, [f"output_dir={part}", *EARLY, "train.checkpoint_every=4"])).run()
    for later in sorted((part / "checkpoints").glob("step_*"))[1:]:  # killed after the step-4 checkpoint
        shutil.rmtree(later)
    (part / "model").rename(part / "model.first")
    resumed = Job(load_config(CONFIG, [f"output_dir={part}", *EARLY, "train.checkpoint_every=4"]), resume=True)
    resumed.run()
    assert resumed.distill_teacher is not None, "the resumed run rebuilt the teacher from teacher_at_cut"
    a, b = load_file(part / "model" / "model.safetensors"), load_file(whole / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in b:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
def test_two_ranks_recover_like_one_process(tmp_path):
    """Same global batch (8 = 2 ranks × 4), float64: the recovered and trained weights agree, and so does the
    validation loss over every validation block (a partial last batch included)."""
    common = [*DISTILL, "model.dtype=float64", "train.max_steps=2", "train.distill.enabled=false", "train.eval_batches=1000"]
    one, two = tmp_path / "one", tmp_path / "two"
    launching.cli("run", CONFIG, f"output_dir={one}", *common, "train.micro_batch_size=8")
    launching.torchrun(2, "-m", "launch.cli", "run", CONFIG, f"output_dir={two}", *common, "train.micro_batch_size=4")
    a, b = load_file(one / "model" / "model.safetensors"), load_file(two / "model" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-9, atol=1e-12)
    first = json.loads((one / "summary.json").read_text())
    second = json.loads((two / "summary.json").read_text())
    assert second["time_recovery_s"] > 0 and abs(first["val_loss"] - second["val_loss"]) < 1e-6


@pytest.mark.slow
def test_zero3_distils_from_a_partitioned_teacher_like_ddp(tmp_path):
    """Cut at step 2 under ZeRO-3: the dense model is gathered, cut, and its copy becomes the teacher, partitioned
    over the ranks like the student (rank 0 holds half of it); the distilled run ends where the DDP run ends."""
    common = [*EARLY, "train.recovery_steps=0"]
    ddp, zero3 = tmp_path / "ddp", tmp_path / "zero3"
    launching.accelerate("launch/accelerate/cpu_2proc.yaml", "-m", "launch.cli", "run", CONFIG, f"output_dir={ddp}", *common)
    out = launching.accelerate("launch/accelerate/cpu_2proc_zero3.yaml", "-m", "launch.cli", "run", CONFIG,
                               f"output_dir={zero3}", *common).stdout
    held, total = (int(n.replace(",", "")) for n in re.search(r"rank 0 holds ([\d,]+) of its ([\d,]+) parameters", out).groups())
    assert total > 0 and held <= total / 2 + 64, "each rank holds its partition of the teacher, not the whole"
    first, second = (json.loads((d / "summary.json").read_text()) for d in (ddp, zero3))
    assert second["pruned_at"] == first["pruned_at"] == 2
    assert second["val_loss"] == pytest.approx(first["val_loss"], rel=1e-4)

