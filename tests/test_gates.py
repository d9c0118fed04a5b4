"""Gates (earlycrop/gates.py): unit gates at one leave the forward pass bit-identical, really act when zeroed,
and leave no hooks behind, also when scoring fails or finishes (docs/DESIGN.md §1)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import earlycrop
from earlycrop import attach_gates
from tests.helpers import inputs, logits
from tests.tiny_models import FAMILIES, batches, build

torch.set_num_threads(1)


def all_pre_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("family", FAMILIES)
def test_gates_at_one_are_bit_identical_and_leave_no_hooks(family):
    model = build(family)
    x = inputs(family)
    dense = logits(model, x)
    assert all_pre_hooks(model) == 0
    gates = attach_gates(model)
    assert all_pre_hooks(model) == 2 * model.config.num_hidden_layers
    layers = earlycrop.get_adapter(model).layers(model)
    assert [g.numel() for g in gates.heads] == [l.num_heads for l in layers]
    assert [g.numel() for g in gates.neurons] == [l.intermediate_size for l in layers]
    assert torch.equal(logits(model, x), dense)
    with torch.no_grad():  # the gates really act: zeroing one head changes the output
        gates.heads[0][0] = 0.0
    assert not torch.allclose(logits(model, x), dense)
    gates.remove()
    assert all_pre_hooks(model) == 0
    assert torch.equal(logits(model, x), dense)


def test_gated_context_removes_hooks_on_error():
    model = build("llama")
    with pytest.raises(RuntimeError, match="boom"):
        with earlycrop.gated(model):
            assert all_pre_hooks(model) > 0
            raise RuntimeError("boom")
    assert all_pre_hooks(model) == 0


def test_scoring_leaves_no_hooks_and_restores_train_mode():
    model = build("gpt2").train()
    for criterion in ("earlycrop", "activation", "magnitude"):
        earlycrop.score_units(model, criterion, batches("gpt2", n=1))
        assert all_pre_hooks(model) == 0
        assert model.training
