"""Distillation from the dense teacher: zero loss for an unchanged student, aligned layers after
head+MLP pruning, a teacher that never changes, and a student that really learns from it."""

from __future__ import annotations

import dataclasses
import hashlib

import pytest
import torch
import torch.nn.functional as F

import earlycrop
from earlycrop import DistillWeights, Scores, SelectionConfig, Teacher, distillation_loss, hidden_state_loss, logit_kl
from tests.tiny_models import FAMILIES, batches, build

torch.set_num_threads(1)

ALL_TERMS = DistillWeights(logits=1.0, temperature=2.0, hidden=1.0, task=0.0)


def dense(family: str) -> torch.nn.Module:
    """A tiny model whose blocks matter: at the 0.02 init scale the residual stream is nearly the
    embeddings (BERT's logits nearly uniform), so a cut would hardly move anything; ×8 fixes that."""
    model = build(family)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and not any(key in name for key in ("embed", "wte", "wpe")):
                p.mul_(8.0)
    return model


def inputs(family: str, seed: int = 7) -> dict[str, torch.Tensor]:
    """Two sequences with labels, the second right-padded, so the mask takes part."""
    batch = batches(family, n=1, seed=seed)[0]
    mask = torch.ones_like(batch["input_ids"])
    mask[1, -4:] = 0
    return {**batch, "attention_mask": mask}


def cut(model: torch.nn.Module, seed: int = 0) -> None:
    """Prune half the heads and half the MLP neurons, chosen by random scores."""
    gen = torch.Generator().manual_seed(seed)
    layers = earlycrop.get_adapter(model).layers(model)
    scores = Scores(
        heads=[torch.rand(l.num_heads, generator=gen) for l in layers],
        neurons=[torch.rand(l.intermediate_size, generator=gen) for l in layers],
    )
    earlycrop.prune(model, earlycrop.make_plan(model, scores, SelectionConfig(heads=0.5, mlp=0.5)))


