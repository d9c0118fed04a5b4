"""One adapter per Hugging Face model family: the one registry of what the library knows about a family.

An adapter tells the rest of the library where the structural units of each layer live (`LayerUnits`),
which weight slices belong to a unit (`attention_slices`, `mlp_slices`), how the family's config
describes a pruned shape (`describe_layout`), the memory model's facts (`shape_facts`), and what the
run pipeline validates and builds (`config_types`, `tasks`). Gates, criteria, selection, surgery, the
memory model and the pipeline are written once on top of this; adding a family is one adapter class
decorated with `@register_adapter`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import ClassVar, TypeVar

import torch
import transformers
from torch import nn
from transformers import (
    BertConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
)
from transformers.pytorch_utils import Conv1D

# the run pipeline's `model.task` values; an adapter's `tasks` is a subset
TASKS = ("causal_lm", "masked_lm", "sequence_classification")


@dataclass
class LayerUnits:
    """The modules of one transformer layer that hold prunable units.

    `head_out` is the projection whose input is the concatenation of the heads' outputs, and
    `mlp_out` the projection whose input is the intermediate activations: gating their inputs
    scales exactly one unit each, whatever the family computes before them.
    """

    attention: nn.Module
    head_out: nn.Module
    mlp: nn.Module
    mlp_out: nn.Module
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads


@dataclass(frozen=True)
class ParamSlice:
    """Keep `index` along `dim` of `module.<name>`; the unit of surgery and of parameter counting."""

    module: nn.Module
    name: str
    dim: int
    index: torch.Tensor

    @property
    def parameter(self) -> nn.Parameter:
        return getattr(self.module, self.name)

    def removed_numel(self) -> int:
        p = self.parameter
        return p.numel() - p.numel() // p.shape[self.dim] * len(self.index)


def _rows(width: int, units: list[int], offset: int = 0) -> torch.Tensor:
    """Indices of `width`-wide blocks `units` (e.g. the q rows of some heads), shifted by `offset`."""
    idx = [offset + u * width + i for u in units for i in range(width)]
    return torch.tensor(idx, dtype=torch.long)


def _linear_slices(linear: nn.Module, out_index: torch.Tensor | None, in_index: torch.Tensor | None) -> list[ParamSlice]:
    """Slices of an `nn.Linear` (weight [out, in]) or GPT-2 `Conv1D` (weight [in, out]) and its bias."""
    out_dim, in_dim = (1, 0) if isinstance(linear, Conv1D) else (0, 1)
    slices = []
    if out_index is not None:
        slices.append(ParamSlice(linear, "weight", out_dim, out_index))
        if getattr(linear, "bias", None) is not None:
            slices.append(ParamSlice(linear, "bias", 0, out_index))
    if in_index is not None:
        slices.append(ParamSlice(linear, "weight", in_dim, in_index))
    return slices


def _positive(p: float | None) -> bool:
    return bool(p) and p > 0


class FamilyAdapter(ABC):
    """What the library needs to know about one model family.

    `name` is the family's `model.family` in a run config; `config_types` the transformers configs
    whose models it handles, the first one being the class a model is built from scratch with;
    `tasks` the run pipeline's `model.task` values its transformers classes provide; `grouped_kv`
    whether it can keep fewer key/value heads than query heads (GQA).
    """

    name: ClassVar[str]
    config_types: ClassVar[tuple[type[PretrainedConfig], ...]]
    tasks: ClassVar[tuple[str, ...]] = ("causal_lm", "sequence_classification")
    grouped_kv: ClassVar[bool] = True

    @property
    def config_class(self) -> type[PretrainedConfig]:
        """The config class a model of this family is built from scratch with."""
        return self.config_types[0]

    @abstractmethod
    def shape_facts(self, model: nn.Module, config: PretrainedConfig) -> dict:
        """The `earlycrop.memory.ModelShape` fields the layers do not give (norm kind, positions, activation,
        dropout, ...); `head_transform_if_lm=True` when the family's LM heads put dense + activation + norm
        before the decoder."""

    @abstractmethod
    def layers(self, model: nn.Module) -> list[LayerUnits]:
        """Per-layer units, read from the modules (so already-pruned models report their real sizes)."""

    @abstractmethod
    def attention_slices(self, layer: LayerUnits, keep_heads: list[int], keep_kv_heads: list[int]) -> list[ParamSlice]:
        """Weight slices that keep query heads `keep_heads` and key/value heads `keep_kv_heads`."""

    @abstractmethod
    def mlp_slices(self, layer: LayerUnits, keep: list[int]) -> list[ParamSlice]:
        """Weight slices that keep intermediate neurons `keep`."""

    @abstractmethod
    def set_attention_shape(self, layer: LayerUnits, num_heads: int, num_kv_heads: int) -> None:
        """Update the attention module's own bookkeeping (head counts, split sizes) after surgery."""

    @abstractmethod
    def describe_layout(self, config: PretrainedConfig, heads: list[int], kv_heads: list[int], neurons: list[int]) -> bool:
        """Write the pruned shape into `config` where the family can express it; True when plain
        `from_pretrained` then rebuilds exactly this shape."""

    def prunable_weights(self, model: nn.Module) -> list[nn.Parameter]:
        """θ of the criterion: every Linear / Conv1D weight of the attention and MLP blocks."""
        weights: list[nn.Parameter] = []
        for block in self.blocks(model):
            for module in block.modules():
                if isinstance(module, (nn.Linear, Conv1D)):
                    weights.append(module.weight)
        return weights

    @abstractmethod
    def blocks(self, model: nn.Module) -> list[nn.Module]:
        """The transformer layers, in order."""


