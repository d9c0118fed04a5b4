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
