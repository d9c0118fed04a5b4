"""Numerical trouble (issue 6, item 4): NaN/Inf in the training loss or in scores stops the job with one
line naming the step or the scoring stage and layer; scores that tie are broken by index, deterministically,
and reported in the plan (`meta["ties"]`) and by `earlycrop prune`.

    python -m pytest -q tests/test_numerics.py
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

import earlycrop
from earlycrop.criteria import Scores
from launch.cli import main
from pipeline import data as data_lib

CONFIG = "configs/ci_tiny.yaml"


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="module")
def tokenizer():
    return data_lib.train_tokenizer(list(data_lib.load_documents("gensim:lee")["text"]), 300)


def _folder(path: Path, tokenizer, edit) -> Path:
    """A tiny Llama (ci_tiny's shape, untied output layer) saved after `edit(model)`."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
    ))
    with torch.no_grad():
        edit(model)
    return earlycrop.save_pretrained(model, path, tokenizer)


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("earlycrop: error: ")]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


# ---------------------------------------------------------------- NaN / Inf in the training loss


def test_diverging_training_stops_naming_the_step(tmp_path, capsys):
    """A learning rate of 1e30 blows the weights up within a few steps: stop there, do not save NaN weights."""
    out = tmp_path / "run"
    code = main(["run", CONFIG, f"output_dir={out}", "tracking=false", "train.lr=1e30", "train.max_steps=8",
                 "train.warmup_steps=0", "train.checkpoint_every=0"])
    assert code == 2
    assert re.fullmatch(r"earlycrop: error: training loss is (nan|inf) at step [1-7]: lower train\.lr or check the data", _error_line(capsys))
    assert not (out / "model").exists() and not (out / "summary.json").exists()


