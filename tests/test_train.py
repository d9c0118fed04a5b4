"""The training loop's pieces (pipeline/train.py): evaluation over every example, progress for a person
reading a terminal or a log file, and what a save prints."""

from __future__ import annotations

import logging

import torch
from accelerate import Accelerator, PartialState
from transformers import LlamaConfig, LlamaForCausalLM

from pipeline.distributed import describe_launch, quiet_expected_tied_weights
from pipeline.train import Progress, evaluate

torch.set_num_threads(1)


def tiny_lm(tied: bool = True) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, max_position_embeddings=32, tie_word_embeddings=tied)
    return LlamaForCausalLM(config).eval()


def test_evaluate_scores_every_example_including_a_partial_last_batch():
    model = tiny_lm()
    ids = torch.randint(0, 50, (10, 8), generator=torch.Generator().manual_seed(1))
    blocks = {"input_ids": ids, "labels": ids.clone()}
    # 10 examples in micro-batches of 4: 4 + 4 + 2, every one of them scored, each token weighted alike
    metrics = evaluate(Accelerator(cpu=True), model, blocks, micro_batch=4, max_batches=100)
    with torch.no_grad():
        per_example = [model(input_ids=ids[i : i + 1], labels=ids[i : i + 1]).loss for i in range(10)]
    torch.testing.assert_close(metrics["val_loss"], float(torch.stack(per_example).mean()), rtol=1e-5, atol=0)
    # max_batches still caps the examples: 2 batches of 4 = the first 8
    capped = evaluate(Accelerator(cpu=True), model, blocks, micro_batch=4, max_batches=2)
    torch.testing.assert_close(capped["val_loss"], float(torch.stack(per_example[:8]).mean()), rtol=1e-5, atol=0)


def test_progress_prints_log_lines_when_output_is_not_a_terminal(capsys):
    progress = Progress(enabled=True, start=0, total=10)
    progress.show(5, {"train_loss": 1.25, "tokens_per_s": 1234.0})
    progress.close()
    line = capsys.readouterr().out.strip()
    assert line.startswith("step 5/10  loss 1.2500  tokens/s 1,234  eta ")
    silent = Progress(enabled=False, start=0, total=10)
    silent.show(5, {"train_loss": 1.0, "tokens_per_s": 1.0})
    assert capsys.readouterr().out == ""


def test_expected_tied_embedding_warning_is_not_shown(caplog, monkeypatch):
    from accelerate.utils.other import clean_state_dict_for_safetensors

    PartialState()
    monkeypatch.setattr(logging.getLogger("accelerate.utils.other"), "filters", [])  # as in a fresh process
    model = tiny_lm(tied=True)
    with caplog.at_level(logging.WARNING):
        clean_state_dict_for_safetensors(dict(model.state_dict()))
    assert "Removed shared tensor" in caplog.text, "the warning this test silences no longer exists"
    caplog.clear()
    quiet_expected_tied_weights(model)
    with caplog.at_level(logging.WARNING):
        clean_state_dict_for_safetensors(dict(model.state_dict()))
    assert "Removed shared tensor" not in caplog.text


def test_launch_description_names_ranks_engine_and_precision():
    text = describe_launch(Accelerator(cpu=True), torch.bfloat16)
    assert text == "1 rank on cpu, a single process (no data parallelism), weights bfloat16, mixed precision no"
