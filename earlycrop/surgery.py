"""Surgery: physically remove the heads and neurons a Plan drops.

Weights, biases, module bookkeeping, the model config and (optionally) the optimizer state are
changed in one call, so a pruned model is never half-described. Pruned parameters are replaced by new ones; an optimizer passed to `prune` is re-pointed at them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .families import FamilyAdapter, LayerUnits, ParamSlice, get_adapter, sync_linear_features
from .plans import Plan

LAYOUT_KEY = "earlycrop_layout"


@dataclass
class PruneResult:
    params_before: int
    params_after: int
    plain_loadable: bool


def _validate(plan: Plan, layers: list[LayerUnits], adapter: FamilyAdapter) -> None:
    if plan.family != adapter.name:
        raise ValueError(f"the plan was made for a {plan.family!r} model, this is a {adapter.name!r} model")
    if plan.num_layers != len(layers):
        raise ValueError(f"the plan has {plan.num_layers} layers, the model {len(layers)}")
    for i, (layer, q, kv, n) in enumerate(zip(layers, plan.heads, plan.kv_heads, plan.neurons)):
        for kind, kept, total in (("heads", q, layer.num_heads), ("kv_heads", kv, layer.num_kv_heads), ("neurons", n, layer.intermediate_size)):
            if not kept:
                raise ValueError(f"layer {i}: the plan keeps no {kind}")
            if sorted(set(kept)) != list(kept) or kept[0] < 0 or kept[-1] >= total:
                raise ValueError(f"layer {i}: {kind} indices must be sorted, unique and below {total}")
        g = layer.heads_per_group
        per_group = [sum(1 for h in q if h // g == group) for group in kv]
        if sum(per_group) != len(q) or len(set(per_group)) != 1:
            raise ValueError(
                f"layer {i}: kept query heads {q} are not spread evenly over kept key/value heads {kv} "
                f"({g} query heads per group): GQA would break"
            )


def _apply_slice(s: ParamSlice, optimizer: torch.optim.Optimizer | None) -> None:
    """Swap in a new, smaller Parameter (resizing `.data` in place breaks autograd nodes that
    DDP and earlier graphs keep for the old shape); the optimizer is re-pointed and its state sliced."""
    old = s.parameter
    index = s.index.to(old.device)
    new = nn.Parameter(old.detach().index_select(s.dim, index).clone(), requires_grad=old.requires_grad)
    if old.grad is not None:
        new.grad = old.grad.index_select(s.dim, index).clone()
    setattr(s.module, s.name, new)
    if optimizer is None:
        return
    for group in optimizer.param_groups:
        group["params"] = [new if p is old else p for p in group["params"]]
    if old in optimizer.state:
        state = optimizer.state.pop(old)
        for key, value in state.items():
            if torch.is_tensor(value) and value.shape == old.shape:
                state[key] = value.index_select(s.dim, index.to(value.device)).clone()
        optimizer.state[new] = state


def prune(model: nn.Module, plan: Plan, optimizer: torch.optim.Optimizer | None = None) -> PruneResult:
    """Remove every head and neuron `plan` does not keep; update the config in the same call.

    With `optimizer`, its per-parameter state (e.g. Adam moments) is sliced with the same indices,
    so training continues exactly as if the model had been built at the pruned size.
    """
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    _validate(plan, layers, adapter)
    before = sum(p.numel() for p in model.parameters())
    for layer, q, kv, n in zip(layers, plan.heads, plan.kv_heads, plan.neurons):
        slices = adapter.attention_slices(layer, q, kv) + adapter.mlp_slices(layer, n)
        for s in slices:
            _apply_slice(s, optimizer)
        for module in {id(s.module): s.module for s in slices}.values():
            sync_linear_features(module)
        adapter.set_attention_shape(layer, len(q), len(kv))
    counts = plan.counts()
    plain = adapter.describe_layout(model.config, counts["heads"], counts["kv_heads"], counts["neurons"])
    setattr(model.config, LAYOUT_KEY, {**counts, "plain_loadable": plain})
    return PruneResult(before, sum(p.numel() for p in model.parameters()), plain)


def shape_plan(model: nn.Module, counts: dict[str, list[int]]) -> Plan:
    """A plan that keeps the first `counts` units of every layer: rebuilds a pruned shape to load weights into."""
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    heads, kv_heads = [], []
    for layer, nq, nkv in zip(layers, counts["heads"], counts["kv_heads"]):
        g = layer.heads_per_group
        kept_groups = list(range(nkv))
        heads.append([kv * g + i for kv in kept_groups for i in range(nq // nkv)])
        kv_heads.append(kept_groups)
    return Plan(
        family=adapter.name,
        layout="replay",
        heads=heads,
        kv_heads=kv_heads,
        neurons=[list(range(n)) for n in counts["neurons"]],
        dense_heads=[l.num_heads for l in layers],
        dense_kv_heads=[l.num_kv_heads for l in layers],
        dense_neurons=[l.intermediate_size for l in layers],
    )
