"""Surgery (earlycrop/surgery.py): the main correctness test (docs/DESIGN.md §3) — a pruned model's logits equal
the dense model's logits with the removed units' gates at zero, for every family, layout and GQA mode; also SDPA,
training forward, pruning twice, cached generation, and the sliced Adam state of pruning mid-training.
"""

from __future__ import annotations

import pytest
import torch

import earlycrop
from earlycrop import SelectionConfig, make_plan, prune
from tests.helpers import CASES, case_id, gated_logits, inputs, logits, pruned
from tests.tiny_models import batches, build

torch.set_num_threads(1)


@pytest.mark.parametrize("criterion", ["earlycrop", "magnitude", "random"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_pruned_equals_gated(case, criterion):
    family, layout, gqa = case
    reference, model, plan, _ = pruned(family, layout, gqa, criterion)
    counts = plan.counts()
    assert counts["heads"] != plan.dense_heads and counts["neurons"] != plan.dense_neurons
    layers = earlycrop.get_adapter(model).layers(model)
    assert [l.num_heads for l in layers] == counts["heads"]
    assert [l.num_kv_heads for l in layers] == counts["kv_heads"]
    assert [l.intermediate_size for l in layers] == counts["neurons"]
    assert model.config.earlycrop_layout["heads"] == counts["heads"]
    torch.testing.assert_close(logits(model, inputs(family)), reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_pruned_equals_gated_sdpa_and_training_forward(family):
    """The pruned modules' bookkeeping also holds for SDPA attention and for the loss/backward path."""
    model = build(family, attn="sdpa")
    scores = earlycrop.score_units(model, "random")
    plan = make_plan(model, scores, SelectionConfig(heads=0.5, mlp=0.5, layout="global"))
    x = inputs(family)
    reference = gated_logits(model, plan, x)
    prune(model, plan)
    torch.testing.assert_close(logits(model, x), reference, atol=1e-5, rtol=1e-5)
    loss = model(**batches(family, n=1)[0]).loss
    loss.backward()
    assert all(p.grad is None or p.grad.shape == p.shape for p in model.parameters())


def test_prune_twice_equals_gated_composition():
    """Iterative pruning: a plan made on an already pruned (global) model applies on top."""
    model = build("qwen2")
    x = inputs("qwen2")
    plan1 = make_plan(model, earlycrop.score_units(model, "random"), SelectionConfig(heads=0.5, mlp=0.25, layout="global"))
    prune(model, plan1)
    plan2 = make_plan(model, earlycrop.score_units(model, "magnitude"), SelectionConfig(heads=0.5, mlp=0.25, layout="global"))
    reference = gated_logits(model, plan2, x)
    prune(model, plan2)
    torch.testing.assert_close(logits(model, x), reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family,gqa", [("llama", "group"), ("gpt2", "per_group")])
def test_generate_with_kv_cache_after_global_pruning(family, gqa):
    """Per-layer head counts differ after a global cut: cached decoding must still match uncached."""
    model = build(family)
    plan = make_plan(model, earlycrop.score_units(model, "random"), SelectionConfig(heads=0.5, mlp=0.5, layout="global", gqa=gqa))
    prune(model, plan)
    assert len(set(plan.counts()["kv_heads"])) > 1 or family == "gpt2"
    x = batches(family, n=1)[0]["input_ids"][:, :5]
    cached = model.generate(x, max_new_tokens=6, do_sample=False, use_cache=True)
    uncached = model.generate(x, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


# Optimizer state: pruning mid-training slices the Adam moments with the same indices (docs/DESIGN.md §3)


def _named_state(model, optimizer) -> dict[str, dict]:
    return {n: optimizer.state[p] for n, p in model.named_parameters() if p in optimizer.state}


@pytest.mark.parametrize("family,layout", [("llama", "uniform"), ("qwen2", "global"), ("gpt2", "global"), ("bert-cls", "uniform")])
def test_adam_step_after_pruning_equals_native_model(family, layout, tmp_path):
    hp = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    data = batches(family, n=4)
    model = build(family)  # eval: no dropout, so both sides see the same function
    optimizer = torch.optim.AdamW(model.parameters(), **hp)
    for batch in data[:3]:
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    plan = make_plan(model, earlycrop.score_units(model, "snip", data[:2]), SelectionConfig(heads=0.5, mlp=0.5, layout=layout))
    prune(model, plan, optimizer)
    for p in model.parameters():
        for key in ("exp_avg", "exp_avg_sq"):
            assert optimizer.state[p][key].shape == p.shape

    # the native model: built at the pruned size from the saved folder, with the sliced state
    earlycrop.save_pretrained(model, tmp_path)
    native = earlycrop.from_pretrained(tmp_path, attn_implementation="eager")
    assert type(native) is type(model)
    native_opt = torch.optim.AdamW(native.parameters(), **hp)
    state = _named_state(model, optimizer)
    native_params = dict(native.named_parameters())
    assert native_params.keys() == state.keys()
    for name, p in native_params.items():
        assert torch.equal(p, dict(model.named_parameters())[name])
        native_opt.state[p] = {k: v.clone() for k, v in state[name].items()}

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for m, opt in ((model, optimizer), (native, native_opt)):
        opt.zero_grad()
        m(**data[3]).loss.backward()
        opt.step()
    stepped = dict(model.named_parameters())
    for name, p in native.named_parameters():
        assert not torch.equal(stepped[name], before[name]), f"{name} did not move: the comparison would be vacuous"
        torch.testing.assert_close(stepped[name], p, atol=1e-6, rtol=1e-6, msg=name)
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(optimizer.state[stepped[name]][key], native_opt.state[p][key], msg=f"{name} {key}")
