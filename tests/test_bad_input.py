"""Bad input: one clear error line, exit code 2, before any heavy work (issue 6, item 1).

Every case runs the real command line in this process (`launch.cli.main`), as `earlycrop run` or
`earlycrop prune` would, and checks that it
- returns non-zero (argparse's own errors exit with 2) within seconds,
- prints exactly one `earlycrop: error: ...` line (no traceback) that names the field or file AND says
  what would fix it (each case's pattern covers both),
- did no heavy work: errors found in the config leave no output folder at all; the others leave no
  scores, plan, checkpoint or model behind.

    python -m pytest -q tests/test_bad_input.py
"""

from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

import earlycrop
from launch.cli import main
from pipeline import data as data_lib

CONFIG = "configs/ci_tiny.yaml"
SECONDS = 90  # per case, generous for 2 busy cores; most take well under 3 s
HEAVY = ("scores.safetensors", "plan.json", "checkpoints", "model", "summary.json")


# ---------------------------------------------------------------- fixtures: broken folders and files


def _llama(vocab: int, layers: int = 2, pad: int | None = None) -> LlamaForCausalLM:
    """The ci_tiny shape: 4 heads in 2 KV groups, 64 MLP neurons per layer; positions up to prune's default --seq-len."""
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True, pad_token_id=pad,
    ))


