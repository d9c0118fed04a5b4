"""Core invariants of earlycrop: gates, surgery, save/load (also with plain transformers), optimizer state.

The main correctness test (DESIGN.md §3): a pruned model's logits equal the dense model's logits
with the removed units' gates at zero, for every family, layout and GQA mode.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import earlycrop
from earlycrop import SelectionConfig, attach_gates, make_plan, params_after, plain_loadable, prune
from tests.tiny_models import FAMILIES, batches, build

torch.set_num_threads(1)

LLAMA_LIKE = ["llama", "qwen2", "mistral"]
# family × layout × gqa: GQA modes only mean something for the Llama-style families
CASES = [
    (family, layout, gqa)
    for family in FAMILIES
    for layout in ("uniform", "global")
    for gqa in (("per_group", "group") if family in LLAMA_LIKE else ("per_group",))
]


def case_id(case) -> str:
    return "-".join(case)


def inputs(family: str) -> dict[str, torch.Tensor]:
    """Two sequences, the second right-padded, so masks take part in the comparison."""
    ids = batches(family, n=1, seed=7)[0]["input_ids"]
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def logits(model: nn.Module, x: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**x).logits


def gated_logits(model: nn.Module, plan: earlycrop.Plan, x: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits of the dense model with the gates of every unit `plan` removes set to zero."""
    gates = attach_gates(model)
    try:
        with torch.no_grad():
            for hg, ng, keep_h, keep_n in zip(gates.heads, gates.neurons, plan.heads, plan.neurons):
                drop_h = sorted(set(range(hg.numel())) - set(keep_h))
                drop_n = sorted(set(range(ng.numel())) - set(keep_n))
                hg[drop_h] = 0.0
                ng[drop_n] = 0.0
        return logits(model, x)
    finally:
        gates.remove()


def all_pre_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) for m in model.modules())


def pruned(family: str, layout: str, gqa: str, criterion: str = "earlycrop", heads: float = 0.5, mlp: float = 0.375):
    """(dense model copy's gated logits, pruned model, plan, prune result) for one case."""
    model = build(family)
    scores = earlycrop.score_units(model, criterion, batches(family, n=2))
    plan = make_plan(model, scores, SelectionConfig(heads=heads, mlp=mlp, layout=layout, gqa=gqa))
    x = inputs(family)
    reference = gated_logits(model, plan, x)
    predicted_params = params_after(model, plan)
    result = prune(model, plan)
    assert result.params_after == predicted_params == sum(p.numel() for p in model.parameters())
    return reference, model, plan, result


# --------------------------------------------------------------------------------------------
# 8. Gates


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


# --------------------------------------------------------------------------------------------
# 1. Surgery invariant


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


