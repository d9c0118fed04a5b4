"""The family registry: one adapter class is all a new family needs.

A throwaway adapter for Granite (a Llama-structured family earlycrop does not ship) is registered for one test
and unregistered after it; run-config validation, model building, the memory model and pruning then accept
`granite` with no other edit anywhere.
"""

from __future__ import annotations

import pytest
import torch
from transformers import GraniteConfig, GraniteForCausalLM, Qwen2Config

import earlycrop
from earlycrop.families import CONFIG_CLASSES, LlamaLikeAdapter
from earlycrop.memory import ModelShape, TrainingSetup, estimate_memory
from pipeline.config import ModelConfig
from pipeline.modeling import CONFIG_TYPES, build_model

BUILT_IN = ["bert", "gpt2", "llama", "mistral", "qwen2"]
INIT = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=8,
            num_key_value_heads=2, max_position_embeddings=64)


class GraniteAdapter(LlamaLikeAdapter):
    """Granite keeps Llama's modules (q/k/v/o, gate/up/down, RMSNorm, rotary): only the name and config differ."""

    name = "granite"
    config_types = (GraniteConfig,)


@pytest.fixture
def granite():
    earlycrop.register_adapter(GraniteAdapter)
    try:
        yield earlycrop.family_adapter("granite")
    finally:
        earlycrop.unregister_adapter("granite")


def test_an_unregistered_family_is_refused_everywhere():
    with pytest.raises(ValueError, match="Input should be 'llama', .*'bert'"):
        ModelConfig(family="granite", init=INIT)
    assert "granite" not in CONFIG_TYPES
    with pytest.raises(ValueError, match="unsupported model family 'GraniteConfig'"):
        ModelShape.from_model(GraniteForCausalLM(GraniteConfig(vocab_size=64, **INIT)))


def test_a_registered_family_needs_no_other_edit(granite):
    cfg = ModelConfig(family="granite", init=INIT, attn_implementation="eager")
    assert CONFIG_TYPES["granite"] is GraniteConfig
    model = build_model(cfg, vocab_size=64, pad_token_id=0, seed=0)
    assert isinstance(model, GraniteForCausalLM) and earlycrop.get_adapter(model) is granite

    dense = ModelShape.from_model(model)
    real = sum(p.numel() for p in model.parameters())
    assert (dense.family, dense.other_params, dense.num_params()) == ("granite", 0, real)
    assert (dense.norm, dense.gated_mlp, dense.kv_heads) == ("rms", True, [2, 2])
    assert estimate_memory(dense, TrainingSetup(precision="fp32")).weights == 4 * real

    plan = earlycrop.make_plan(model, earlycrop.score_units(model, "magnitude"), earlycrop.SelectionConfig(heads=0.5, mlp=0.5))
    predicted = dense.with_counts(**plan.counts())
    earlycrop.prune(model, plan)
    assert predicted == ModelShape.from_model(model)
    assert model(torch.randint(0, 64, (1, 6))).logits.shape == (1, 6, 64)


def test_config_validation_reads_the_adapter(granite):
    with pytest.raises(ValueError, match="Input should be 'llama', .*'granite'"):
        ModelConfig(family="gpt3")
    with pytest.raises(ValueError, match="model.init.hidden_sizee is not a GraniteConfig field; did you mean 'hidden_size'"):
        ModelConfig(family="granite", init={"hidden_sizee": 32})
    # masked_lm is not in the Llama-like adapters' tasks: only families that list it accept it
    with pytest.raises(ValueError, match=r"model.task=masked_lm needs a family that supports it \(model.family: bert\), not granite"):
        ModelConfig(family="granite", task="masked_lm")
    assert ModelConfig(family="bert", task="masked_lm").task == "masked_lm"


def test_unregistering_restores_the_built_in_families():
    earlycrop.register_adapter(GraniteAdapter)
    assert earlycrop.supported_families() == sorted([*BUILT_IN, "granite"])
    assert list(CONFIG_CLASSES)[-1] == "granite"
    assert isinstance(earlycrop.unregister_adapter("granite"), GraniteAdapter)
    assert earlycrop.supported_families() == BUILT_IN
    assert list(earlycrop.FAMILIES) == ["llama", "qwen2", "mistral", "gpt2", "bert"]
    with pytest.raises(ValueError, match="unknown model family 'granite'; supported families: bert, gpt2"):
        earlycrop.unregister_adapter("granite")


def test_register_refuses_an_inconsistent_adapter():
    class Qwen2Copy(LlamaLikeAdapter):
        name = "qwen2_copy"
        config_types = (Qwen2Config,)

    class Translator(GraniteAdapter):
        tasks = ("causal_lm", "translation")

    with pytest.raises(ValueError, match="Qwen2Config already belongs to family 'qwen2'"):
        earlycrop.register_adapter(Qwen2Copy)
    with pytest.raises(ValueError, match="unknown task 'translation'"):
        earlycrop.register_adapter(Translator)
    with pytest.raises(TypeError, match="abstract"):
        earlycrop.register_adapter(earlycrop.FamilyAdapter)
    assert earlycrop.supported_families() == BUILT_IN
    assert earlycrop.get_adapter(Qwen2Config()).name == "qwen2"


def test_registering_a_name_again_replaces_that_family():
    original = earlycrop.family_adapter("mistral")

    class Replacement(type(original)):
        pass

    try:
        earlycrop.register_adapter(Replacement)
        assert type(earlycrop.family_adapter("mistral")) is Replacement
        assert list(earlycrop.FAMILIES) == ["llama", "qwen2", "mistral", "gpt2", "bert"]  # keeps its place
    finally:
        earlycrop.register_adapter(original)
    assert earlycrop.family_adapter("mistral") is original
