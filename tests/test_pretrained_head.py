"""A pretrained encoder that gets a NEW task head: masked-LM data, scoring through the checkpoint's own
pre-training head (`prune.objective`), and warming up the new head alone (`train.head_warmup_steps`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from accelerate import Accelerator
from safetensors.torch import load_file
from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification

import earlycrop
from earlycrop.criteria import score_units
from pipeline import data as data_lib
from pipeline.config import load_config
from pipeline.modeling import build_model, load_pretraining_model
from pipeline.finetune import warm_up_new_head
from pipeline.scoring import pretraining_scorer, scoring_criterion, scoring_objective

from . import launching

SEQ = 32


@pytest.fixture(scope="module")
def lee() -> list[str]:
    return list(data_lib.load_documents("gensim:lee")["text"])


@pytest.fixture(scope="module")
def tokenizer(lee):
    return data_lib.train_tokenizer(lee[:150], 320, mask_token=True)


def _save(model, tokenizer, folder: Path) -> Path:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _bert_config(tokenizer, **kw) -> BertConfig:
    return BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=48, max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
                      attn_implementation="eager", **kw)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, tokenizer) -> Path:
    """A tiny BERT saved with its masked-LM head, as configs/bert_pretrain_mlm.yaml writes it."""
    torch.manual_seed(0)
    return _save(BertForMaskedLM(_bert_config(tokenizer)), tokenizer, tmp_path_factory.mktemp("mlm"))


def _config(tmp_path: Path, folder: Path, *overrides: str):
    body = {
        "output_dir": str(tmp_path / "run"), "tracking": False,
        "model": {"name_or_path": str(folder), "task": "sequence_classification", "attn_implementation": "eager"},
        "data": {"source": "gensim:newsgroups", "label_field": "label", "seq_len": SEQ, "validation_fraction": 0.2},
        "prune": {"criterion": "earlycrop", "heads": 0.5, "mlp": 0.5, "calibration_batches": 2, "calibration_batch_size": 4},
        "train": {"max_steps": 2, "micro_batch_size": 4, "eval_batches": 2, "lr": 1e-2},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(body))
    return load_config(path, list(overrides))


def _calibration(tokenizer, n: int = 2):
    docs = data_lib.load_documents("gensim:newsgroups", label_field="label")
    return data_lib.calibration_batches(data_lib.tokenize_classification(docs, tokenizer, SEQ),
                                        num_batches=n, batch_size=4, seed=0)


# ------------------------------------------------------------------------------- masked-LM data


def test_static_masking_masks_only_ordinary_tokens_and_is_seeded(lee, tokenizer):
    blocks = {"input_ids": torch.tensor(data_lib.pack_causal_lm(
        data_lib.load_documents("gensim:lee").select(range(60)), tokenizer, 64)["input_ids"])}
    first, again, other = (data_lib.mask_for_mlm(blocks, tokenizer, 0.15, seed) for seed in (0, 0, 1))
    assert torch.equal(first["input_ids"], again["input_ids"]) and torch.equal(first["labels"], again["labels"])
    assert not torch.equal(first["labels"], other["labels"])
    original = blocks["input_ids"]
    chosen = first["labels"] != -100
    ordinary = original != tokenizer.eos_token_id
    assert 0.12 < chosen.sum() / ordinary.sum() < 0.18
    assert not chosen[~ordinary].any(), "eos (a special token) must never be masked"
    assert torch.equal(first["labels"][chosen], original[chosen])
    assert torch.equal(first["input_ids"][~chosen], original[~chosen])
    replaced = (first["input_ids"][chosen] == tokenizer.mask_token_id).float().mean()
    assert 0.7 < replaced < 0.9  # 80% become the mask token, the rest random or unchanged


def test_masking_needs_a_mask_token(lee):
    plain = data_lib.train_tokenizer(lee[:50], 300)
    with pytest.raises(ValueError, match="mask token"):
        data_lib.mask_for_mlm({"input_ids": torch.ones(2, 4, dtype=torch.long)}, plain, 0.15, 0)


@pytest.mark.slow
def test_masked_lm_run_learns_and_saves_a_masked_lm(tmp_path):
    body = {"output_dir": str(tmp_path / "run"), "tracking": False,
            "model": {"family": "bert", "task": "masked_lm", "attn_implementation": "eager",
                      "init": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                               "intermediate_size": 64, "max_position_embeddings": 64}},
            "data": {"source": "gensim:lee", "vocab_size": 300, "seq_len": 32},
            "prune": {"criterion": "snip", "heads": 0.5, "mlp": 0.5},
            "train": {"max_steps": 40, "micro_batch_size": 8, "lr": 3e-3, "warmup_steps": 4, "eval_every": 40,
                      "eval_batches": 4}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(body))
    launching.cli("run", str(tmp_path / "cfg.yaml"))
    folder = tmp_path / "run" / "model"
    model = earlycrop.from_pretrained(folder)
    assert type(model).__name__ == "BertForMaskedLM"
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    assert (model.config.pad_token_id, model.config.eos_token_id) == (tok.pad_token_id, tok.eos_token_id)
    assert [l.num_heads for l in earlycrop.get_adapter(model).layers(model)] == [2, 2]
    import json

    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    # far below a uniform guess over the vocabulary, so the masked positions were learned from
    assert summary["val_loss"] < 0.85 * torch.log(torch.tensor(300.0)).item()
    assert summary["val_loss_at_start"] > summary["val_loss"], "the pruned model is evaluated before training too"


# ------------------------------------------------------------------------------- the objective


def test_auto_criterion_is_earlycrop_also_for_a_new_head(tmp_path, pretrained, tokenizer):
    # real all-MiniLM-L6-v2, 5 seeds (benchmarks/recovery.py): earlycrop's test loss below magnitude's on every seed
    assert scoring_criterion(_config(tmp_path, pretrained, "prune.criterion=auto")) == "earlycrop"
    assert scoring_criterion(_config(tmp_path, pretrained, "prune.criterion=snip")) == "snip"
    torch.manual_seed(0)
    classifier = _save(BertForSequenceClassification(_bert_config(tokenizer)), tokenizer, tmp_path / "cls")
    assert scoring_criterion(_config(tmp_path, classifier, "prune.criterion=auto")) == "earlycrop"
    scratch = _config(tmp_path, pretrained, "prune.criterion=auto", "model.name_or_path=null", "model.family=bert")
    assert scoring_criterion(scratch) == "earlycrop"


def test_auto_objective_is_pretraining_only_for_a_new_head(tmp_path, pretrained, tokenizer):
    assert scoring_objective(_config(tmp_path, pretrained)) == "pretraining"
    assert scoring_objective(_config(tmp_path, pretrained, "prune.objective=task")) == "task"
    torch.manual_seed(0)
    classifier = _save(BertForSequenceClassification(_bert_config(tokenizer)), tokenizer, tmp_path / "cls")
    assert scoring_objective(_config(tmp_path, classifier)) == "task"
    causal = _config(tmp_path, pretrained, "model.task=causal_lm", "data.label_field=null")
    assert scoring_objective(causal) == "task"


def test_pretraining_scores_come_from_the_current_encoder_through_the_checkpoints_head(tmp_path, pretrained, tokenizer):
    cfg = _config(tmp_path, pretrained, "prune.objective=pretraining")
    model = build_model(cfg.model, len(tokenizer), tokenizer.pad_token_id, seed=0)
    with torch.no_grad():  # as if fine-tuning had already moved the encoder
        model.bert.encoder.layer[0].attention.self.query.weight.mul_(1.5)
    calibration = _calibration(tokenizer)
    scorer, batches = pretraining_scorer(cfg, model, calibration, tokenizer)
    assert type(scorer).__name__ == "BertForMaskedLM"
    assert torch.equal(scorer.bert.encoder.layer[0].attention.self.query.weight, model.bert.encoder.layer[0].attention.self.query.weight)
    reference = BertForMaskedLM.from_pretrained(pretrained, attn_implementation="eager")
    assert torch.equal(scorer.cls.predictions.transform.dense.weight, reference.cls.predictions.transform.dense.weight)
    for batch, raw in zip(batches, calibration):
        assert (batch["labels"][raw["attention_mask"] == 0] == -100).all(), "padding is never a masked-LM target"
        assert (batch["labels"] != -100).any()
    criterion = earlycrop.make_criterion("earlycrop")
    through_head = score_units(scorer, criterion, batches)
    through_new_head = score_units(model, criterion, calibration)
    assert not torch.allclose(torch.cat(through_head.heads), torch.cat(through_new_head.heads))


def test_objective_pretraining_refuses_a_folder_without_a_pretraining_head(tmp_path, tokenizer):
    torch.manual_seed(0)
    classifier = _save(BertForSequenceClassification(_bert_config(tokenizer)), tokenizer, tmp_path / "cls")
    cfg = _config(tmp_path, classifier, "prune.objective=pretraining")
    with pytest.raises(ValueError, match="pre-training head"):
        load_pretraining_model(str(classifier), cfg.model)


@pytest.mark.parametrize("overrides, message", [
    (["model.name_or_path=null", "model.family=bert", "prune.objective=pretraining"], "objective=pretraining"),
    (["model.name_or_path=null", "model.family=bert", "train.head_warmup_steps=5"], "head_warmup_steps"),
    (["model.name_or_path=null", "model.family=llama", "model.task=masked_lm", "data.label_field=null"], "masked_lm"),
])
def test_config_errors_name_the_key(tmp_path, pretrained, overrides, message):
    with pytest.raises(ValueError, match=message):
        _config(tmp_path, pretrained, *overrides)


# ------------------------------------------------------------------------------- head warm-up


class _NoTracking:
    def __init__(self) -> None:
        self.logged: dict[str, float] = {}

    def log_metrics(self, metrics, step) -> None:
        self.logged.update(metrics)


def test_head_warmup_trains_only_the_new_head(tmp_path, pretrained, tokenizer):
    from pipeline.prepare import prepare_data

    cfg = _config(tmp_path, pretrained, "train.head_warmup_steps=15")
    accelerator = Accelerator(cpu=True)
    prepared = prepare_data(cfg, accelerator)
    model = build_model(cfg.model, len(tokenizer), tokenizer.pad_token_id, seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    seen = {k: v[:64] for k, v in prepared.train_blocks.items()}

    def training_loss() -> float:
        model.eval()
        with torch.no_grad():
            return model(**seen).loss.item()

    start = training_loss()
    tracker = _NoTracking()
    warm_up_new_head(cfg, accelerator, model, prepared, tracker)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight", "classifier.bias"}
    assert all(p.requires_grad for p in model.parameters()), "the encoder trains again afterwards"
    assert training_loss() < start
    assert {"head_warmup_loss_first", "head_warmup_loss_last"} <= tracker.logged.keys()


def test_head_warmup_without_a_new_head_errors(tmp_path, tokenizer):
    torch.manual_seed(0)
    classifier = _save(BertForSequenceClassification(_bert_config(tokenizer)), tokenizer, tmp_path / "cls")
    cfg = _config(tmp_path, classifier, "train.head_warmup_steps=3")
    model = build_model(cfg.model, len(tokenizer), tokenizer.pad_token_id, seed=0)
    with pytest.raises(ValueError, match="no new head"):
        warm_up_new_head(cfg, Accelerator(cpu=True), model, None, _NoTracking())


@pytest.mark.slow
def test_two_ranks_score_a_new_head_model_like_one_process(tmp_path, pretrained):
    """Head warm-up then pre-training-head scoring, sharded over 2 ranks, gives the 1-rank scores."""
    cfg = _config(tmp_path, pretrained)
    body = cfg.model_dump()
    body["train"]["head_warmup_steps"] = 4
    body["prune"]["calibration_batches"] = 4
    runs = {}
    for ranks in (1, 2):
        body["output_dir"] = str(tmp_path / f"ranks{ranks}")
        path = tmp_path / f"cfg{ranks}.yaml"
        path.write_text(yaml.safe_dump(body))
        if ranks == 1:
            launching.cli("run", str(path))
        else:
            launching.torchrun(2, "-m", "launch.cli", "run", str(path))
        runs[ranks] = load_file(Path(body["output_dir"]) / "scores.safetensors")
    assert runs[1].keys() == runs[2].keys()
    for key in runs[1]:
        torch.testing.assert_close(runs[2][key], runs[1][key], rtol=1e-5, atol=1e-9)
    plan = earlycrop.Plan.load(tmp_path / "ranks2" / "plan.json")
    assert plan.meta["objective"] == "pretraining"
