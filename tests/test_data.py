"""Tests for pipeline.data: offline documents, tokenizer, document split, packing, calibration shards."""

from __future__ import annotations

import json
import re

import datasets
import pytest
import torch
from datasets import Dataset
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from pipeline.data import (
    EOS_TOKEN,
    calibration_batches,
    load_documents,
    pack_causal_lm,
    shard_batches,
    split_documents,
    tokenize_classification,
    train_tokenizer,
)

COMMON_WORDS = {"the", "and", "of", "to", "in", "is", "was"}
SEQ_LEN = 32


def _words(texts: list[str]) -> set[str]:
    return {w for t in texts for w in re.findall(r"[a-z]+", t.lower())}


@pytest.fixture(scope="module")
def lee() -> Dataset:
    return load_documents("gensim:lee")


@pytest.fixture(scope="module")
def tokenizer(lee: Dataset) -> PreTrainedTokenizerFast:
    return train_tokenizer(lee["text"], vocab_size=600)


@pytest.fixture(scope="module")
def blocks(lee: Dataset, tokenizer: PreTrainedTokenizerFast) -> Dataset:
    return pack_causal_lm(lee.select(range(40)), tokenizer, SEQ_LEN)


def _write_jsonl(path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


# ---------------------------------------------------------------- offline corpora


def test_gensim_wiki_gives_clean_english_articles() -> None:
    ds = load_documents("gensim:wiki")
    texts = ds["text"]
    assert ds.column_names == ["text"]
    assert len(texts) >= 50
    assert sum(len(t) for t in texts) > 1_000_000
    assert COMMON_WORDS <= _words(texts)
    for marker in ("[[", "]]", "{{", "}}", "'''", "==", "<ref", "#REDIRECT"):
        assert not any(marker in t for t in texts), marker
    # Paragraphs are prose: each ends like a sentence.
    paragraphs = [p for t in texts for p in t.split("\n\n")]
    assert all(re.search(r"[.!?][\"')\]]?$", p) for p in paragraphs)
    assert any(t.startswith("Anarchism is a political philosophy") for t in texts)


def test_gensim_lee_one_story_per_line(lee: Dataset) -> None:
    texts = lee["text"]
    assert len(texts) == 300
    assert all("\n" not in t and len(t.split()) > 20 for t in texts)
    assert COMMON_WORDS <= _words(texts)
    assert texts[0].startswith("Hundreds of people have been forced to vacate their homes")


def test_unknown_gensim_corpus_errors() -> None:
    with pytest.raises(ValueError, match="unknown gensim corpus 'gensim:nope'.*'gensim:polarity'.*'gensim:newsgroups'"):
        load_documents("gensim:nope")


def test_unlabelled_gensim_corpus_rejects_label_field() -> None:
    with pytest.raises(ValueError, match="'gensim:lee' has no labels.*'gensim:polarity'"):
        load_documents("gensim:lee", label_field="label")


def test_gensim_polarity_labelled_sentences() -> None:
    ds = load_documents("gensim:polarity", label_field="label")
    assert ds.column_names == ["text", "label"]
    assert ds.features["label"].names == ["neg", "pos"]
    assert len(ds) == 200 and sum(ds["label"]) == 100
    assert ds[0] == {"text": "simplistic , silly and tedious .", "label": 0}
    texts = ds["text"]
    assert not any(t.startswith("__label__") for t in texts)
    assert any("tequila bender \u2014 and" in t for t in texts)  # Windows-1252 em dash decoded
    assert COMMON_WORDS <= _words(texts)


def test_gensim_newsgroups_bodies_without_headers_quotes_signatures() -> None:
    ds = load_documents("gensim:newsgroups", label_field="label")
    assert ds.column_names == ["text", "label"]
    assert ds.features["label"].names == ["alt.atheism", "sci.space"]
    assert len(ds) == 200 and sum(ds["label"]) == 100
    texts = ds["text"]
    assert sum(len(t) for t in texts) > 100_000
    # The header names the class outright: it must be gone, as must quoted lines.
    assert not any(re.match(r"(From|Subject|Newsgroups|Path):", t) for t in texts)
    assert not any(line.startswith((">", "|")) for t in texts for line in t.split("\n"))
    assert COMMON_WORDS <= _words(texts)


def test_labelled_gensim_corpus_as_plain_text_and_bad_label_field() -> None:
    assert load_documents("gensim:newsgroups").column_names == ["text"]
    with pytest.raises(ValueError, match="no field 'sentiment'"):
        load_documents("gensim:polarity", label_field="sentiment")


# ---------------------------------------------------------------- local files


def test_txt_one_document_per_paragraph_block(tmp_path) -> None:
    path = tmp_path / "docs.txt"
    path.write_text("First doc line one.\nFirst doc line two.\n\nSecond doc.\n\n\nThird doc.\n", encoding="utf-8")
    ds = load_documents(str(path), cache_dir=str(tmp_path / "cache"))
    assert len(ds) == 3
    assert "line one" in ds[0]["text"] and "line two" in ds[0]["text"]
    assert ds[1]["text"].strip() == "Second doc."


def test_jsonl_with_custom_text_field(tmp_path) -> None:
    path = _write_jsonl(tmp_path / "d.jsonl", [{"body": "alpha beta", "id": 1}, {"body": "gamma", "id": 2}])
    ds = load_documents(path, text_field="body", cache_dir=str(tmp_path / "cache"))
    assert ds.column_names == ["text"]
    assert list(ds["text"]) == ["alpha beta", "gamma"]


def test_parquet_and_folder(tmp_path) -> None:
    folder = tmp_path / "pq"
    folder.mkdir()
    Dataset.from_dict({"text": ["one", "two"]}).to_parquet(str(folder / "a.parquet"))
    Dataset.from_dict({"text": ["three", "   "]}).to_parquet(str(folder / "b.parquet"))
    single = load_documents(str(folder / "a.parquet"), cache_dir=str(tmp_path / "cache"))
    assert list(single["text"]) == ["one", "two"]
    both = load_documents(str(folder), cache_dir=str(tmp_path / "cache"))
    assert sorted(both["text"]) == ["one", "three", "two"]  # blank document dropped


def test_missing_path_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_documents(str(tmp_path / "nope.txt"))


def test_unsupported_extension_errors(tmp_path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("text\nhello\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"unsupported data file .*d\.csv"):
        load_documents(str(path))


def test_empty_file_errors(tmp_path) -> None:
    path = tmp_path / "empty.txt"
    path.write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match=r"empty\.txt.* is empty"):
        load_documents(str(path))


def test_blank_only_documents_error(tmp_path) -> None:
    path = _write_jsonl(tmp_path / "blank.jsonl", [{"text": "  "}, {"text": ""}])
    with pytest.raises(ValueError, match="no non-empty documents"):
        load_documents(path, cache_dir=str(tmp_path / "cache"))


@pytest.mark.parametrize(("bad_row", "what"), [
    ({"text": None}, "null"),
    ({"body": "no text field"}, "missing field"),
    ({"text": 42}, "a number"),
    ({"text": ["a", "list"]}, "a list"),
    ({"text": "   "}, "blank"),
])
def test_rows_without_text_are_counted_and_reported(tmp_path, capsys, bad_row: dict, what: str) -> None:
    path = _write_jsonl(tmp_path / "d.jsonl", [{"text": "alpha beta"}, bad_row, {"text": "gamma"}, bad_row])
    ds = load_documents(path, cache_dir=str(tmp_path / "cache"))
    assert list(ds["text"]) == ["alpha beta", "gamma"], what
    assert ds.features["text"] == datasets.Value("string")
    assert f"dropped 2 of 4 rows without text in {path}" in capsys.readouterr().err.splitlines()


def test_rows_without_text_keep_the_labels_of_the_others(tmp_path, capsys) -> None:
    rows = [{"text": "good film", "label": "pos"}, {"text": 7, "label": "neg"}, {"text": "dull", "label": "neg"}]
    ds = load_documents(_write_jsonl(tmp_path / "c.jsonl", rows), label_field="label", cache_dir=str(tmp_path / "cache"))
    assert list(ds["text"]) == ["good film", "dull"]
    assert [ds.features["label"].names[i] for i in ds["label"]] == ["pos", "neg"]
    assert "dropped 1 of 3 rows" in capsys.readouterr().err


def test_all_rows_without_text_is_an_error(tmp_path) -> None:
    path = _write_jsonl(tmp_path / "n.jsonl", [{"text": None}, {"other": 1}])
    with pytest.raises(ValueError, match=r"n\.jsonl' holds no non-empty documents in field 'text' \(none of its 2 rows has text\)"):
        load_documents(path, cache_dir=str(tmp_path / "cache"))


@pytest.mark.parametrize(("name", "body", "message"), [
    ("cut.jsonl", '{"text": "a"}\n\n{"text": "b"}\n{"text": "c\n', r"cut\.jsonl' line 4 is not valid JSON \(.*\); fix or remove that line"),
    ("scalar.jsonl", '{"text": "a"}\n17\n', r"scalar\.jsonl' line 2 is a JSON int, not an object with fields"),
    ("array.json", '[\n  {"text": "a"},\n  {"text" "b"}\n]\n', r"array\.json' line 3 is not valid JSON \(Expecting ':' delimiter\)"),
])
def test_malformed_json_names_the_file_and_line(tmp_path, name: str, body: str, message: str) -> None:
    (tmp_path / name).write_text(body, encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        load_documents(str(tmp_path / name), cache_dir=str(tmp_path / "cache"))


def test_a_json_array_document_loads(tmp_path) -> None:
    (tmp_path / "a.json").write_text('[\n  {"text": "one"},\n  {"text": "two"}\n]\n', encoding="utf-8")
    assert list(load_documents(str(tmp_path / "a.json"), cache_dir=str(tmp_path / "cache"))["text"]) == ["one", "two"]


@pytest.mark.parametrize("name", ["latin.txt", "latin.jsonl"])
def test_non_utf8_file_errors(tmp_path, name: str) -> None:
    path = tmp_path / name
    body = '{"text": "caf\xe9"}\n' if name.endswith("jsonl") else "caf\xe9 au lait\n"
    path.write_bytes(body.encode("latin-1"))
    with pytest.raises(ValueError, match=rf"{re.escape(name)}.* is not UTF-8"):
        load_documents(str(path))


def test_missing_text_and_label_fields_error(tmp_path) -> None:
    path = _write_jsonl(tmp_path / "d.jsonl", [{"body": "x", "y": 1}])
    with pytest.raises(ValueError, match=r"no field 'text'.*\['body', 'y'\]"):
        load_documents(path, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="no field 'label'"):
        load_documents(path, text_field="body", label_field="label", cache_dir=str(tmp_path / "cache"))


def test_hub_name_offline_error(monkeypatch) -> None:
    import huggingface_hub.constants

    # Offline mode makes the hub attempt fail at once instead of retrying DNS for ~25 s.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="offline: pass a local"):
        load_documents("surely-not-a-cached-dataset-xyz")


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_round_trips_and_saves(tmp_path, tokenizer: PreTrainedTokenizerFast) -> None:
    text = "The bushfire near Sydney spread quickly, naïve café ☃ 42!\n  Second line."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert len(tokenizer) == 600
    assert tokenizer.eos_token == tokenizer.bos_token == tokenizer.unk_token == EOS_TOKEN
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
    tokenizer.save_pretrained(tmp_path / "tok")
    loaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert loaded(text, add_special_tokens=False)["input_ids"] == ids
    assert loaded.decode(ids) == text
    assert (loaded.eos_token_id, loaded.pad_token_id) == (tokenizer.eos_token_id, tokenizer.pad_token_id)


def test_tokenizer_rejects_tiny_vocab_and_no_text() -> None:
    with pytest.raises(ValueError, match="vocab_size=100"):
        train_tokenizer(["hello"], vocab_size=100)
    with pytest.raises(ValueError, match="no texts"):
        train_tokenizer([], vocab_size=300)


# ---------------------------------------------------------------- split


def test_split_by_document_disjoint_and_deterministic(lee: Dataset) -> None:
    train, val = split_documents(lee, 0.1, seed=3)
    assert (len(train), len(val)) == (270, 30)
    assert not set(train["text"]) & set(val["text"])
    assert sorted([*train["text"], *val["text"]]) == sorted(lee["text"])
    again_train, again_val = split_documents(lee, 0.1, seed=3)
    assert list(again_val["text"]) == list(val["text"])
    assert list(again_train["text"]) == list(train["text"])
    assert list(split_documents(lee, 0.1, seed=4)[1]["text"]) != list(val["text"])


def test_split_errors_when_a_side_is_empty() -> None:
    ds = Dataset.from_dict({"text": ["a", "b", "c"]})
    with pytest.raises(ValueError, match="validation side empty"):
        split_documents(ds, 0.1, seed=0)
    with pytest.raises(ValueError, match="must be in"):
        split_documents(ds, 1.0, seed=0)


# ---------------------------------------------------------------- packing


def test_pack_blocks_are_the_tokenized_stream(
    lee: Dataset, tokenizer: PreTrainedTokenizerFast, blocks: Dataset
) -> None:
    stream: list[int] = []
    for text in lee.select(range(40))["text"]:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert len(blocks) == len(stream) // SEQ_LEN
    assert all(len(b) == SEQ_LEN for b in blocks["input_ids"])
    flat = [t for b in blocks["input_ids"] for t in b]
    assert flat == stream[: len(flat)]
    assert list(blocks["labels"]) == list(blocks["input_ids"])
    assert flat.count(tokenizer.eos_token_id) >= 39  # one eos per document boundary


def test_pack_too_short_names_the_size(tokenizer: PreTrainedTokenizerFast) -> None:
    ds = Dataset.from_dict({"text": ["tiny", "text"]})
    with pytest.raises(ValueError, match=r"\(2 documents, \d+ tokens\) is too short .*seq_len=512"):
        pack_causal_lm(ds, tokenizer, 512)


# ---------------------------------------------------------------- classification


def test_classification_jsonl_gives_label_tensor(tmp_path, tokenizer: PreTrainedTokenizerFast) -> None:
    rows = [
        {"sentence": "A wonderful, moving film that everyone should see.", "sentiment": "pos"},
        {"sentence": "Dull.", "sentiment": "neg"},
        {"sentence": "The fire crews worked through the night " * 10, "sentiment": "pos"},
    ]
    path = _write_jsonl(tmp_path / "cls.jsonl", rows)
    ds = load_documents(path, text_field="sentence", label_field="sentiment", cache_dir=str(tmp_path / "cache"))
    assert ds.column_names == ["text", "label"]
    assert ds.features["label"].names == ["neg", "pos"]
    enc = tokenize_classification(ds, tokenizer, seq_len=16)
    batch = {k: torch.tensor(list(enc[k][:3])) for k in ("input_ids", "attention_mask", "labels")}
    assert batch["labels"].tolist() == [1, 0, 1]
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (3, 16)
    mask = batch["attention_mask"]
    assert mask[1].sum() < 16 and mask[2].sum() == 16  # short one padded, long one truncated
    assert (batch["input_ids"][1][mask[1] == 0] == tokenizer.pad_token_id).all()


def test_classification_keeps_a_pretrained_tokenizers_cls_and_sep() -> None:
    from transformers import BertTokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat", "a", "dog"]
    bert = BertTokenizer(vocab={w: i for i, w in enumerate(words)})
    ds = Dataset.from_dict({"text": ["the cat sat on the mat", "a dog"], "label": [1, 0]})
    enc = tokenize_classification(ds, bert, seq_len=5)
    cls, sep, pad = bert.cls_token_id, bert.sep_token_id, bert.pad_token_id
    # [CLS] first (BERT's pooler reads it), [SEP] kept when truncating, padding after [SEP]
    assert list(enc["input_ids"]) == [[cls, 5, 6, 7, sep], [cls, 10, 11, sep, pad]]
    assert list(enc["attention_mask"]) == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]


def test_integer_labels_pass_through(tmp_path, tokenizer: PreTrainedTokenizerFast) -> None:
    path = _write_jsonl(tmp_path / "c.jsonl", [{"text": "good", "label": 2}, {"text": "bad", "label": 0}])
    ds = load_documents(path, label_field="label", cache_dir=str(tmp_path / "cache"))
    enc = tokenize_classification(ds, tokenizer, seq_len=8)
    assert list(enc["labels"]) == [2, 0]
    with pytest.raises(ValueError, match="needs a 'label' column"):
        tokenize_classification(ds.remove_columns("label"), tokenizer, seq_len=8)


# ---------------------------------------------------------------- calibration and shards


def test_calibration_batches_deterministic_and_equal_shape(blocks: Dataset) -> None:
    first = calibration_batches(blocks, num_batches=4, batch_size=3, seed=0)
    again = calibration_batches(blocks, num_batches=4, batch_size=3, seed=0)
    other = calibration_batches(blocks, num_batches=4, batch_size=3, seed=1)
    assert len(first) == 4
    assert all(b["input_ids"].shape == (3, SEQ_LEN) for b in first)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(first, other, strict=True))
    # Drawn without replacement from the blocks themselves (news text: no two blocks are equal).
    all_rows = {tuple(r) for r in blocks["input_ids"]}
    assert len(all_rows) == len(blocks)
    rows = [tuple(r.tolist()) for b in first for r in b["input_ids"]]
    assert len(set(rows)) == 12 and set(rows) <= all_rows


def test_calibration_not_enough_blocks(blocks: Dataset) -> None:
    with pytest.raises(ValueError, match=rf"= {len(blocks) + 1} blocks but the training set has only {len(blocks)}"):
        calibration_batches(blocks, num_batches=len(blocks) + 1, batch_size=1, seed=0)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_shards_partition_batches(world_size: int) -> None:
    batches = [{"i": torch.tensor(i)} for i in range(7)]
    shards = [shard_batches(batches, r, world_size) for r in range(world_size)]
    ids = sorted(id(b) for s in shards for b in s)
    assert ids == sorted(id(b) for b in batches)  # each batch on exactly one rank
    assert all(s for s in shards)
    assert [int(b["i"]) for b in shards[0]] == list(range(0, 7, world_size))


def test_shards_more_ranks_than_batches_errors() -> None:
    with pytest.raises(ValueError, match=r"more ranks than calibration batches: 3 batches for 4 ranks.*raise"):
        shard_batches([0, 1, 2], rank=0, world_size=4)
    with pytest.raises(ValueError, match="rank=2 is outside"):
        shard_batches([0, 1, 2], rank=2, world_size=2)
