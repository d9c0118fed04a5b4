"""Stages for a pretrained model before fine-tuning: warming up a NEW task head on the frozen encoder,
and recovering the pruned encoder by distillation from the dense one (docs/DESIGN.md §8)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from accelerate import Accelerator

import earlycrop
from earlycrop.distill import DistillWeights, Teacher, distillation_loss, hidden_state_loss

from . import data as data_lib
from .config import RunConfig
from .distributed import all_reduce_sum, release_zero3, zero_stage
from .modeling import check_model_folder, new_parameter_names
from .prepare import Prepared
from .scoring import attaches_new_head
from .sharded import PartitionedTeacher, partition_teacher
from .outputs import TEACHER_AT_CUT
from .train import BlockSampler


def warm_up_new_head(cfg: RunConfig, accelerator: Accelerator, model, prepared: Prepared, tracker) -> None:
    """Train only the parameters the checkpoint lacks (a new task head), the encoder frozen, for
    `train.head_warmup_steps` steps. Every rank runs the same steps on the same batches, so the head
    (and the scores computed after it) is identical on every rank without communication."""
    new = new_parameter_names(model, cfg.model.name_or_path)
    if not new:
        raise ValueError(f"train.head_warmup_steps: {cfg.model.name_or_path} already holds every parameter of the model "
                         "(no new head to warm up); set train.head_warmup_steps=0")
    model.to(accelerator.device)
    params = [p for n, p in model.named_parameters() if n in new]
    frozen = {n: p.requires_grad for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.requires_grad_(n in new)
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    sampler = BlockSampler(prepared.train_blocks, cfg.train.micro_batch_size, 0, 1, cfg.seed + 1)
    model.train()
    losses = []
    for step in range(cfg.train.head_warmup_steps):
        batch = {k: v.to(accelerator.device) for k, v in sampler(step).items()}
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    for n, p in model.named_parameters():
        p.requires_grad_(frozen[n])
    tracker.log_metrics({"head_warmup_loss_first": losses[0], "head_warmup_loss_last": losses[-1]}, step=0)
    accelerator.print(f"warmed up the new head ({len(params)} tensors, {cfg.train.head_warmup_steps} steps): "
                      f"loss {losses[0]:.4f} → {losses[-1]:.4f}")


class Distiller:
    """The fine-tuning loss with the dense teacher: the task loss plus the weighted logit-KL and
    hidden-state terms of distillation_loss (each term returned for the training log)."""

    def __init__(self, teacher: Teacher, weights: DistillWeights, use_logits: bool):
        self.teacher, self.weights, self.use_logits = teacher, weights, use_logits

    def loss(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = model(**batch, output_hidden_states=self.weights.hidden > 0)
        terms = distillation_loss(out, self.teacher(batch), batch, self.weights, use_logits=self.use_logits)
        return terms.pop("total"), terms


def teacher_dtype(cfg: RunConfig, model) -> torch.dtype:
    """bfloat16 on a GPU that has it (the teacher only runs forwards), else the student's dtype."""
    if cfg.train.distill.teacher_dtype != "auto":
        return getattr(torch, cfg.train.distill.teacher_dtype)
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return next(model.parameters()).dtype


def make_distiller(cfg: RunConfig, teacher: Teacher) -> Distiller:
    """The logit term is used only when the teacher's head is trained (a fine-tuned `train.distill.teacher`,
    a model saved with its head, or a teacher taken after dense training steps): never through a new task head."""
    d = cfg.train.distill
    weights = DistillWeights(logits=d.logits, temperature=d.temperature, hidden=d.hidden,
                             hidden_loss=d.hidden_loss, task=d.task)
    trained_head = (d.teacher is not None or cfg.prune.prune_at != 0
                    or not attaches_new_head(cfg.model.name_or_path, cfg.model.task))
    return Distiller(teacher, weights, use_logits=trained_head)


def teacher_at_cut(cfg: RunConfig) -> bool:
    """Distillation from the dense model as it is when a cut after step 0 happens (not a folder, not step 0)."""
    d = cfg.train.distill
    return d.enabled and d.teacher is None and cfg.prune.prune_at not in (0, "never")


def distillation_span(cfg: RunConfig) -> Literal["no", "after_cut", "throughout"]:
    """When a teacher teaches: from a cut after step 0 when it is taken there, else from the first step."""
    if not cfg.train.distill.enabled:
        return "no"
    return "after_cut" if teacher_at_cut(cfg) else "throughout"


def dense_teacher(cfg: RunConfig, accelerator: Accelerator, dense) -> Teacher:
    """A frozen copy of the dense model as it is now (before the cut), placed like the student."""
    return place_teacher(accelerator, Teacher.from_model(dense, teacher_dtype(cfg, dense)), cfg.train.micro_batch_size)


def place_teacher(accelerator: Accelerator, teacher: Teacher, micro_batch_size: int) -> Teacher:
    """On the student's device; under DeepSpeed ZeRO-3 partitioned over the ranks like the student."""
    if zero_stage(accelerator) != 3:
        return teacher.to(accelerator.device)
    teacher = partition_teacher(teacher.to(accelerator.device), micro_batch_size)
    held = sum(p.ds_tensor.numel() for p in teacher.model.parameters())
    accelerator.print(f"teacher partitioned over {accelerator.num_processes} ranks (DeepSpeed ZeRO-3): rank 0 holds {held:,} "
                      f"of its {sum(p.ds_numel for p in teacher.model.parameters()):,} parameters")
    return teacher


