"""N data-parallel ranks give the scores and the plan of one process (docs/DESIGN.md §4), through real launchers."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from pipeline import data as data_lib

from . import launching

pytestmark = pytest.mark.slow  # every test here launches torchrun

DATA_CRITERIA = ["earlycrop", "grasp", "snip", "fisher", "activation"]


@pytest.fixture(scope="module")
def sharded_scores(tmp_path_factory):
    """Every data-based criterion scored once in one process and once over two gloo ranks."""
    out = tmp_path_factory.mktemp("scores")
    launching.run([sys.executable, "tests/workers/score_shards.py", str(out), *DATA_CRITERIA])
    launching.torchrun(2, "tests/workers/score_shards.py", str(out), *DATA_CRITERIA)
    return out


@pytest.mark.parametrize("criterion", DATA_CRITERIA)
def test_two_ranks_score_like_one_process(sharded_scores, criterion):
    single = load_file(sharded_scores / f"{criterion}_scores_1_0.safetensors")
    plan = json.loads((sharded_scores / f"{criterion}_plan_1_0.json").read_text())
    assert single["heads"].abs().sum() > 0
    for rank in (0, 1):
        sharded = load_file(sharded_scores / f"{criterion}_scores_2_{rank}.safetensors")
        for key in ("heads", "neurons"):
            torch.testing.assert_close(sharded[key], single[key], rtol=1e-6, atol=0)
        assert json.loads((sharded_scores / f"{criterion}_plan_2_{rank}.json").read_text()) == plan


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """A tiny Llama saved with a tokenizer trained on real text, as a user's model folder would be."""
    folder = tmp_path_factory.mktemp("model")
    docs = data_lib.load_documents("gensim:lee")
    tokenizer = data_lib.train_tokenizer(list(docs["text"]), 300)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_prune_cli_under_torchrun_writes_what_one_process_writes(tmp_path, model_folder):
    args = ["--model", str(model_folder), "--data", "gensim:lee", "--criterion", "earlycrop", "--heads", "0.5",
            "--mlp", "0.5", "--layout", "global", "--batches", "4", "--batch-size", "2", "--seq-len", "16",
            "--score-dtype", "float64"]
    one = launching.cli("prune", *args, "--out", str(tmp_path / "one"))
    launching.torchrun(2, "-m", "launch.cli", "prune", *args, "--out", str(tmp_path / "two"))
    assert "parameters:" in one.stdout and "needs earlycrop.from_pretrained" in one.stdout
    a, b = load_file(tmp_path / "one/scores.safetensors"), load_file(tmp_path / "two/scores.safetensors")
    assert a["heads"].shape == (2, 4) and a["neurons"].shape == (2, 64) and a["heads"].dtype == torch.float32
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=0)
    assert (tmp_path / "one/plan.json").read_text() == (tmp_path / "two/plan.json").read_text()


@pytest.mark.slow
def test_release_zero3_frees_an_engine_deepspeed_would_keep_alive():
    """DeepSpeed keeps every ZeRO-3 engine reachable after its last reference goes (a global module list, and each
    parameter pointing at its optimizer); `release_zero3` lets the replaced training engine's fp32 state go."""
    out = launching.torchrun(1, "tests/workers/release_zero3.py").stdout
    assert json.loads(out.strip().splitlines()[-1]) == {"dropped": True, "released": False}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_empty_copy_has_the_model_shape_buffers_and_frozen_parameters(family):
    """What a ZeRO-3 cut and a partitioned resume build the model on: the shape (cut to a plan, or a saved per-layer
    layout), every buffer copied in its own dtype (float32 RoPE frequencies beside bfloat16 weights, as DeepSpeed
    keeps them) and `requires_grad` as in the source; after copying the weights in, the same logits."""
    import earlycrop
    from pipeline.distributed import empty_copy
    from .tiny_models import batches, build

    model = build(family)
    scores = earlycrop.score_units(model, "magnitude")
    earlycrop.prune(model, earlycrop.make_plan(model, scores, earlycrop.SelectionConfig(heads=0.5, mlp=0.3, layout="global")))
    for p in model.parameters():
        p.data = p.data.to(torch.bfloat16)  # weights in bfloat16, buffers left as they are
    frozen = next(model.parameters()).requires_grad_(False)
    copy = empty_copy(model)
    assert [p.shape for p in copy.parameters()] == [p.shape for p in model.parameters()]
    assert [p.requires_grad for p in copy.parameters()] == [p.requires_grad for p in model.parameters()] and not frozen.requires_grad
    for (name, buffer), (_, copied) in zip(model.named_buffers(), copy.named_buffers(), strict=True):
        assert copied.dtype == buffer.dtype and torch.equal(copied, buffer), name
    copy.load_state_dict(model.state_dict())
    ids = batches(family, n=1)[0]["input_ids"]
    assert torch.equal(copy.eval()(ids).logits, model.eval()(ids).logits)
