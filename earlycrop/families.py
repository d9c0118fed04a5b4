"""One adapter per Hugging Face model family, found through a registry keyed on the config type.

An adapter tells the rest of the library three things about a family, and nothing else:
where the structural units of each layer live (`LayerUnits`), which weight slices belong to a
unit (`attention_slices`, `mlp_slices`), and how the family's config describes a pruned shape
(`describe_layout`). Gates, criteria, selection and surgery are written once on top of this.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import nn
from transformers import BertConfig, GPT2Config, LlamaConfig, MistralConfig, PretrainedConfig, Qwen2Config
from transformers.pytorch_utils import Conv1D


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


class FamilyAdapter(ABC):
    """What the library needs to know about one model family."""

    name: str
    config_types: tuple[type[PretrainedConfig], ...]

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


class LlamaLikeAdapter(FamilyAdapter):
    """Llama, Qwen2 and Mistral: separate q/k/v/o projections, GQA, gated (SwiGLU) MLP."""

    name = "llama"
    config_types = (LlamaConfig,)

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


class Qwen2Adapter(LlamaLikeAdapter):
    name = "qwen2"
    config_types = (Qwen2Config,)


class MistralAdapter(LlamaLikeAdapter):
    name = "mistral"
    config_types = (MistralConfig,)


class GPT2Adapter(FamilyAdapter):
    """GPT-2: fused `c_attn` Conv1D holding q, k and v side by side; head size is hidden / heads."""

    name = "gpt2"
    config_types = (GPT2Config,)

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


class BertAdapter(FamilyAdapter):
    """BERT encoders, with or without a task head; head size is hidden / heads."""

    name = "bert"
    config_types = (BertConfig,)

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


ADAPTERS: dict[type[PretrainedConfig], FamilyAdapter] = {}


def register_adapter(adapter: FamilyAdapter) -> FamilyAdapter:
    """Make `adapter` the one used for models whose config is one of `adapter.config_types`."""
    for config_type in adapter.config_types:
        ADAPTERS[config_type] = adapter
    return adapter


for _adapter in (LlamaLikeAdapter(), Qwen2Adapter(), MistralAdapter(), GPT2Adapter(), BertAdapter()):
    register_adapter(_adapter)


def supported_families() -> list[str]:
    return sorted({a.name for a in ADAPTERS.values()})


def get_adapter(model_or_config: nn.Module | PretrainedConfig) -> FamilyAdapter:
    """The adapter for a model (or its config); exact config type first, then its base classes."""
    config = getattr(model_or_config, "config", model_or_config)
    for config_type in type(config).__mro__:
        if config_type in ADAPTERS:
            return ADAPTERS[config_type]
    raise ValueError(
        f"unsupported model family {type(config).__name__!r} (model_type={getattr(config, 'model_type', None)!r}); "
        f"supported families: {', '.join(supported_families())}"
    )