def sync_linear_features(module: nn.Module) -> None:
    """Keep `in_features`/`out_features` (Linear) or `nf` (Conv1D) in step with the sliced weight."""
    if isinstance(module, Conv1D):
        module.nf = module.weight.shape[1]
    elif isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape


_BY_CONFIG: dict[type[PretrainedConfig], FamilyAdapter] = {}
_BY_NAME: dict[str, FamilyAdapter] = {}
# family name → adapter, in registration order (read-only: register with `register_adapter`)
FAMILIES: Mapping[str, FamilyAdapter] = MappingProxyType(_BY_NAME)


class _ConfigClasses(Mapping[str, type[PretrainedConfig]]):
    """Family name → config class built from scratch, read from the registry on every access."""

    def __getitem__(self, name: str) -> type[PretrainedConfig]:
        return _BY_NAME[name].config_class

    def __iter__(self) -> Iterator[str]:
        return iter(_BY_NAME)

    def __len__(self) -> int:
        return len(_BY_NAME)


CONFIG_CLASSES: Mapping[str, type[PretrainedConfig]] = _ConfigClasses()

A = TypeVar("A", bound=FamilyAdapter | type[FamilyAdapter])


def _check_adapter(adapter: FamilyAdapter) -> None:
    """Refuse an adapter the registry could not serve consistently (one family per config type)."""
    name, types = getattr(adapter, "name", None), getattr(adapter, "config_types", ())
    if not isinstance(name, str) or not name:
        raise ValueError(f"{type(adapter).__name__}.name must be a non-empty family name")
    if not types or not all(isinstance(t, type) and issubclass(t, PretrainedConfig) for t in types):
        raise ValueError(f"{type(adapter).__name__}.config_types must be transformers config classes")
    unknown = sorted(set(adapter.tasks) - set(TASKS))
    if unknown:
        raise ValueError(f"{type(adapter).__name__}.tasks: unknown task {unknown[0]!r}; tasks are {', '.join(TASKS)}")
    for config_type in types:
        owner = _BY_CONFIG.get(config_type)
        if owner is not None and owner.name != name:
            raise ValueError(
                f"{config_type.__name__} already belongs to family {owner.name!r}; unregister_adapter({owner.name!r}) first"
            )


def register_adapter(adapter: A) -> A:
    """Register a family: an adapter instance, or (as a class decorator) an adapter class, instantiated once.
    Models whose config is one of `config_types` then use it, and `name` becomes a valid `model.family`;
    registering a name again replaces that family's adapter."""
    instance = adapter() if isinstance(adapter, type) else adapter
    _check_adapter(instance)
    old = _BY_NAME.get(instance.name)
    for config_type in old.config_types if old is not None else ():
        del _BY_CONFIG[config_type]
    _BY_NAME[instance.name] = instance
    for config_type in instance.config_types:
        _BY_CONFIG[config_type] = instance
    return adapter


def unregister_adapter(name: str) -> FamilyAdapter:
    """Remove a family from the registry (e.g. one a test registered) and return its adapter."""
    adapter = family_adapter(name)
    del _BY_NAME[name]
    for config_type in adapter.config_types:
        del _BY_CONFIG[config_type]
    return adapter


