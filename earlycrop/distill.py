"""Recovery by knowledge distillation from the dense model (Minitron; TinyBERT/CoFi for encoders).

Take a `Teacher` BEFORE pruning, prune the student, then train it on `distillation_loss`:

    teacher = earlycrop.Teacher.from_model(model, dtype=torch.bfloat16)
    earlycrop.prune(model, plan, optimizer)
    out = model(**batch, output_hidden_states=True)
    losses = earlycrop.distillation_loss(out, teacher(batch), batch, weights, use_logits=True)
    losses["total"].backward()

Head and MLP pruning keep the hidden size and the depth, so student layer l is matched with
teacher layer l directly, with no learned projection.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Batch = Mapping[str, torch.Tensor]


class Teacher:
    """A frozen copy of the dense model: never trained, never given labels, never a grad."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model.eval().requires_grad_(False)

    @classmethod
    def from_model(cls, model: nn.Module, dtype: torch.dtype | None = None) -> Teacher:
        """Deep-copy `model` (before pruning: surgery replaces the student's parameters, not these);
        `dtype` (e.g. bfloat16) halves the teacher's memory, the losses are computed in float32."""
        frozen = copy.deepcopy(model)
        if dtype is not None:
            frozen = frozen.to(dtype)
        return cls(frozen)

    def to(self, device: torch.device | str) -> Teacher:
        self.model.to(device)
        return self

    @torch.no_grad()
    def __call__(self, batch: Batch):
        """The full model's output with every hidden state; `labels` are dropped so no loss is computed."""
        self.model.eval()
        return self.model(**_inputs(batch), output_hidden_states=True)

    @torch.no_grad()
    def base_forward(self, batch: Batch):
        """Only the trunk (`model.base_model`): hidden states for unlabelled text, no head at all."""
        self.model.eval()
        return self.model.base_model(**_inputs(batch), output_hidden_states=True)


def _inputs(batch: Batch) -> dict[str, torch.Tensor]:
    return {k: v for k, v in batch.items() if k != "labels"}


@dataclass(frozen=True)
class DistillWeights:
    """Weights of the loss terms; `temperature` softens both logit distributions."""

    logits: float = 1.0
    temperature: float = 2.0
    hidden: float = 0.0
    hidden_loss: Literal["mse", "cosine"] = "mse"
    task: float = 1.0

    def __post_init__(self) -> None:
        for key in ("logits", "hidden", "task"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key}={getattr(self, key)!r}: a loss weight must be >= 0")
        if self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature!r}: must be > 0")
        if self.hidden_loss not in ("mse", "cosine"):
            raise ValueError(f"hidden_loss={self.hidden_loss!r}: choose 'mse' or 'cosine'")


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of per-position `values` over the positions `mask` selects (all of them without a mask)."""
    if mask is None:
        return values.mean()
    if mask.shape != values.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match the positions {tuple(values.shape)}")
    weight = mask.to(values.dtype)
    return (values * weight).sum() / weight.sum().clamp_min(1.0)


def logit_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """KL(teacher ‖ student) of the softened distributions × T² (Hinton: keeps the gradient scale
    independent of T), averaged over positions: [B,T,V] token logits with a [B,T] mask, or [B,C]."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} vs teacher {tuple(teacher_logits.shape)}")
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    per_position = (log_t.exp() * (log_t - log_s)).sum(-1)
    return _masked_mean(per_position, mask) * temperature**2


def hidden_state_loss(
    student_hidden: Sequence[torch.Tensor],
    teacher_hidden: Sequence[torch.Tensor],
    mask: torch.Tensor | None,
    kind: Literal["mse", "cosine"] = "mse",
) -> torch.Tensor:
    """Layer-wise match of the hidden states as `output_hidden_states=True` returns them (the
    embedding output first, then one [B,T,H] per block). The embedding output is skipped: head and
    MLP pruning leave the embeddings alone, so the blocks' outputs carry all the cut changes.
    MSE (mean over H) or 1 − cosine per token, averaged over the real tokens and the layers."""
    if len(student_hidden) != len(teacher_hidden):
        raise ValueError(f"the student has {len(student_hidden)} hidden states, the teacher {len(teacher_hidden)}: "
                         "layer-wise distillation needs the same depth")
    if len(student_hidden) < 2:
        raise ValueError("need the embedding output and at least one block's hidden state")
    terms = []
    for layer, (s, t) in enumerate(zip(student_hidden[1:], teacher_hidden[1:], strict=True), start=1):
        if s.shape != t.shape:
            raise ValueError(f"hidden state {layer}: student {tuple(s.shape)} vs teacher {tuple(t.shape)}: "
                             "head/MLP pruning must keep the hidden size")
        s, t = s.float(), t.float()
        if kind == "mse":
            per_token = (s - t).pow(2).mean(-1)
        elif kind == "cosine":
            per_token = 1.0 - F.cosine_similarity(s, t, dim=-1)
        else:
            raise ValueError(f"kind={kind!r}: choose 'mse' or 'cosine'")
        terms.append(_masked_mean(per_token, mask))
    return torch.stack(terms).mean()


def distillation_loss(student_out, teacher_out, batch: Batch, weights: DistillWeights, *, use_logits: bool) -> dict[str, torch.Tensor]:
    """Each term with its weight applied in `total`: `task` (the student's own loss, from labels),
    `logits` (skipped without `use_logits`: a new classification head teaches nothing) and `hidden`.
    Terms with weight 0 are left out of the dict; the mask is the batch's `attention_mask`."""
    mask = batch.get("attention_mask")
    terms: dict[str, torch.Tensor] = {}
    weighted: list[torch.Tensor] = []
    if weights.task > 0:
        if getattr(student_out, "loss", None) is None:
            raise ValueError("weights.task > 0 but the student output has no loss: call the student with labels")
        terms["task"] = student_out.loss
        weighted.append(weights.task * terms["task"])
    if use_logits and weights.logits > 0:
        s, t = student_out.logits, teacher_out.logits
        terms["logits"] = logit_kl(s, t, weights.temperature, mask if s.dim() == 3 else None)
        weighted.append(weights.logits * terms["logits"])
    if weights.hidden > 0:
        if student_out.hidden_states is None or teacher_out.hidden_states is None:
            raise ValueError("weights.hidden > 0: call the student with output_hidden_states=True")
        terms["hidden"] = hidden_state_loss(student_out.hidden_states, teacher_out.hidden_states, mask, weights.hidden_loss)
        weighted.append(weights.hidden * terms["hidden"])
    if not weighted:
        raise ValueError("every loss term is off: set a positive task, logits (with use_logits) or hidden weight")
    return {**terms, "total": torch.stack(weighted).sum()}