def state_hash(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@pytest.mark.parametrize("kind", ["mse", "cosine"])
@pytest.mark.parametrize("family", FAMILIES)
def test_zero_for_the_teacher_itself_positive_after_a_cut(family, kind):
    model = dense(family)
    teacher = Teacher.from_model(model)
    batch = inputs(family)
    weights = dataclasses.replace(ALL_TERMS, hidden_loss=kind)
    with torch.no_grad():
        same = distillation_loss(model(**batch, output_hidden_states=True), teacher(batch), batch, weights, use_logits=True)
        assert set(same) == {"logits", "hidden", "total"}
        assert all(float(v) <= 1e-6 for v in same.values()), same
        cut(model)
        after = distillation_loss(model(**batch, output_hidden_states=True), teacher(batch), batch, weights, use_logits=True)
    assert float(after["logits"]) > 1e-3 and float(after["hidden"]) > 1e-2
    assert float(after["total"]) == pytest.approx(float(after["logits"] + after["hidden"]), rel=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_hidden_states_align_layer_by_layer_after_pruning(family):
    model = dense(family)
    teacher = Teacher.from_model(model)
    dense_heads = [l.num_heads for l in earlycrop.get_adapter(model).layers(model)]
    cut(model)
    adapter = earlycrop.get_adapter(model)
    assert [l.num_heads for l in adapter.layers(model)] == [h // 2 for h in dense_heads]
    assert [l.num_heads for l in adapter.layers(teacher.model)] == dense_heads  # the copy was not pruned
    batch = inputs(family)
    s = model.base_model(**{k: v for k, v in batch.items() if k != "labels"}, output_hidden_states=True).hidden_states
    t = teacher.base_forward(batch).hidden_states
    assert len(s) == len(t) == model.config.num_hidden_layers + 1
    assert [x.shape for x in s] == [x.shape for x in t]


def test_mismatched_depth_or_width_is_a_clear_error():
    h = [torch.randn(2, 5, 8) for _ in range(3)]
    with pytest.raises(ValueError, match="same depth"):
        hidden_state_loss(h, h[:2], None)
    with pytest.raises(ValueError, match="hidden size"):
        hidden_state_loss(h, [h[0], h[1], torch.randn(2, 5, 6)], None)
    with pytest.raises(ValueError, match="mask shape"):
        hidden_state_loss(h, h, torch.ones(2, 4))


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert-cls"])
def test_the_teacher_never_changes_and_gets_no_grads(family):
    model = dense(family).train()
    teacher = Teacher.from_model(model)
    before = state_hash(teacher.model)
    cut(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    weights = dataclasses.replace(ALL_TERMS, task=1.0)
    for step in range(3):
        batch = inputs(family, seed=step)
        t_out = teacher(batch)
        assert t_out.loss is None  # the teacher is never given labels
        assert not t_out.logits.requires_grad
        losses = distillation_loss(model(**batch, output_hidden_states=True), t_out, batch, weights, use_logits=True)
        losses["total"].backward()
        optimizer.step()
        optimizer.zero_grad()
    assert state_hash(teacher.model) == before
    assert not teacher.model.training
    assert all(not p.requires_grad and p.grad is None for p in teacher.model.parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_pure_hidden_distillation_lowers_the_students_loss(family):
    model = dense(family)
    teacher = Teacher.from_model(model)
    cut(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    weights = DistillWeights(logits=0.0, hidden=1.0, task=0.0)
    batch = inputs(family)
    text = {k: v for k, v in batch.items() if k != "labels"}
    target = teacher.base_forward(batch)
    history = []
    for _ in range(15):
        losses = distillation_loss(model.base_model(**text, output_hidden_states=True), target, batch, weights, use_logits=False)
        assert set(losses) == {"hidden", "total"}
        history.append(float(losses["total"].detach()))
        losses["total"].backward()
        optimizer.step()
        optimizer.zero_grad()
    assert history[-1] < 0.5 * history[0], history


def test_logit_kl_is_the_softened_kl_times_t_squared():
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 5, generator=gen), torch.randn(4, 5, generator=gen)
    temp = 3.0
    ref = F.kl_div(F.log_softmax(s / temp, -1), F.log_softmax(t / temp, -1), log_target=True, reduction="batchmean")
    assert float(logit_kl(s, t, temp)) == pytest.approx(float(ref) * temp**2, rel=1e-5)
    assert float(logit_kl(t, t, temp)) == pytest.approx(0.0, abs=1e-7)


def test_logit_kl_averages_over_the_masked_positions_only():
    gen = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 6, 7, generator=gen), torch.randn(2, 6, 7, generator=gen)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 3:] = 0
    base = logit_kl(s, t, 1.0, mask)
    noisy = s.clone()
    noisy[1, 3:] += 10 * torch.randn(3, 7, generator=gen)  # padding: must not count
    assert float(logit_kl(noisy, t, 1.0, mask)) == pytest.approx(float(base), rel=1e-6)
    real = mask.bool()
    assert float(base) == pytest.approx(float(logit_kl(s[real], t[real], 1.0)), rel=1e-5)


def test_task_term_and_untrained_head():
    model = dense("bert-cls")
    teacher = Teacher.from_model(model)
    cut(model)
    batch = inputs("bert-cls")
    weights = DistillWeights(logits=5.0, hidden=2.0, task=0.5)
    with torch.no_grad():
        losses = distillation_loss(model(**batch, output_hidden_states=True), teacher(batch), batch, weights, use_logits=False)
    assert set(losses) == {"task", "hidden", "total"}  # a new head's logits teach nothing
    assert float(losses["total"]) == pytest.approx(float(0.5 * losses["task"] + 2.0 * losses["hidden"]), rel=1e-6)
    with pytest.raises(ValueError, match="labels"):
        unlabeled = {k: v for k, v in batch.items() if k != "labels"}
        distillation_loss(model(**unlabeled, output_hidden_states=True), teacher(batch), batch, weights, use_logits=False)
    with pytest.raises(ValueError, match="output_hidden_states"):
        distillation_loss(model(**batch), teacher(batch), batch, weights, use_logits=False)


def test_bfloat16_teacher_gives_float32_losses():
    model = dense("llama")
    teacher = Teacher.from_model(model, dtype=torch.bfloat16)
    assert {p.dtype for p in teacher.model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # the student is untouched
    batch = inputs("llama")
    losses = distillation_loss(model(**batch, output_hidden_states=True), teacher(batch), batch, ALL_TERMS, use_logits=True)
    assert losses["total"].dtype == torch.float32
    assert 0.0 <= float(losses["total"].detach()) < 0.05  # only bfloat16 rounding separates them


def test_weights_are_validated_and_frozen():
    with pytest.raises(ValueError, match="weight"):
        DistillWeights(hidden=-1.0)
    with pytest.raises(ValueError, match="temperature"):
        DistillWeights(temperature=0.0)
    with pytest.raises(ValueError, match="hidden_loss"):
        DistillWeights(hidden_loss="l1")
    with pytest.raises(dataclasses.FrozenInstanceError):
        DistillWeights().logits = 2.0
    with pytest.raises(ValueError, match="every loss term is off"):
        distillation_loss(None, None, {}, DistillWeights(logits=1.0, task=0.0), use_logits=False)
