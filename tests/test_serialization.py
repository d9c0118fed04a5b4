"""Save / load (earlycrop/serialization.py): pruned folders reload with identical logits and dtype, and
`plain_loadable` tells exactly which folders plain transformers loads without earlycrop (docs/DESIGN.md §3)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

import earlycrop
from earlycrop import SelectionConfig, make_plan, plain_loadable, prune
from tests.helpers import CASES, LLAMA_LIKE, case_id, inputs, logits, pruned
from tests.tiny_models import build

torch.set_num_threads(1)


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