# --------------------------------------------------------------------------------------------
# 2. Save / load


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_save_load_identical(case, tmp_path):
    family, layout, gqa = case
    _, model, plan, result = pruned(family, layout, gqa, "magnitude")
    x = inputs(family)
    expected = logits(model, x)
    earlycrop.save_pretrained(model, tmp_path)
    loaded = earlycrop.from_pretrained(tmp_path, attn_implementation="eager")
    assert not loaded.training
    assert plain_loadable(loaded) == result.plain_loadable == plain_loadable(model)
    assert {k: v.shape for k, v in loaded.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    torch.testing.assert_close(logits(loaded, x), expected, atol=1e-6, rtol=0)
    # uniform Llama-style folders describe themselves; GPT-2/BERT with heads cut do not
    assert result.plain_loadable == (layout == "uniform" and family in LLAMA_LIKE)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("family,layout", [("llama", "uniform"), ("llama", "global"), ("gpt2", "uniform")])
def test_save_load_keeps_dtype(family, layout, dtype, tmp_path):
    """Non-plain folders load in the saved dtype too (not rounded through float32)."""
    model = build(family).to(dtype)
    prune(model, make_plan(model, earlycrop.score_units(model, "random"), SelectionConfig(heads=0.5, mlp=0.5, layout=layout)))
    earlycrop.save_pretrained(model, tmp_path)
    loaded = earlycrop.from_pretrained(tmp_path, attn_implementation="eager")
    assert all(p.dtype == dtype for p in loaded.parameters())
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    x = inputs(family)
    assert torch.equal(logits(loaded, x), logits(model, x))


AUTO_CLASS = {
    "llama": "AutoModelForCausalLM",
    "qwen2": "AutoModelForCausalLM",
    "mistral": "AutoModelForCausalLM",
    "gpt2": "AutoModelForCausalLM",
    "bert": "AutoModelForMaskedLM",
    "bert-cls": "AutoModelForSequenceClassification",
}

PLAIN_LOADER = textwrap.dedent(
    """
    import json, sys, torch, transformers
    out = {}
    for name, family, folder in json.loads(sys.argv[1]):
        auto = getattr(transformers, %r[family])
        try:
            model = auto.from_pretrained(folder, attn_implementation="eager").eval()
            x = torch.load(folder + "/inputs.pt")
            with torch.no_grad():
                torch.save(model(**x).logits, folder + "/plain_logits.pt")
            out[name] = "ok"
        except Exception as e:
            out[name] = "raised " + type(e).__name__ + ": " + str(e)[:300]
    out["earlycrop imported"] = any(m.split(".")[0] == "earlycrop" for m in sys.modules)
    print("RESULT" + json.dumps(out))
    """
) % (AUTO_CLASS,)


def test_plain_transformers_loading_matches_plain_loadable(tmp_path):
    """Where `plain_loadable` is True the folder loads with plain AutoModel… in a process that never
    imports earlycrop, with the same logits; where it is False plain loading fails or gives other logits."""
    cases = []  # (name, family, heads ratio, mlp ratio, layout, gqa, expected plain_loadable)
    for family in LLAMA_LIKE:
        for gqa in ("per_group", "group"):
            cases.append((f"{family}-uniform-{gqa}", family, 0.5, 0.5, "uniform", gqa, True))
        cases.append((f"{family}-global", family, 0.5, 0.5, "global", "per_group", False))
    for family in ("gpt2", "bert", "bert-cls"):
        cases.append((f"{family}-mlp-only", family, 0.0, 0.5, "uniform", "per_group", True))
        cases.append((f"{family}-heads", family, 0.5, 0.5, "uniform", "per_group", False))
        cases.append((f"{family}-heads-only", family, 0.25, 0.0, "uniform", "per_group", False))
    expected, jobs = {}, []
    for name, family, h, m, layout, gqa, flag in cases:
        model = build(family)
        plan = make_plan(model, earlycrop.score_units(model, "random"), SelectionConfig(heads=h, mlp=m, layout=layout, gqa=gqa))
        prune(model, plan)
        assert plain_loadable(model) is flag, name
        folder = tmp_path / name
        earlycrop.save_pretrained(model, folder)
        x = inputs(family)
        torch.save(x, folder / "inputs.pt")
        expected[name] = (logits(model, x), flag)
        jobs.append((name, family, str(folder)))
    proc = subprocess.run(
        [sys.executable, "-c", PLAIN_LOADER, json.dumps(jobs)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert result.pop("earlycrop imported") is False
    for name, (want, flag) in expected.items():
        status = result[name]
        if flag:
            assert status == "ok", f"{name}: {status}"
            got = torch.load(tmp_path / name / "plain_logits.pt")
            torch.testing.assert_close(got, want, atol=1e-6, rtol=0, msg=name)
        elif status == "ok":  # loaded anyway (re-initialised mismatched weights?): must not match
            got = torch.load(tmp_path / name / "plain_logits.pt")
            assert got.shape != want.shape or not torch.allclose(got, want, atol=1e-3), name
        else:
            assert status.startswith("raised"), name


# --------------------------------------------------------------------------------------------
# 5. Optimizer state


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
