"""Build the model a run starts from: a local folder (dense or already pruned) or a family from scratch."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
)

import earlycrop

from .config import ModelConfig, read_config_json

# family name → the config class it is built from scratch with, read live from the adapter registry
CONFIG_TYPES = earlycrop.families.CONFIG_CLASSES
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
AUTO_CLASSES = {"causal_lm": AutoModelForCausalLM, "masked_lm": AutoModelForMaskedLM,
                "sequence_classification": AutoModelForSequenceClassification}
PRETRAINING_HEADS = ("ForMaskedLM", "ForCausalLM", "ForPreTraining", "LMHeadModel")
SAFETENSORS_MAX_HEADER = 100_000_000  # the largest header the safetensors library itself accepts


def check_model_folder(path: str) -> None:
    """Fail early and clearly on a model folder that cannot be loaded."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {folder} does not exist (this machine loads local folders only)")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"model folder {folder} has no config.json: save the model with save_pretrained")
    if not any(folder.glob("*.safetensors")):
        raise FileNotFoundError(f"model folder {folder} has no *.safetensors weights (only safetensors are loaded)")
    _check_architectures(folder / "config.json", read_config_json(folder / "config.json"))
    for file in sorted(folder.glob("*.safetensors")):
        _check_safetensors_header(file)


@functools.cache
def _model_types_by_class() -> dict[str, set[str]]:
    """Model class name → the `model_type`s transformers builds it for (from its auto-class tables)."""
    from transformers.models.auto import modeling_auto

    types: dict[str, set[str]] = {}
    for name in dir(modeling_auto):
        table = getattr(modeling_auto, name)
        if name.endswith("_MAPPING_NAMES") and isinstance(table, dict):
            for model_type, classes in table.items():
                for cls in classes if isinstance(classes, (tuple, list)) else (classes,):
                    types.setdefault(cls, set()).add(model_type)
    return types


def _check_architectures(path: Path, config: dict) -> None:
    """A Qwen2 class under a Llama `model_type` loads the wrong model and then blames the weights: name the conflict."""
    model_type, archs = config.get("model_type"), config.get("architectures") or []
    known = _model_types_by_class()
    if model_type and any(arch in known and model_type not in known[arch] for arch in archs):
        raise ValueError(f"{path} says model_type {model_type} but architectures {archs}: fix one of them")


def _check_safetensors_header(file: Path) -> None:
    """The 8-byte header length, the JSON header and the data size it declares, read without loading tensors."""
    size = file.stat().st_size
    with file.open("rb") as fh:
        length = int.from_bytes(fh.read(8), "little") if size >= 8 else -1
        raw = fh.read(length) if 0 < length <= min(size - 8, SAFETENSORS_MAX_HEADER) else b""
    try:
        header = json.loads(raw) if raw else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        header = None
    tensors = [v for k, v in header.items() if k != "__metadata__"] if isinstance(header, dict) else [None]
    ends = [v["data_offsets"][1] for v in tensors if isinstance(v, dict) and len(v.get("data_offsets") or ()) == 2]
    if len(ends) != len(tensors) or 8 + length + max(ends, default=0) != size:
        raise ValueError(f"{file} is truncated or not a safetensors file: re-save the model")


def build_model(cfg: ModelConfig, vocab_size: int, pad_token_id: int | None, seed: int, *,
                eos_token_id: int | None = None, bos_token_id: int | None = None) -> PreTrainedModel:
    """The starting model, identical on every rank (seeded); a model built from scratch takes the
    tokenizer's special-token ids, so its saved config generates and pools with the right tokens."""
    torch.manual_seed(seed)
    dtype = DTYPES[cfg.dtype]
    if cfg.name_or_path is not None:
        check_model_folder(cfg.name_or_path)
        model = earlycrop.from_pretrained(cfg.name_or_path, dtype=dtype, attn_implementation=cfg.attn_implementation)
        if cfg.task == "sequence_classification" and not type(model).__name__.endswith("SequenceClassification"):
            model = _reload_for_classification(cfg, model)
        return model.train()
    config_cls = CONFIG_TYPES[cfg.family]
    kwargs = dict(cfg.init)
    kwargs.setdefault("vocab_size", vocab_size)
    for key, value in (("pad_token_id", pad_token_id), ("eos_token_id", eos_token_id), ("bos_token_id", bos_token_id)):
        if value is not None:
            kwargs.setdefault(key, value)
    if cfg.task == "sequence_classification":
        kwargs["num_labels"] = cfg.num_labels
    config = config_cls(**kwargs)
    if config.vocab_size < vocab_size:
        raise ValueError(f"model.init.vocab_size={config.vocab_size} is smaller than the tokenizer's {vocab_size}")
    config._attn_implementation = cfg.attn_implementation
    model = AUTO_CLASSES[cfg.task].from_config(config, dtype=dtype)
    return model.train()


def _reload_for_classification(cfg: ModelConfig, model: PreTrainedModel) -> PreTrainedModel:
    """A pretrained encoder with a NEW, randomly initialised classification head."""
    if not earlycrop.plain_loadable(model):
        raise ValueError("attaching a classification head to a head-pruned BERT/GPT-2 folder is not supported; prune after loading")
    return AutoModelForSequenceClassification.from_pretrained(
        cfg.name_or_path, num_labels=cfg.num_labels, dtype=DTYPES[cfg.dtype],
        attn_implementation=cfg.attn_implementation, trust_remote_code=False,
    )


def new_parameter_names(model: PreTrainedModel, folder: str) -> set[str]:
    """Parameters of `model` that the checkpoint in `folder` does not hold: a newly attached task head."""
    from safetensors import safe_open

    saved: set[str] = set()
    for file in Path(folder).glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            saved.update(f.keys())
    prefix = model.base_model_prefix + "."
    # a checkpoint of the bare encoder stores its keys without the task model's prefix
    return {n for n, _ in model.named_parameters() if n not in saved and n.removeprefix(prefix) not in saved}


def _architectures(folder: str) -> list[str]:
    from transformers import AutoConfig

    return getattr(AutoConfig.from_pretrained(folder, trust_remote_code=False), "architectures", None) or []


def has_pretraining_head(folder: str) -> bool:
    """Whether the folder's own model class ends in a pre-training head (masked or causal LM)."""
    return any(name.endswith(PRETRAINING_HEADS) for name in _architectures(folder))


def saved_as_classifier(folder: str) -> bool:
    """Whether the folder already holds a sequence-classification head (fine-tuning it attaches nothing new)."""
    return any(name.endswith("ForSequenceClassification") for name in _architectures(folder))


def load_pretraining_model(folder: str, cfg: ModelConfig) -> PreTrainedModel:
    """The checkpoint with its own pre-training head, to score a model that got a new task head."""
    if not has_pretraining_head(folder):
        raise ValueError(f"prune.objective=pretraining: {folder} was not saved with a pre-training head "
                         "(masked or causal LM); use prune.objective=task")
    return earlycrop.from_pretrained(folder, dtype=DTYPES[cfg.dtype], attn_implementation=cfg.attn_implementation).eval()


def load_model_tokenizer(path: str):
    """The tokenizer saved in a model folder, or None when the folder has none."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"folder {folder} does not exist (model and tokenizer folders must be local: this machine is offline)")
    if any((folder / name).exists() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
        try:
            return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
        except (OSError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ValueError(f"the tokenizer in {folder} cannot be loaded ({first}); re-save it with save_pretrained") from exc
    return None
