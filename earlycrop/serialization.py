"""Save and load pruned models.

Every pruned model saves with `save_pretrained` (safetensors) and records its per-layer layout
in `config.json`. Where the family's config can describe the pruned shape (Llama-style models
with a uniform layout; GPT-2 / BERT when only MLP widths changed uniformly) plain
`AutoModel….from_pretrained` loads the folder; `earlycrop.from_pretrained` loads all of them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, PreTrainedModel

from .families import architecture_class
from .surgery import LAYOUT_KEY, prune, shape_plan


def plain_loadable(model_or_config) -> bool:
    """Whether plain transformers `from_pretrained` rebuilds this (possibly pruned) model."""
    config = getattr(model_or_config, "config", model_or_config)
    layout = getattr(config, LAYOUT_KEY, None)
    return layout is None or bool(layout.get("plain_loadable"))


def save_pretrained(model: PreTrainedModel, out_dir: str | Path, tokenizer=None) -> Path:
    """`model.save_pretrained` (safetensors) plus the tokenizer, if given."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def safetensors_files(path: Path) -> list[Path]:
    """The weight files of a model folder: the shards its index names, or its one model.safetensors."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        return [path / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    if (path / "model.safetensors").exists():
        return [path / "model.safetensors"]
    raise FileNotFoundError(f"{path} holds no model.safetensors (earlycrop loads safetensors weights only)")


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for file in safetensors_files(path):
        state.update(load_file(file))
    return state


def from_pretrained(path: str | Path, *, dtype: torch.dtype | None = None, **kwargs) -> PreTrainedModel:
    """Load any model saved by earlycrop (or a plain HF folder) back to the identical model.

    `kwargs` go to `from_pretrained` for plainly loadable folders (e.g. `attn_implementation`).
    Remote code is never run.
    """
    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} is not a model folder: config.json is missing")
    if not any(path.glob("*.safetensors")):
        raise FileNotFoundError(
            f"{path} holds no *.safetensors weights: earlycrop loads safetensors only, never pickled "
            "pytorch_model.bin; convert the weights once with safetensors.torch.save_file"
        )
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{path / 'config.json'} cannot be read ({first}); re-save the model with save_pretrained") from exc
    cls = architecture_class(config)
    if plain_loadable(config):
        # transformers only logs missing / mis-shaped weights and initialises them at random: ask, then refuse
        model, info = cls.from_pretrained(path, dtype=dtype, trust_remote_code=False, use_safetensors=True,
                                          output_loading_info=True, ignore_mismatched_sizes=True, **kwargs)
        _check_loaded(path, set(model.state_dict()), info["missing_keys"], info["unexpected_keys"],
                      [(k, tuple(saved), tuple(wanted)) for k, saved, wanted in info["mismatched_keys"]])
        return model
    if "attn_implementation" in kwargs:
        config._attn_implementation = kwargs.pop("attn_implementation")
    layout = getattr(config, LAYOUT_KEY)
    # like plain `from_pretrained`: the saved dtype unless one is asked for, set BEFORE loading
    # the weights so that float64 / bfloat16 values are not rounded through float32
    if dtype is None or dtype == "auto":
        dtype = getattr(config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    model = cls(config)
    prune(model, shape_plan(model, layout))
    if dtype is not None:
        model.to(dtype)
    _load_weights(model, _read_state_dict(path), path)
    model.eval()
    return model


def _load_weights(model: nn.Module, state: dict[str, torch.Tensor], path: Path | None = None) -> None:
    own = model.state_dict()
    mismatched = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in state.items() if k in own and own[k].shape != v.shape]
    _check_loaded(path, set(own), [], [], mismatched)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set((getattr(model, "_tied_weights_keys", None) or {}))
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ValueError(f"{path or 'the'} weights do not match the saved layout: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()


def _check_loaded(path: Path | None, model_keys: set[str], missing: list[str], unexpected: list[str],
                  mismatched: list[tuple[str, tuple, tuple]]) -> None:
    """Refuse weights that do not belong to config.json: wrong shapes, missing tensors, or tensors of
    layers / units the config does not have (unexpected keys of any other kind, e.g. a pre-training head
    the loaded class lacks, are left to transformers, which ignores them)."""
    where = "the weights" if path is None else path / ("model.safetensors" if (path / "model.safetensors").exists() else "*.safetensors")
    if mismatched:
        key, saved, wanted = mismatched[0]
        raise ValueError(
            f"{where}: {key} has shape {list(saved)} but config.json implies {list(wanted)} "
            f"({len(mismatched)} mismatched tensors); weights and config.json must come from the same save_pretrained"
        )
    layer_keys = {re.sub(r"\.\d+\.", ".#.", k) for k in model_keys}
    extra = [k for k in unexpected if re.sub(r"\.\d+\.", ".#.", k) in layer_keys]
    if missing or extra:
        what = [f"{len(missing)} tensors missing (e.g. {sorted(missing)[0]})"] if missing else []
        what += [f"{len(extra)} tensors of layers config.json does not have (e.g. {sorted(extra)[0]})"] if extra else []
        raise ValueError(
            f"{where} does not match config.json: {', '.join(what)}; "
            "weights and config.json must come from the same save_pretrained"
        )