@pytest.fixture(scope="module")
def fx(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad_input")
    lee = list(data_lib.load_documents("gensim:lee")["text"])
    tok = data_lib.train_tokenizer(lee, 300)
    good = root / "good"
    earlycrop.save_pretrained(_llama(320, pad=tok.pad_token_id), good, tok)

    def copy(name: str) -> Path:
        shutil.copytree(good, root / name)
        return root / name

    (copy("nocfg") / "config.json").unlink()
    binary = copy("bin")
    torch.save(load_file(binary / "model.safetensors"), binary / "pytorch_model.bin")
    (binary / "model.safetensors").unlink()
    four = copy("layers4")  # config.json says 4 layers, the weights hold 2
    config = json.loads((four / "config.json").read_text())
    (four / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 4}))
    shaped = copy("wrongshape")  # one tensor cut to the wrong width
    state = load_file(shaped / "model.safetensors")
    key = "model.layers.1.mlp.down_proj.weight"
    state[key] = state[key][:, :48].contiguous()
    save_file(state, shaped / "model.safetensors", metadata={"format": "pt"})
    (copy("badjson") / "config.json").write_text("{not json")
    for f in copy("notok").glob("tokenizer*"):
        f.unlink()
    earlycrop.save_pretrained(_llama(64), root / "bigtok", tok)  # 300 tokens, 64 embedding rows
    torch.manual_seed(0)
    neox = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, max_position_embeddings=64))
    earlycrop.save_pretrained(neox, root / "neox", tok)
    (root / "empty_dir").mkdir()
    _broken_weights(copy)
    mislabelled = copy("qwen_arch")  # a Qwen2 class under a Llama model_type
    (mislabelled / "config.json").write_text(json.dumps({**config, "architectures": ["Qwen2ForCausalLM"]}))
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=320, n_embd=32, n_layer=2, n_head=4, n_inner=64, n_positions=64))
    earlycrop.save_pretrained(gpt2, root / "gpt2_64", tok)
    (root / "good_link").symlink_to(good, target_is_directory=True)
    (root / "notes").mkdir()
    (root / "notes" / "todo.txt").write_text("the user's own file\n")

    (root / "empty.txt").write_text("")
    (root / "latin1.txt").write_bytes("caf\xe9 na\xefve r\xe9sum\xe9. ".encode("latin-1") * 50)
    (root / "four_docs.txt").write_text("one short line\n\nanother short one\n\nthird\n\nfourth doc\n")
    (root / "tiny_docs.txt").write_text("\n\n".join(f"document number {i}." for i in range(40)))
    (root / "data.csv").write_text("text\nhello world\n")
    (root / "no_text.jsonl").write_text('{"text": null}\n{"body": "x"}\n{"text": "   "}\n')
    (root / "malformed.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lee[:5]) + '{"text": "cut off\n')
    (root / "nolabel.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in lee[:60]))
    (root / "three_labels.jsonl").write_text("\n".join(json.dumps({"text": t, "label": i % 3}) for i, t in enumerate(lee[:120])))
    (root / "bad.yaml").write_text("model: {family: llama\n  data: [")
    (root / "list.yaml").write_text("- a\n- b\n")
    (root / "typo_in_file.yaml").write_text(Path(CONFIG).read_text().replace("  heads: 0.5", "  heds: 0.5"))
    return root


def _broken_weights(copy) -> None:
    """model.safetensors cut in half, emptied, and with a header length past the end of the file."""
    cut = copy("truncated") / "model.safetensors"
    data = cut.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    (copy("zero_bytes") / "model.safetensors").write_bytes(b"")
    header = copy("bad_header") / "model.safetensors"
    header.write_bytes((10**9).to_bytes(8, "little") + data[8:])


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """The hub is unreachable here; offline mode makes a hub attempt fail at once instead of retrying."""
    import datasets
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


# ---------------------------------------------------------------- the table


@dataclass
class Case:
    id: str
    args: list[str]  # `{fx}` = fixture folder, `{out}` = this case's output folder
    message: str  # regex on the error line: names the field / file and the fix
    stage: str = "early"  # "config": caught before anything is written; "early": before scoring


def run(*overrides: str) -> list[str]:
    return ["run", CONFIG, "output_dir={out}", "tracking=false", *overrides]


def from_folder(name: str, *overrides: str) -> list[str]:
    return run("model.family=null", f"model.name_or_path={{fx}}/{name}", *overrides)


def prune(*args: str, model: str = "good", data: str = "gensim:lee") -> list[str]:
    return ["prune", "--model", f"{{fx}}/{model}", "--data", data, "--out", "{out}", *args]


CASES = [
    # -- config keys and types: caught by validation, nothing written
    Case("top_level_typo", run("sed=1"), r"sed: unknown key; did you mean 'seed'\?", "config"),
    Case("nested_typo", run("train.max_step=5"), r"train\.max_step: unknown key; did you mean 'max_steps'\?", "config"),
    Case("typo_in_yaml_file", ["run", "{fx}/typo_in_file.yaml", "output_dir={out}"],
         r"typo_in_file\.yaml: prune\.heds: unknown key; did you mean 'heads'\?", "config"),
    Case("unknown_section", run("trainer.lr=1"), r"trainer: unknown key; did you mean 'train'\?", "config"),
    Case("wrong_type_float", run("train.lr=fast"), r"train\.lr: Input should be a valid number.*\(got 'fast'\)", "config"),
    Case("wrong_type_int", run("train.max_steps=1.5"), r"train\.max_steps: Input should be a valid integer.*\(got 1\.5\)", "config"),
    Case("wrong_type_section", run("model.init=5"), r"model\.init: Input should be a valid dictionary", "config"),
    Case("ratio_ge_1", run("prune.heads=1.0"), r"prune\.heads: Input should be less than 1 \(got 1\.0\)", "config"),
    Case("ratio_negative", run("prune.mlp=-0.1"), r"prune\.mlp: Input should be greater than or equal to 0 \(got -0\.1\)", "config"),
    Case("target_params_zero", run("prune.target_params=0"), r"prune\.target_params: Input should be greater than 0", "config"),
    Case("prune_at_not_before_max_steps", run("prune.prune_at=12"),
         r"prune\.prune_at=12 is not before train\.max_steps=12: lower prune\.prune_at .* or raise train\.max_steps", "config"),
    Case("prune_at_negative", run("prune.prune_at=-1"), r"prune\.prune_at: prune_at must be >= 0, 'auto' or 'never'", "config"),
    Case("unknown_criterion", run("prune.criterion=snipp"),
         r"prune\.criterion: unknown criterion 'snipp'; choose one of: .*earlycrop.*snip", "config"),
    Case("init_typo", run("model.init.hidden_sizee=32"),
         r"model\.init\.hidden_sizee is not a LlamaConfig field; did you mean 'hidden_size'\?", "config"),
    Case("init_gqa_inconsistent", run("model.init.num_key_value_heads=3"),
         r"model\.init: num_attention_heads=4 is not a multiple of num_key_value_heads=3; use a divisor", "config"),
    Case("init_hidden_not_divisible", run("model.init.num_attention_heads=3", "model.init.num_key_value_heads=3"),
         r"model\.init is not a valid LlamaConfig: .*hidden size \(32\) is not a multiple of the number of attention heads \(3\)", "config"),
    Case("two_model_sources", run("model.name_or_path={fx}/good"), r"set exactly one of model\.name_or_path .* or model\.family", "config"),
    Case("unknown_family", run("model.family=gpt3"), r"model\.family: Input should be 'llama', .*'bert'", "config"),
    Case("classification_without_label_field", run("model.task=sequence_classification"),
         r"model\.task is sequence_classification: set data\.label_field", "config"),
    Case("vocab_below_minimum", run("data.vocab_size=100"), r"data\.vocab_size: Input should be greater than or equal to 256", "config"),
    Case("validation_fraction", run("data.validation_fraction=0.7"), r"data\.validation_fraction: Input should be less than 0\.5", "config"),
    Case("override_without_equals", run("train.lr"), r"override 'train\.lr' is not key=value \(e\.g\. .*train\.lr=1e-3\)", "config"),
    Case("override_into_a_value", run("seed.x=1"), r"override 'seed\.x': 'seed' is not a section", "config"),
    Case("missing_config_file", ["run", "{fx}/nope.yaml"], r"config file .*nope\.yaml does not exist", "config"),
    Case("invalid_yaml", ["run", "{fx}/bad.yaml"], r"bad\.yaml is not valid YAML at line 2, column \d+: .*; fix the syntax there", "config"),
    Case("yaml_not_a_mapping", ["run", "{fx}/list.yaml"], r"list\.yaml must be a mapping of keys to values", "config"),
    Case("output_dir_is_a_file", ["run", CONFIG, "output_dir={fx}/empty.txt"],
         r"output_dir=.*empty\.txt is an existing file; point output_dir at a folder", "config"),
    # -- ratios and budgets the model cannot meet: found by a dry-run selection before scoring
    Case("ratio_empties_a_layer", run("prune.heads=0.9"), r"heads=0\.9 would empty layer 0 .*use a ratio of at most 0\.5"),
    Case("ratio_inconsistent_with_gqa", run("prune.heads=0.25"),
         r"heads=0\.25 removes nothing: .*multiples of 2 .*GQA groups.*a ratio of at least 0\.5 removes some"),
    Case("round_to_wider_than_layer", run("prune.round_to=128"), r"round_to=128 is larger than a layer's 64 MLP neurons; use round_to <= 64"),
    Case("impossible_target_params", run("prune.target_params=1000"),
         r"target_params=1,000 cannot be met: .*still has [\d,]+ parameters .*raise target_params"),
    # -- model folders
    Case("model_folder_missing", from_folder("nope"), r"folder .*nope does not exist \(.*must be local"),
    Case("model_without_config_json", from_folder("nocfg"), r"nocfg has no config\.json: save the model with save_pretrained"),
    Case("model_without_safetensors", from_folder("bin"), r"bin has no \*\.safetensors weights \(only safetensors are loaded\)"),
    Case("config_more_layers_than_weights", from_folder("layers4"),
         r"layers4/model\.safetensors does not match config\.json: 18 tensors missing \(e\.g\. model\.layers\.2\..*same save_pretrained"),
    Case("weight_of_wrong_shape", from_folder("wrongshape"),
         r"wrongshape/model\.safetensors: model\.layers\.1\.mlp\.down_proj\.weight has shape \[32, 48\] but config\.json implies \[32, 64\]"),
    Case("config_json_not_json", from_folder("badjson"), r"badjson.*config\.json' is not a valid JSON file.*re-save it with save_pretrained"),
    Case("unsupported_family_folder", from_folder("neox"), r"unsupported model family 'GPTNeoXConfig' .*supported families: bert, gpt2, llama"),
    Case("tokenizer_larger_than_embeddings", from_folder("bigtok"),
         r"tokenizer has 300 tokens but the model's embedding has 64 rows: use the model's own tokenizer"),
    Case("model_folder_without_tokenizer", from_folder("notok"), r"notok has no tokenizer: set data\.tokenizer to a tokenizer folder"),
    Case("tokenizer_folder_empty", run("data.tokenizer={fx}/empty_dir"), r"data\.tokenizer=.*empty_dir holds no tokenizer files"),
    # -- data
    Case("empty_dataset", run("data.source={fx}/empty.txt"), r"empty\.txt' is empty; add documents"),
    Case("non_utf8_file", run("data.source={fx}/latin1.txt"), r"latin1\.txt' is not UTF-8 .*re-encode it as UTF-8"),
    Case("too_few_documents_to_split", run("data.source={fx}/four_docs.txt"),
         r"splitting 4 documents with validation_fraction=0\.1 leaves the validation side empty; add documents"),
    Case("too_short_for_one_block", run("data.source={fx}/tiny_docs.txt", "data.seq_len=128",
                                                 "model.init.max_position_embeddings=128"),
         r"dataset \(\d+ documents, \d+ tokens\) is too short for one block of seq_len=128; add text or lower seq_len"),
    Case("unsupported_extension", run("data.source={fx}/data.csv"), r"unsupported data file .*data\.csv' \(extension '\.csv'\); use one of"),
    Case("data_path_missing", run("data.source={fx}/nothere.txt"), r"nothere\.txt' does not exist; pass an existing file or folder"),
    Case("text_field_missing", run("data.source={fx}/nolabel.jsonl", "data.text_field=body"),
         r"nolabel\.jsonl' has no field 'body' \(fields: \['text'\]\); set text_field"),
    Case("label_field_missing", run("data.source={fx}/nolabel.jsonl", "model.task=sequence_classification", "data.label_field=label"),
         r"nolabel\.jsonl' has no field 'label' .*set text_field/label_field"),
    Case("labels_beyond_num_labels", run("data.source={fx}/three_labels.jsonl", "model.task=sequence_classification",
                                         "data.label_field=label"),
         r"labels up to 2 but model\.num_labels=2: set model\.num_labels=3"),
    Case("unlabelled_corpus_for_classification", run("model.task=sequence_classification", "data.label_field=label"),
         r"'gensim:lee' has no labels; drop label_field"),
    Case("unknown_gensim_corpus", run("data.source=gensim:nope"), r"unknown gensim corpus 'gensim:nope'; use one of 'gensim:wiki'"),
    Case("hub_dataset_offline", run("data.source=wikitext"), r"'wikitext' is not a local file or folder.*offline: pass a local"),
    Case("calibration_larger_than_data", run("prune.calibration_batch_size=5000"),
         r"calibration needs 4 batches x 5000 = 20000 blocks but the training set has only \d+; lower"),
    Case("tokenizer_vocab_below_bytes", run("data.vocab_size=256"), r"vocab_size=256 is below 258 .*raise it"),
    Case("micro_batch_larger_than_training_set", run("train.micro_batch_size=100000"),
         r"\d+ training blocks are fewer than one batch on every rank \(100000 × 1\): use more text, a smaller train\.micro_batch_size"),
    Case("validation_smaller_than_one_batch", run("data.validation_fraction=0.01", "data.seq_len=256", "train.micro_batch_size=16",
                                                           "model.init.max_position_embeddings=256"),
         r"\d+ validation blocks are fewer than one batch on every rank .*or a larger data\.validation_fraction"),
    # -- `earlycrop prune`
    Case("prune_ratio_ge_1", prune("--heads", "1.5"), r"argument --heads: 1\.5 is not a fraction in \[0, 1\)", "config"),
    Case("prune_unknown_layout", prune("--layout", "diagonal"), r"argument --layout: invalid choice: 'diagonal'", "config"),
    Case("prune_unknown_criterion", prune("--criterion", "bogus"), r"unknown criterion 'bogus'; choose one of: activation", "config"),
    Case("prune_model_missing", prune(model="nope"), r"model folder .*nope does not exist", "config"),
    Case("prune_data_missing", prune(data="{fx}/nothere.txt"), r"--data .*nothere\.txt does not exist", "config"),
    Case("prune_zero_batches", prune("--batches", "0"), r"--batches must be at least 1", "config"),
    Case("prune_mismatched_weights", prune("--heads", "0.5", model="layers4"), r"layers4/model\.safetensors does not match config\.json"),
    Case("prune_tokenizer_larger_than_embeddings", prune("--heads", "0.5", model="bigtok"),
         r"tokenizer in .*bigtok has 300 tokens but the model's embedding has 64 rows: save the model's own tokenizer"),
    Case("prune_without_tokenizer", prune(model="notok"), r"notok has no tokenizer files: save the tokenizer into the model folder"),
    Case("prune_ratio_inconsistent_with_gqa", prune("--heads", "0.25"), r"heads=0\.25 removes nothing"),
    Case("prune_data_too_short", prune("--heads", "0.5", data="{fx}/four_docs.txt"), r"too short for one block of seq_len=128"),
    # -- issue 12: never lose what a user had; every --out mistake is found before the model is loaded
    Case("prune_out_is_the_model", ["prune", "--model", "{fx}/good", "--data", "gensim:lee", "--out", "{fx}/good"],
         r"--out .*good is the --model folder .*would overwrite the input model; choose another --out", "config"),
    Case("prune_out_links_to_the_model", ["prune", "--model", "{fx}/good", "--data", "gensim:lee", "--out", "{fx}/good_link"],
         r"--out .*good_link is the --model folder", "config"),
    Case("prune_out_inside_the_model", ["prune", "--model", "{fx}/good", "--data", "gensim:lee", "--out", "{fx}/good/pruned"],
         r"--out .*good/pruned is inside --model .*choose another --out", "config"),
    Case("prune_out_contains_the_model", ["prune", "--model", "{fx}/good", "--data", "gensim:lee", "--out", "{fx}"],
         r"--out .* contains --model .*choose another --out", "config"),
    Case("prune_out_is_a_file", ["prune", "--model", "{fx}/good", "--data", "gensim:lee", "--out", "{fx}/empty.txt"],
         r"--out .*empty\.txt is an existing file; point --out at a folder", "config"),
    Case("prune_out_not_empty", ["prune", "--model", "{fx}/good", "--data", "gensim:lee", "--out", "{fx}/bin"],
         r"--out .*bin is not empty: pass --overwrite to replace it, or choose another folder", "config"),
    Case("prune_overwrite_a_folder_without_a_model",
         ["prune", "--model", "{fx}/good", "--data", "gensim:lee", "--out", "{fx}/notes", "--overwrite"],
         r"--out .*notes holds no model .*--overwrite replaces only a model folder", "config"),
    Case("prune_negative_fd_step", prune("--fd-step", "-1"), r"--fd-step must be a positive number \(got -1\.0\)", "config"),
    Case("prune_round_to_zero", prune("--round-to", "0"), r"--round-to must be at least 1", "config"),
    Case("prune_seq_len_past_positions", prune("--seq-len", "256"),
         r"--seq-len=256 is above the model's position limit \(max_position_embeddings=128 in .*good/config\.json\); "
         r"lower --seq-len to at most 128", "config"),
    Case("prune_gpt2_seq_len_past_positions", prune("--heads", "0.5", model="gpt2_64"),
         r"--seq-len=128 is above the model's position limit \(n_positions=64 in .*gpt2_64/config\.json\)", "config"),
    Case("prune_truncated_weights", prune(model="truncated"),
         r"truncated/model\.safetensors is truncated or not a safetensors file: re-save the model", "config"),
    Case("prune_zero_byte_weights", prune(model="zero_bytes"), r"zero_bytes/model\.safetensors is truncated or not", "config"),
    Case("prune_weights_header_past_the_end", prune(model="bad_header"), r"bad_header/model\.safetensors is truncated or not", "config"),
    Case("prune_architecture_of_another_family", prune(model="qwen_arch"),
         r"qwen_arch/config\.json says model_type llama but architectures \['Qwen2ForCausalLM'\]: fix one of them", "config"),
    Case("truncated_weights", from_folder("truncated"), r"truncated/model\.safetensors is truncated or not a safetensors file"),
    Case("architecture_of_another_family", from_folder("qwen_arch"), r"says model_type llama but architectures \['Qwen2ForCausalLM'\]"),
    Case("seq_len_past_positions_from_scratch", run("data.seq_len=128"),
         r"data\.seq_len=128 is above the model's position limit \(max_position_embeddings=64\); lower data\.seq_len to at "
         r"most 64 or raise max_position_embeddings", "config"),
    Case("override_without_key", run("=5"), r"override '=5' has no key: write key=value", "config"),
    Case("config_path_is_a_directory", ["run", "{fx}/empty_dir"], r"config file .*empty_dir is a directory: pass a YAML file", "config"),
    Case("data_rows_without_text", run("data.source={fx}/no_text.jsonl"),
         r"no_text\.jsonl' holds no non-empty documents in field 'text' \(none of its 3 rows has text\); add text"),
    Case("data_malformed_json_line", run("data.source={fx}/malformed.jsonl"),
         r"malformed\.jsonl' line 6 is not valid JSON \(.*\); fix or remove that line"),
]



def _run_case(case: Case, fx: Path, out: Path, capsys) -> tuple[int, str, float]:
    from accelerate.state import AcceleratorState

    argv = [a.replace("{fx}", str(fx)).replace("{out}", str(out)) for a in case.args]
    start = time.perf_counter()
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse rejects a bad flag value itself
        code = exc.code
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    return code, capsys.readouterr().err, time.perf_counter() - start


def _check(case: Case, fx: Path, out: Path, capsys) -> None:
    code, err, seconds = _run_case(case, fx, out, capsys)
    errors = [line for line in err.splitlines() if re.match(r"earlycrop( \w+)?: error: ", line)]
    assert code not in (0, None), f"{case.id}: exited 0; stderr tail:\n{err[-2000:]}"
    assert "Traceback" not in err, err[-3000:]
    assert len(errors) == 1, f"{case.id}: expected one error line, got {errors}\n{err[-2000:]}"
    assert re.search(case.message, errors[0]), f"{case.id}: {errors[0]!r} does not match {case.message!r}"
    assert seconds < SECONDS, f"{case.id}: took {seconds:.0f} s"
    if case.stage == "config":
        assert not out.exists(), f"{case.id}: {out} was created although the input is rejected up front"
    else:
        left = [name for name in HEAVY if (out / name).exists()]
        assert not left, f"{case.id}: {left} written before the error"


def test_at_least_thirty_cases() -> None:
    assert len(CASES) >= 30 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_fails_fast_with_one_clear_line(case: Case, fx: Path, tmp_path: Path, capsys) -> None:
    _check(case, fx, tmp_path / "out", capsys)


def test_more_ranks_than_calibration_batches_names_the_fix() -> None:
    """What every rank checks before scoring (`pipeline.data.shard_batches`); a real 2-rank launch is below."""
    with pytest.raises(ValueError, match=r"more ranks than calibration batches: 3 batches for 4 ranks .* at least 4"):
        data_lib.shard_batches([{}, {}, {}], rank=0, world_size=4)


@pytest.mark.slow
def test_prune_with_more_ranks_than_batches_under_torchrun(fx: Path, tmp_path: Path) -> None:
    from . import launching

    out = tmp_path / "out"
    start = time.perf_counter()
    proc = launching.torchrun(2, "-m", "launch.cli", "prune", "--model", str(fx / "good"), "--data", "gensim:lee",
                              "--heads", "0.5", "--batches", "1", "--out", str(out), check=False, timeout=300)
    assert proc.returncode != 0
    assert "earlycrop: error: 2 ranks but only 1 calibration batches: raise --batches to at least 2" in proc.stderr
    assert f'File "{launching.REPO / "pipeline"}' not in proc.stderr  # our error line, not a traceback from our code
    assert not out.exists()
    assert time.perf_counter() - start < 300
