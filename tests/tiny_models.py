"""Tiny random models of every supported family, for tests."""

from __future__ import annotations

import torch
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 64


def _llama_kwargs() -> dict:
    return dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=64,
    )


def build(family: str, seed: int = 0, attn: str = "eager") -> torch.nn.Module:
    """A tiny model of `family` with a small vocabulary; deterministic for a seed."""
    torch.manual_seed(seed)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**_llama_kwargs(), attention_bias=False))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**_llama_kwargs()))
    elif family == "mistral":
        model = MistralForCausalLM(MistralConfig(**_llama_kwargs(), sliding_window=None))
    elif family == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_inner=48, n_positions=64))
    elif family == "bert":
        model = BertForMaskedLM(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                           intermediate_size=48, max_position_embeddings=64))
    elif family == "bert-cls":
        model = BertForSequenceClassification(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                                         num_attention_heads=4, intermediate_size=48,
                                                         max_position_embeddings=64, num_labels=3))
    else:
        raise ValueError(family)
    model.config._attn_implementation = attn
    return model.eval()


FAMILIES = ["llama", "qwen2", "mistral", "gpt2", "bert", "bert-cls"]


def batches(family: str, n: int = 3, batch_size: int = 2, seq_len: int = 12, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """Random token batches with the labels the family's head expects."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (batch_size, seq_len), generator=gen)
        if family == "bert-cls":
            labels = torch.randint(0, 3, (batch_size,), generator=gen)
        else:
            labels = ids.clone()
        out.append({"input_ids": ids, "labels": labels})
    return out