@register_adapter
class LlamaLikeAdapter(FamilyAdapter):
    """Llama, Qwen2 and Mistral: separate q/k/v/o projections, GQA, gated (SwiGLU) MLP."""

    name = "llama"
    config_types = (LlamaConfig,)

    def shape_facts(self, model, config):
        return dict(
            norm="rms",
            final_norm=True,
            rotary=True,
            activation=config.hidden_act,
            softmax_fp32=True,
            attention_dropout=_positive(getattr(config, "attention_dropout", 0.0)),
        )

    def _decoder(self, model: nn.Module) -> nn.Module:
        return model.model if hasattr(model, "model") else model

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return list(self._decoder(model).layers)

    def layers(self, model: nn.Module) -> list[LayerUnits]:
        out = []
        for block in self.blocks(model):
            attn, mlp = block.self_attn, block.mlp
            head_dim = attn.head_dim
            out.append(
                LayerUnits(
                    attention=attn,
                    head_out=attn.o_proj,
                    mlp=mlp,
                    mlp_out=mlp.down_proj,
                    num_heads=attn.q_proj.weight.shape[0] // head_dim,
                    num_kv_heads=attn.k_proj.weight.shape[0] // head_dim,
                    head_dim=head_dim,
                    intermediate_size=mlp.down_proj.weight.shape[1],
                )
            )
        return out

    def attention_slices(self, layer, keep_heads, keep_kv_heads):
        attn, d = layer.attention, layer.head_dim
        q, kv = _rows(d, keep_heads), _rows(d, keep_kv_heads)
        return (
            _linear_slices(attn.q_proj, q, None)
            + _linear_slices(attn.k_proj, kv, None)
            + _linear_slices(attn.v_proj, kv, None)
            + _linear_slices(attn.o_proj, None, q)
        )

    def mlp_slices(self, layer, keep):
        mlp = layer.mlp
        idx = torch.tensor(keep, dtype=torch.long)
        return (
            _linear_slices(mlp.gate_proj, idx, None)
            + _linear_slices(mlp.up_proj, idx, None)
            + _linear_slices(mlp.down_proj, None, idx)
        )

    def set_attention_shape(self, layer, num_heads, num_kv_heads):
        layer.attention.num_key_value_groups = num_heads // num_kv_heads

    def describe_layout(self, config, heads, kv_heads, neurons):
        uniform = len(set(heads)) == 1 and len(set(kv_heads)) == 1 and len(set(neurons)) == 1
        # transformers refuses to save a config whose head count does not divide hidden_size
        uniform = uniform and config.hidden_size % heads[0] == 0
        # head_dim is explicit in these configs; writing it makes the head cut describable
        config.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        if uniform:
            config.num_attention_heads = heads[0]
            config.num_key_value_heads = kv_heads[0]
            config.intermediate_size = neurons[0]
        return uniform


@register_adapter
class Qwen2Adapter(LlamaLikeAdapter):
    name = "qwen2"
    config_types = (Qwen2Config,)


@register_adapter
class MistralAdapter(LlamaLikeAdapter):
    name = "mistral"
    config_types = (MistralConfig,)


@register_adapter
class GPT2Adapter(FamilyAdapter):
    """GPT-2: fused `c_attn` Conv1D holding q, k and v side by side; head size is hidden / heads."""

    name = "gpt2"
    config_types = (GPT2Config,)
    grouped_kv = False

    def shape_facts(self, model, config):
        return dict(
            norm="layer",
            final_norm=True,
            rotary=False,
            position_embeddings=config.n_positions,
            activation=config.activation_function,
            softmax_fp32=False,
            attention_dropout=_positive(config.attn_pdrop),
            hidden_dropout=_positive(config.resid_pdrop),
            embedding_dropout=_positive(config.embd_pdrop),
        )

    def blocks(self, model):
        return list((model.transformer if hasattr(model, "transformer") else model).h)

    def layers(self, model):
        out = []
        for block in self.blocks(model):
            attn, mlp = block.attn, block.mlp
            out.append(
                LayerUnits(
                    attention=attn,
                    head_out=attn.c_proj,
                    mlp=mlp,
                    mlp_out=mlp.c_proj,
                    num_heads=attn.split_size // attn.head_dim,
                    num_kv_heads=attn.split_size // attn.head_dim,
                    head_dim=attn.head_dim,
                    intermediate_size=mlp.c_proj.weight.shape[0],
                )
            )
        return out

    def attention_slices(self, layer, keep_heads, keep_kv_heads):
        if keep_heads != keep_kv_heads:
            raise ValueError("GPT-2 has one key/value head per query head: keep the same heads for both")
        attn, d, width = layer.attention, layer.head_dim, layer.attention.split_size
        fused = torch.cat([_rows(d, keep_heads, offset=k * width) for k in range(3)])
        return _linear_slices(attn.c_attn, fused, None) + _linear_slices(attn.c_proj, None, _rows(d, keep_heads))

    def mlp_slices(self, layer, keep):
        mlp = layer.mlp
        idx = torch.tensor(keep, dtype=torch.long)
        return _linear_slices(mlp.c_fc, idx, None) + _linear_slices(mlp.c_proj, None, idx)

    def set_attention_shape(self, layer, num_heads, num_kv_heads):
        attn = layer.attention
        attn.num_heads = num_heads
        attn.split_size = num_heads * attn.head_dim

    def describe_layout(self, config, heads, kv_heads, neurons):
        dense_heads = config.n_head
        if len(set(neurons)) == 1:
            config.n_inner = neurons[0]
        # head size derives from n_embd / n_head: no config value describes a head cut
        return all(h == dense_heads for h in heads) and len(set(neurons)) == 1


