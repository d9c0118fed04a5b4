"""Every shipped config validates, and bad configs fail early with an error that names the key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml

import earlycrop
from earlycrop.criteria import CRITERIA, Scores
from pipeline.config import RunConfig, load_config
from pipeline.modeling import CONFIG_TYPES, build_model

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
BERT = ROOT / "configs" / "bert_finetune.yaml"


def _ids(paths: list[Path]) -> list[str]:
    return [p.name for p in paths]


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _minimal() -> dict:
    return {"model": {"family": "llama"}, "data": {"source": "gensim:lee"}}


# ---------------------------------------------------------------- the shipped configs


def test_configs_folder_is_not_empty() -> None:
    assert {"quickstart.yaml", "ci_tiny.yaml", "gpt2.yaml", "bert_finetune.yaml", "llama_1b_8gpu_zero2.yaml"} <= {
        p.name for p in CONFIGS
    }


@pytest.mark.parametrize("path", CONFIGS, ids=_ids(CONFIGS))
def test_every_config_loads_and_validates(path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    # what the YAML says is what the config holds (no key silently dropped or renamed)
    raw = yaml.safe_load(path.read_text())
    dumped = cfg.model_dump()
    for section, values in raw.items():
        if isinstance(values, dict):
            for key, value in values.items():
                assert dumped[section][key] == value, f"{section}.{key}"
        else:
            assert dumped[section] == values, section


@pytest.mark.parametrize("path", CONFIGS, ids=_ids(CONFIGS))
def test_launch_files_named_in_a_config_exist(path: Path) -> None:
    for name in re.findall(r"launch/(?:accelerate|deepspeed)/[\w.-]+\.(?:yaml|json)", path.read_text()):
        assert (ROOT / name).is_file(), f"{path.name} mentions {name}, which does not exist"


# configs that build a model from scratch, and those of them that prune (the others load a folder)
FROM_SCRATCH = [p for p in CONFIGS if load_config(p).model.family is not None]
PRUNED_FROM_SCRATCH = [p for p in FROM_SCRATCH if load_config(p).prune.prune_at != "never"]


@pytest.mark.parametrize("path", FROM_SCRATCH, ids=_ids(FROM_SCRATCH))
def test_from_scratch_init_keys_are_real_config_fields(path: Path) -> None:
    """transformers configs swallow unknown kwargs: a typo (`n_embed`) would silently change nothing."""
    cfg = load_config(path)
    defaults = CONFIG_TYPES[cfg.model.family]()
    unknown = [k for k in cfg.model.init if not hasattr(defaults, k)]
    assert not unknown, f"{path.name}: model.init keys {unknown} are not {type(defaults).__name__} fields"


@pytest.mark.parametrize("path", PRUNED_FROM_SCRATCH, ids=_ids(PRUNED_FROM_SCRATCH))
def test_pruned_model_config_is_saveable(path: Path) -> None:
    """Dry-run the config's selection and surgery on the meta device (no memory, no data).

    A pruned config that transformers refuses (e.g. a Llama whose kept head count does not divide
    hidden_size) would otherwise only fail in save_pretrained, after the whole training run.
    """
    cfg = load_config(path)
    with torch.device("meta"):
        model = build_model(cfg.model, cfg.data.vocab_size, 1, cfg.seed)
    layers = earlycrop.get_adapter(model).layers(model)
    scores = Scores(heads=[torch.zeros(l.num_heads) for l in layers], neurons=[torch.zeros(l.intermediate_size) for l in layers])
    p = cfg.prune
    plan = earlycrop.make_plan(model, scores, earlycrop.SelectionConfig(p.heads, p.mlp, p.layout, p.round_to, p.gqa, p.target_params))
    earlycrop.prune(model, plan)
    model.config.validate()


def test_llama_1b_config_has_the_stated_shape() -> None:
    cfg = load_config(ROOT / "configs" / "llama_1b_8gpu_zero2.yaml")
    init = cfg.model.init
    assert (init["hidden_size"], init["num_hidden_layers"], init["num_attention_heads"]) == (2048, 16, 32)
    assert (init["num_key_value_heads"], init["intermediate_size"], init["vocab_size"]) == (8, 5632, 32000)
    assert (cfg.model.attn_implementation, cfg.prune.hvp, cfg.train.mixed_precision) == ("sdpa", "finite_difference", "bf16")
    assert cfg.prune.prune_at == 0
    with torch.device("meta"):
        model = build_model(cfg.model, cfg.data.vocab_size, 1, cfg.seed)
    assert 0.8e9 < sum(p.numel() for p in model.parameters()) < 0.9e9


# ---------------------------------------------------------------- unknown keys and wrong types


@pytest.mark.parametrize(
    "override, key",
    [
        ("bogus=1", "bogus"),
        ("train.bogus=1", "train.bogus"),
        ("model.hidden_size=64", "model.hidden_size"),
        ("prune.head=0.5", "prune.head"),
    ],
)
def test_unknown_key_is_named(override: str, key: str) -> None:
    with pytest.raises(ValueError, match=rf"{re.escape(key)}: unknown key"):
        load_config(QUICKSTART, [override])


def test_unknown_key_in_the_yaml_file_is_named(tmp_path) -> None:
    data = _minimal()
    data["data"]["seqlen"] = 64
    data["extra_section"] = {"a": 1}
    with pytest.raises(ValueError) as err:
        load_config(_write(tmp_path, data))
    assert "data.seqlen: unknown key" in str(err.value)
    assert "extra_section: unknown key" in str(err.value)


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.lr=fast", "train.lr"),
        ("train.max_steps=1.5", "train.max_steps"),
        ("train.max_steps=[10]", "train.max_steps"),
        ("model.init=5", "model.init"),
        ("prune.heads=half", "prune.heads"),
        ("data.seq_len=long", "data.seq_len"),
        ("model.dtype=float16", "model.dtype"),
        ("tracking=maybe", "tracking"),
    ],
)
def test_wrong_type_names_the_key(override: str, key: str) -> None:
    with pytest.raises(ValueError, match=rf"invalid config .*{re.escape(key)}: "):
        load_config(QUICKSTART, [override])


@pytest.mark.parametrize("override", ["train.lr=0", "prune.heads=1.0", "data.seq_len=4", "train.max_steps=0"])
def test_out_of_range_values_error(override: str) -> None:
    with pytest.raises(ValueError, match=re.escape(override.split("=")[0])):
        load_config(QUICKSTART, [override, "prune.prune_at=never"])


# ---------------------------------------------------------------- overrides


def test_overrides_apply() -> None:
    cfg = load_config(QUICKSTART, ["output_dir=/x", "train.max_steps=3", "train.lr=1e-3", "model.init.hidden_size=64"])
    assert cfg.output_dir == "/x"
    assert cfg.train.max_steps == 3
    assert cfg.train.lr == 1e-3
    assert cfg.model.init["hidden_size"] == 64
    assert cfg.model.init["num_hidden_layers"] == 4  # the rest of the section is kept
    assert load_config(QUICKSTART).train.max_steps == 200  # the file is not changed


def test_override_can_unset_a_value() -> None:
    cfg = load_config(QUICKSTART, ["model.family=", "model.name_or_path=/models/mine"])
    assert (cfg.model.family, cfg.model.name_or_path) == (None, "/models/mine")


@pytest.mark.parametrize("bad", ["output_dir", "train.max_steps"])
def test_override_without_equals_errors(bad: str) -> None:
    with pytest.raises(ValueError, match=rf"override '{re.escape(bad)}' is not key=value"):
        load_config(QUICKSTART, [bad])


def test_override_into_a_value_errors() -> None:
    with pytest.raises(ValueError, match="'output_dir' is not a section"):
        load_config(QUICKSTART, ["output_dir.sub=1"])


# ---------------------------------------------------------------- cross-field rules


@pytest.mark.parametrize("prune_at", [5, 6])
def test_prune_at_not_before_max_steps_errors(prune_at: int) -> None:
    with pytest.raises(ValueError, match=rf"prune.prune_at={prune_at} is not before train.max_steps=5"):
        load_config(QUICKSTART, ["train.max_steps=5", f"prune.prune_at={prune_at}"])
    assert load_config(QUICKSTART, ["train.max_steps=5", "prune.prune_at=4"]).prune.prune_at == 4
    assert load_config(QUICKSTART, ["train.max_steps=5", "prune.prune_at=auto", "prune.auto_cap=4"]).prune.prune_at == "auto"


def test_negative_prune_at_errors() -> None:
    with pytest.raises(ValueError, match="prune.prune_at"):
        load_config(QUICKSTART, ["prune.prune_at=-1"])


def test_unknown_criterion_lists_the_choices() -> None:
    with pytest.raises(ValueError, match="prune.criterion: .*unknown criterion 'nope'") as err:
        load_config(QUICKSTART, ["prune.criterion=nope"])
    for name in CRITERIA:
        assert name in str(err.value)


def test_classification_without_label_field_errors() -> None:
    with pytest.raises(ValueError, match="sequence_classification: set data.label_field"):
        load_config(QUICKSTART, ["model.task=sequence_classification"])
    with pytest.raises(ValueError, match="set data.label_field"):
        load_config(BERT, ["data.label_field="])
    assert load_config(BERT).data.label_field == "label"


@pytest.mark.parametrize(
    "overrides",
    [["model.name_or_path=/models/mine"], ["model.family="]],
    ids=["both", "neither"],
)
def test_model_needs_exactly_one_source(overrides: list[str]) -> None:
    with pytest.raises(ValueError, match="set exactly one of model.name_or_path .* or model.family"):
        load_config(QUICKSTART, overrides)


# ---------------------------------------------------------------- the file itself


def test_missing_file_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_invalid_yaml_and_non_mapping_error(tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ValueError, match="is not valid YAML"):
        load_config(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="must be a mapping"):
        load_config(bad)


def test_missing_required_section_is_named(tmp_path) -> None:
    data = _minimal()
    del data["data"]
    with pytest.raises(ValueError, match=r"data: Field required"):
        load_config(_write(tmp_path, data))


def test_auto_cap_must_come_before_the_end_of_training() -> None:
    with pytest.raises(ValueError, match="prune.auto_cap=200 is not before train.max_steps=100"):
        load_config(QUICKSTART, ["train.max_steps=100", "prune.prune_at=auto", "prune.auto_cap=200"])


def test_an_override_value_that_is_not_yaml_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="override 'train.lr=\\[': the value is not valid YAML"):
        load_config(QUICKSTART, ["train.lr=["])
