"""When `earlycrop run` under ZeRO-3 can load, score and cut the dense model partitioned (pipeline/dense_partitioned.py),
and why not otherwise: the run prints the reason and builds the dense model whole, as before."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pipeline.config import load_config
from pipeline.dense_partitioned import whole_because

CONFIG = "configs/ci_tiny.yaml"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(path)
    return path


def reason(tmp_path, *overrides: str, world: int = 2) -> str | None:
    return whole_because(load_config(CONFIG, [f"output_dir={tmp_path}", *overrides]), world)


def test_a_saved_model_cut_before_training_with_first_order_scores_is_partitioned(tmp_path, folder):
    on_folder = [f"model.name_or_path={folder}", "model.family=null"]
    assert reason(tmp_path, *on_folder, "prune.hvp=finite_difference") is None
    for criterion in ("snip", "fisher", "activation", "magnitude", "random"):
        assert reason(tmp_path, *on_folder, f"prune.criterion={criterion}") is None, criterion


@pytest.mark.parametrize(("overrides", "expected"), [
    ((), "the model is built from scratch"),
    (("ON_FOLDER", "prune.hvp=exact"), "criterion earlycrop with hvp exact needs whole weights"),
    (("ON_FOLDER", "prune.hvp=finite_difference", "prune.prune_at=4"), "the cut is not before training"),
    (("ON_FOLDER", "prune.hvp=finite_difference", "prune.calibration_batches=3"),
     "prune.calibration_batches=3 does not divide over the 2 ranks"),
    (("ON_FOLDER", "prune.criterion=snip", "target.budget=params<=20000"), "the budget search measures the dense model"),
])
def test_what_needs_the_dense_model_whole_is_named(tmp_path, folder, overrides, expected):
    overrides = [o for x in overrides for o in ([f"model.name_or_path={folder}", "model.family=null"] if x == "ON_FOLDER" else [x])]
    assert expected in reason(tmp_path, *overrides)