@register_adapter
class BertAdapter(FamilyAdapter):
    """BERT encoders, with or without a task head; head size is hidden / heads."""

    name = "bert"
    config_types = (BertConfig,)
    tasks = TASKS
    grouped_kv = False

    def shape_facts(self, model, config):
        classifier_p = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        return dict(
            norm="layer",
            final_norm=False,
            embedding_norm=True,
            rotary=False,
            position_embeddings=config.max_position_embeddings,
            token_type_embeddings=config.type_vocab_size,
            activation=config.hidden_act,
            softmax_fp32=False,
            attention_dropout=_positive(config.attention_probs_dropout_prob),
            hidden_dropout=_positive(config.hidden_dropout_prob),
            embedding_dropout=_positive(config.hidden_dropout_prob),
            classifier_dropout=_positive(classifier_p),
            pooler=getattr(model.base_model, "pooler", None) is not None,
            head_transform_if_lm=True,  # BERT's LM heads (MLM, causal): dense + act + LayerNorm before the decoder
        )

    def blocks(self, model):
        encoder = model.bert.encoder if hasattr(model, "bert") else model.encoder
        return list(encoder.layer)

    def layers(self, model):
        out = []
        for block in self.blocks(model):
            self_attn = block.attention.self
            d = self_attn.attention_head_size
            heads = self_attn.query.weight.shape[0] // d
            out.append(
                LayerUnits(
                    attention=self_attn,
                    head_out=block.attention.output.dense,
                    mlp=block,
                    mlp_out=block.output.dense,
                    num_heads=heads,
                    num_kv_heads=heads,
                    head_dim=d,
                    intermediate_size=block.output.dense.weight.shape[1],
                )
            )
        return out

    def attention_slices(self, layer, keep_heads, keep_kv_heads):
        if keep_heads != keep_kv_heads:
            raise ValueError("BERT has one key/value head per query head: keep the same heads for both")
        a, rows = layer.attention, _rows(layer.head_dim, keep_heads)
        return (
            _linear_slices(a.query, rows, None)
            + _linear_slices(a.key, rows, None)
            + _linear_slices(a.value, rows, None)
            + _linear_slices(layer.head_out, None, rows)
        )

    def mlp_slices(self, layer, keep):
        block = layer.mlp
        idx = torch.tensor(keep, dtype=torch.long)
        return _linear_slices(block.intermediate.dense, idx, None) + _linear_slices(block.output.dense, None, idx)

    def set_attention_shape(self, layer, num_heads, num_kv_heads):
        a = layer.attention
        a.num_attention_heads = num_heads
        a.all_head_size = num_heads * a.attention_head_size

    def describe_layout(self, config, heads, kv_heads, neurons):
        if len(set(neurons)) == 1:
            config.intermediate_size = neurons[0]
        return all(h == config.num_attention_heads for h in heads) and len(set(neurons)) == 1


def supported_families() -> list[str]:
    """The registered family names, sorted."""
    return sorted(_BY_NAME)


def family_adapter(name: str) -> FamilyAdapter:
    """The adapter registered under a family name (a run config's `model.family`)."""
    if name not in _BY_NAME:
        raise ValueError(f"unknown model family {name!r}; supported families: {', '.join(supported_families())}")
    return _BY_NAME[name]


def get_adapter(model_or_config: nn.Module | PretrainedConfig) -> FamilyAdapter:
    """The adapter for a model (or its config); exact config type first, then its base classes."""
    config = getattr(model_or_config, "config", model_or_config)
    for config_type in type(config).__mro__:
        if config_type in _BY_CONFIG:
            return _BY_CONFIG[config_type]
    raise ValueError(
        f"unsupported model family {type(config).__name__!r} (model_type={getattr(config, 'model_type', None)!r}); "
        f"supported families: {', '.join(supported_families())}"
    )


def architecture_class(config: PretrainedConfig) -> type[PreTrainedModel]:
    """The transformers model class `config.architectures` names (what `save_pretrained` wrote), so a saved
    folder is rebuilt with its own head."""
    archs = getattr(config, "architectures", None) or []
    for name in archs:
        cls = getattr(transformers, name, None)
        if isinstance(cls, type) and issubclass(cls, PreTrainedModel):
            return cls
    raise ValueError(f"config.json names no transformers model class (architectures={archs!r})")