def partitioned_dense_teacher(cfg: RunConfig, accelerator: Accelerator, engine, *, wanted: bool) -> Teacher | None:
    """The ZeRO-3-partitioned dense model, once scored and cut, as the teacher; freed when none is wanted. It
    teaches in the model's dtype: a partitioned model cannot be cast, so `train.distill.teacher_dtype` is not applied."""
    if not wanted:
        release_zero3(engine)
        return None
    asked = cfg.train.distill.teacher_dtype
    if asked not in ("auto", cfg.model.dtype):
        accelerator.print(f"the partitioned dense model teaches in model.dtype {cfg.model.dtype}, not train.distill.teacher_dtype {asked}")
    return PartitionedTeacher(engine)


def snapshot_teacher(cfg: RunConfig, accelerator: Accelerator, dense, out: Path) -> Teacher:
    """The dense model just before a cut after step 0, frozen; rank 0 also saves it to `out/teacher_at_cut` so a
    run resumed after the cut rebuilds the same teacher (it is never in a checkpoint)."""
    teacher = Teacher.from_model(dense, teacher_dtype(cfg, dense))
    if accelerator.is_main_process:
        earlycrop.save_pretrained(teacher.model, out / TEACHER_AT_CUT)
    accelerator.wait_for_everyone()
    return place_teacher(accelerator, teacher, cfg.train.micro_batch_size)


def fine_tuning_teacher(cfg: RunConfig, student, accelerator: Accelerator, out: Path, *, cut_made: bool) -> Teacher | None:
    """The teacher known before training starts: a `train.distill.teacher` folder, or the dense model saved at
    the cut a resumed run already made; None otherwise (the dense model as built, or the one a later cut hands over)."""
    if cfg.train.distill.enabled and cfg.train.distill.teacher:
        return load_teacher(cfg, student, accelerator)
    if teacher_at_cut(cfg) and cut_made:
        return load_teacher(cfg, student, accelerator, out / TEACHER_AT_CUT)
    return None


def load_teacher(cfg: RunConfig, student, accelerator: Accelerator, folder: str | Path | None = None) -> Teacher:
    """A dense teacher folder (`train.distill.teacher`, or the saved teacher at the cut), checked to have the
    student's depth and outputs."""
    folder = folder or cfg.train.distill.teacher
    check_model_folder(folder)
    model = earlycrop.from_pretrained(folder, dtype=teacher_dtype(cfg, student), attn_implementation=cfg.model.attn_implementation)
    if type(model) is not type(student) or model.config.num_hidden_layers != student.config.num_hidden_layers:
        raise ValueError(f"train.distill.teacher={folder} is a {type(model).__name__} with {model.config.num_hidden_layers} "
                         f"layers; the student is a {type(student).__name__} with {student.config.num_hidden_layers}")
    return place_teacher(accelerator, Teacher(model), cfg.train.micro_batch_size)


def recovery_blocks(cfg: RunConfig, prepared: Prepared) -> dict[str, torch.Tensor]:
    """Unlabelled text for recovery: the task's own training text, or `train.recovery_source` packed."""
    if cfg.train.recovery_source is None:
        return {k: v for k, v in prepared.train_blocks.items() if k != "labels"}
    docs = data_lib.load_documents(cfg.train.recovery_source, text_field=cfg.data.text_field)
    tokenizer = prepared.tokenizer
    if tokenizer.eos_token_id is None:  # an encoder's tokenizer: one document per row, its own special tokens
        rows = tokenizer(list(docs["text"]), truncation=True, padding="max_length", max_length=cfg.data.seq_len,
                         return_tensors="pt")
        return {"input_ids": rows["input_ids"], "attention_mask": rows["attention_mask"]}
    packed = data_lib.pack_causal_lm(docs, tokenizer, cfg.data.seq_len)
    return {"input_ids": torch.tensor(list(packed["input_ids"]))}


def recover(cfg: RunConfig, accelerator: Accelerator, model, teacher: Teacher,
            blocks: dict[str, torch.Tensor]) -> list[float]:
    """`train.recovery_steps` of layer-wise hidden-state distillation of the pruned trunk toward the dense
    one, before any label is seen. Data parallel by hand: each rank its part of the global batch, gradients
    all-reduced before every step, so N ranks end with the weights of one process (same global batch)."""
    rank, world = accelerator.process_index, accelerator.num_processes
    model.to(accelerator.device).train()
    teacher.to(accelerator.device)
    params = [p for p in model.base_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.recovery_lr or cfg.train.lr, weight_decay=cfg.train.weight_decay)
    sampler = BlockSampler(blocks, cfg.train.micro_batch_size, rank, world, cfg.seed + 2)
    steps, losses = cfg.train.recovery_steps, []
    warmup = max(1, steps // 10)
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = (cfg.train.recovery_lr or cfg.train.lr) * min(1.0, (step + 1) / warmup)
        batch = {k: v.to(accelerator.device) for k, v in sampler(step).items()}
        student = model.base_model(**batch, output_hidden_states=True)
        loss = hidden_state_loss(student.hidden_states, teacher.base_forward(batch).hidden_states,
                                           batch.get("attention_mask"), cfg.train.distill.hidden_loss)
        loss.backward()
        average_gradients(params, world)
        if cfg.train.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(all_reduce_sum(loss.detach().clone())) / world)
        if (step + 1) % max(1, steps // 10) == 0:
            accelerator.print(f"recovery step {step + 1}/{steps}  hidden-state loss {losses[-1]:.4f}", flush=True)
    return losses


def average_gradients(params: list[torch.nn.Parameter], world: int) -> None:
    """Mean of every gradient over the ranks, in one flat all-reduce."""
    if world == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    flat = all_reduce_sum(torch.cat([g.flatten() for g in grads])) / world
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
