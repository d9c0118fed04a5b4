"""`earlycrop prune --objective`: a fine-tuned classifier pruned on unlabelled text, scored on its own
predictions (issue 15 item 12)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

import earlycrop
from launch.cli import main
from pipeline import data as data_lib
from pipeline.prune_job import self_labelled

SEQ = 32


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> Path:
    """A tiny BERT classifier (3 classes, fine-tuned a little so that its predictions differ between texts) with
    its tokenizer, and 40 unlabelled texts."""
    root = tmp_path_factory.mktemp("objective")
    texts = list(data_lib.load_documents("gensim:lee")["text"])[:40]
    tokenizer = data_lib.train_tokenizer(texts, 320, mask_token=True)
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id, num_labels=3, attn_implementation="eager"))
    enc = tokenizer(texts, truncation=True, max_length=SEQ, padding="max_length", return_tensors="pt")
    labels = torch.tensor([len(t.split()) % 3 for t in texts])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(20):
        model(**enc, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(root / "classifier")
    tokenizer.save_pretrained(root / "classifier")
    (root / "texts.txt").write_text("\n\n".join(texts))
    return root


def _prune(root: Path, out: Path, data: Path, *extra: str) -> int:
    return main(["prune", "--model", str(root / "classifier"), "--data", str(data), "--criterion", "earlycrop",
                 "--heads", "0.5", "--mlp", "0.5", "--batches", "2", "--batch-size", "4", "--seq-len", str(SEQ),
                 "--out", str(out), *extra])


def test_self_labels_are_the_models_own_predictions():
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                     intermediate_size=24, num_labels=4)).train()
    batch = {"input_ids": torch.randint(0, 50, (6, 8)), "attention_mask": torch.ones(6, 8, dtype=torch.long),
             "labels": torch.zeros(6, dtype=torch.long)}
    (labelled,) = self_labelled(model, [batch])
    with torch.no_grad():
        expected = model.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.argmax(-1)
    assert torch.equal(labelled["labels"], expected) and torch.equal(labelled["input_ids"], batch["input_ids"])
    model.train()
    self_labelled(model, [batch])
    assert model.training, "the model's mode is put back"


def test_a_classifier_prunes_on_unlabelled_text(folders, tmp_path):
    out = tmp_path / "pruned"
    assert _prune(folders, out, folders / "texts.txt") == 0  # --objective auto: no labels, so self
    plan = earlycrop.Plan.load(out / "plan.json")
    assert plan.meta["objective"] == "self" and plan.counts()["heads"] == [2, 2] and plan.counts()["neurons"] == [24, 24]
    pruned = earlycrop.from_pretrained(out).eval()
    assert type(pruned).__name__ == "BertForSequenceClassification"
    ids = torch.randint(5, 300, (2, 12))
    assert pruned(input_ids=ids).logits.shape == (2, 3)
    scores = load_file(out / "scores.safetensors")
    assert all(torch.isfinite(t).all() and t.abs().sum() > 0 for t in scores.values())

    # scoring on the model's predictions is scoring on labels that equal them: the same scores
    texts = list(data_lib.load_documents(str(folders / "texts.txt"))["text"])
    dense = earlycrop.from_pretrained(folders / "classifier").eval()
    enc = AutoTokenizer.from_pretrained(folders / "classifier")(texts, truncation=True, max_length=SEQ,
                                                                 padding="max_length", return_tensors="pt")
    with torch.no_grad():
        predicted = dense(**enc).logits.argmax(-1).tolist()
    assert len(set(predicted)) > 1, "a classifier that predicts one class would make this check weak"
    labelled = tmp_path / "labelled.jsonl"
    labelled.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in zip(texts, predicted)))
    assert _prune(folders, tmp_path / "task", labelled, "--label-field", "label") == 0
    assert earlycrop.Plan.load(tmp_path / "task" / "plan.json").meta["objective"] == "task"
    on_labels = load_file(tmp_path / "task" / "scores.safetensors")
    for key, value in scores.items():
        torch.testing.assert_close(on_labels[key], value)


def test_task_objective_on_a_classifier_asks_for_labels(folders, tmp_path, capsys):
    assert _prune(folders, tmp_path / "out", folders / "texts.txt", "--objective", "task") == 2
    assert "needs --label-field" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_self_objective_needs_a_classifier(folders, tmp_path, capsys):
    lm = tmp_path / "lm"
    LlamaForCausalLM(LlamaConfig(vocab_size=320, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=64)).save_pretrained(lm)
    AutoTokenizer.from_pretrained(folders / "classifier").save_pretrained(lm)
    args = ["prune", "--model", str(lm), "--data", str(folders / "texts.txt"), "--out", str(tmp_path / "out"),
            "--objective", "self", "--seq-len", str(SEQ)]
    assert main(args) == 2
    assert "needs a sequence-classification model" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