def test_inf_loss_names_the_exact_step(tmp_path, capsys, monkeypatch):
    """The loss of the 4th training forward (optimizer step 3) becomes Inf: the error names step 3."""
    forward = LlamaForCausalLM.forward
    seen = []

    def poisoned(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        if self.training:
            seen.append(1)
            if len(seen) == 4:
                out.loss = out.loss * float("inf")
        return out

    monkeypatch.setattr(LlamaForCausalLM, "forward", poisoned)
    out = tmp_path / "run"
    assert main(["run", CONFIG, f"output_dir={out}", "tracking=false", "train.max_steps=8", "train.checkpoint_every=0"]) == 2
    assert _error_line(capsys) == "earlycrop: error: training loss is inf at step 3: lower train.lr or check the data"
    assert not (out / "model").exists()


# ---------------------------------------------------------------- NaN / Inf in scores


def test_check_finite_names_criterion_kind_and_layer():
    Scores(heads=[torch.ones(4)] * 2, neurons=[torch.ones(8)] * 2).check_finite("fisher")
    bad = Scores(heads=[torch.ones(4)] * 2, neurons=[torch.ones(8), torch.tensor([1.0, float("inf")] * 4)])
    with pytest.raises(FloatingPointError, match=r"scoring: criterion 'fisher' produced NaN/Inf neurons scores in layer 1 \(4 of 8 units\)"):
        bad.check_finite("fisher")


def test_nan_weights_in_one_layer_name_that_layer(tmp_path, tokenizer, capsys):
    """magnitude needs no data: the NaN neuron weights of layer 1 show up as layer 1's scores."""
    folder = _folder(tmp_path / "nan_mlp", tokenizer, lambda m: m.model.layers[1].mlp.down_proj.weight[:, 5].fill_(float("nan")))
    out = tmp_path / "out"
    code = main(["prune", "--model", str(folder), "--data", "gensim:lee", "--criterion", "magnitude", "--mlp", "0.5", "--out", str(out)])
    assert code == 2
    assert _error_line(capsys) == (
        "earlycrop: error: scoring: criterion 'magnitude' produced NaN/Inf neurons scores in layer 1 (1 of 64 units): "
        "check that layer's weights, the loss on the calibration batches and the learning rate"
    )
    assert not out.exists()  # nothing saved: no scores.safetensors, no plan, no model


def test_nan_loss_while_scoring_is_named(tmp_path, tokenizer, capsys):
    """A gradient criterion on a model whose forward gives NaN stops at the loss, before any score."""
    folder = _folder(tmp_path / "nan_attn", tokenizer, lambda m: m.model.layers[0].self_attn.q_proj.weight.fill_(float("nan")))
    out = tmp_path / "out"
    code = main(["prune", "--model", str(folder), "--data", "gensim:lee", "--criterion", "earlycrop", "--heads", "0.5",
                 "--batches", "2", "--batch-size", "2", "--seq-len", "32", "--out", str(out)])
    assert code == 2
    assert re.fullmatch(r"earlycrop: error: scoring with 'earlycrop': the loss on a calibration batch is nan; "
                        r"the model's weights or the calibration data hold NaN/Inf .*", _error_line(capsys))
    assert not out.exists()


# ---------------------------------------------------------------- ties


def test_all_zero_scores_keep_the_lowest_indices_and_are_reported(tmp_path, tokenizer, capsys):
    """A zero output layer makes every gradient zero, so snip scores every unit 0: the plan keeps the lowest
    indices (the same plan every time) and says how many units tied instead of passing it off as a ranking."""
    folder = _folder(tmp_path / "zero_head", tokenizer, lambda m: m.lm_head.weight.zero_())
    plans = []
    for attempt in range(2):
        out = tmp_path / f"out{attempt}"
        assert main(["prune", "--model", str(folder), "--data", "gensim:lee", "--criterion", "snip", "--heads", "0.5",
                     "--mlp", "0.5", "--batches", "2", "--batch-size", "2", "--seq-len", "32", "--out", str(out)]) == 0
        printed = capsys.readouterr().out
        assert "ties: 8 head units and 128 neurons scored equal across the cut; the lowest indices were kept" in printed
        assert all((t == 0).all() for t in load_file(out / "scores.safetensors").values())
        plans.append((out / "plan.json").read_text())
    assert plans[0] == plans[1]
    plan = json.loads(plans[0])
    assert plan["heads"] == [[0, 2], [0, 2]]  # one query head per KV group, the lower one
    assert plan["kv_heads"] == [[0, 1], [0, 1]]
    assert plan["neurons"] == [list(range(32))] * 2
    assert plan["meta"]["ties"] == {"heads": 8, "neurons": 128}


def test_distinct_scores_report_no_ties():
    from .tiny_models import build

    model = build("llama")
    layers = earlycrop.get_adapter(model).layers(model)
    gen = torch.Generator().manual_seed(0)
    scores = Scores(heads=[torch.rand(l.num_heads, generator=gen) for l in layers],
                    neurons=[torch.rand(l.intermediate_size, generator=gen) for l in layers])
    for layout in ("uniform", "global"):
        plan = earlycrop.make_plan(model, scores, earlycrop.SelectionConfig(heads=0.5, mlp=0.5, layout=layout))
        assert plan.meta["ties"] == {"heads": 0, "neurons": 0}


@pytest.mark.parametrize("layout", ["uniform", "global"])
def test_a_tie_across_the_cut_counts_only_the_tied_units(layout):
    """Neurons 3 and 4 of layer 0 share the score at the cut: exactly those two are reported, and 3 is kept."""
    from .tiny_models import build

    model = build("llama")  # 2 layers, 48 neurons each, 8 heads in 2 KV groups
    layers = earlycrop.get_adapter(model).layers(model)
    neurons = [torch.arange(48, 0, -1, dtype=torch.float64) for _ in layers]
    neurons[0][4] = neurons[0][3]
    if layout == "global":  # make layer 0's neurons the top of the global ranking, cut at 4
        neurons[1] = neurons[1] - 100.0
    scores = Scores(heads=[torch.arange(8, 0, -1, dtype=torch.float64) for _ in layers], neurons=neurons)
    config = earlycrop.SelectionConfig(mlp=1 - 4 / 48 if layout == "uniform" else 1 - 4 / 96, layout=layout)
    plan = earlycrop.make_plan(model, scores, config)
    assert plan.neurons[0] == [0, 1, 2, 3]
    assert plan.meta["ties"] == {"heads": 0, "neurons": 2}
