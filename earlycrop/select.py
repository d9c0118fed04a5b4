"""Selection: from scores to a `Plan` of kept heads and neurons per layer.

A Plan is plain data (JSON, `earlycrop.plans`) so it can be reviewed, stored with the run, and replayed on
another process or machine. Selection knows nothing about criteria or surgery.
"""

from __future__ import annotations

from dataclasses import asdict

import torch
from torch import nn

from .families import LayerUnits, get_adapter
from .plans import Plan, SelectionConfig
from .scores import Scores


def _top(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the k best scores, ties broken by the lower index, returned sorted."""
    order = torch.sort(-scores.double().cpu(), stable=True).indices
    return sorted(order[:k].tolist())


def _round_count(count: float, multiple: int, total: int) -> int:
    """Nearest multiple of `multiple` to `count`, at least one multiple, at most `total`."""
    return min(total, max(multiple, multiple * round(count / multiple)))


def _head_units(layer: LayerUnits, head_scores: torch.Tensor, gqa: str) -> tuple[torch.Tensor, int]:
    """Scores of the selectable head units and how many query heads each stands for.

    Without GQA (one query head per key/value head) a unit is a head with its k/v; with
    `gqa: group` a unit is a whole key/value group (scored by the sum of its query heads).
    """
    g = layer.heads_per_group
    if g == 1 or gqa == "group":
        return head_scores.double().reshape(layer.num_kv_heads, g).sum(1), g
    return head_scores.double(), 1


def _kept_heads(layer: LayerUnits, head_scores: torch.Tensor, keep_units: int, gqa: str) -> tuple[list[int], list[int]]:
    """Kept query and key/value head indices for `keep_units` selectable units of this layer."""
    g = layer.heads_per_group
    if g == 1 or gqa == "group":
        groups = _top(_head_units(layer, head_scores, gqa)[0], keep_units)
        return [kv * g + i for kv in groups for i in range(g)], groups
    per_group = keep_units // layer.num_kv_heads
    grouped = head_scores.double().reshape(layer.num_kv_heads, g)
    heads = [kv * g + i for kv in range(layer.num_kv_heads) for i in _top(grouped[kv], per_group)]
    return heads, list(range(layer.num_kv_heads))


def head_unit_multiple(layer: LayerUnits, gqa: str) -> int:
    """Kept selectable head units must be a multiple of this to keep GQA groups consistent."""
    return 1 if layer.heads_per_group == 1 or gqa == "group" else layer.num_kv_heads


def selectable_head_units(layer: LayerUnits, gqa: str) -> int:
    """How many head units selection chooses from in this layer: query heads, or key/value groups
    (without GQA, or with `gqa: group`)."""
    g = layer.heads_per_group
    return layer.num_kv_heads if g == 1 or gqa == "group" else layer.num_heads


def _uniform_keep(total: int, ratio: float, multiple: int, key: str, layer: int) -> int:
    if ratio == 0:
        return total
    keep = multiple * round(total * (1.0 - ratio) / multiple)
    if keep <= 0:
        raise ValueError(
            f"{key}={ratio} would empty layer {layer} ({total} units, kept in multiples of {multiple}); "
            f"use a ratio of at most {1 - multiple / total:.4g}"
        )
    return min(keep, total)


def _check_removes_something(kind: str, ratio: float, kept: list[int], totals: list[int], multiples: list[int]) -> None:
    if ratio > 0 and sum(kept) >= sum(totals):
        # per layer, not over the whole model: a layer of U units kept in multiples of m loses one
        # multiple at the ratio m / U (half that, the model-wide m / ΣU, can still round back to U)
        smallest = min(m / t for m, t in zip(multiples, totals))
        raise ValueError(
            f"{kind}={ratio} removes nothing: counts are kept in multiples of {multiples[0]} of {max(totals)} "
            f"units per layer (GQA groups / rounding); a ratio of at least {smallest:.4g} removes some"
        )


def _global_counts(scores: list[torch.Tensor], ratio: float, multiples: list[int]) -> list[int]:
    """Per-layer kept counts from one ranking over all layers; every layer keeps at least one multiple."""
    flat = torch.cat([s.double().cpu() for s in scores])
    total = flat.numel()
    keep_total = round(total * (1.0 - ratio))
    if keep_total >= total:
        return [s.numel() for s in scores]
    keep_mask = torch.zeros(total, dtype=torch.bool)
    keep_mask[_top(flat, keep_total)] = True
    counts, start = [], 0
    for s, m in zip(scores, multiples):
        kept = int(keep_mask[start : start + s.numel()].sum())
        counts.append(_round_count(kept, m, s.numel()))
        start += s.numel()
    return counts


def _tied_units(pools: list[tuple[torch.Tensor, list[int]]]) -> int:
    """Units whose score equals the score of both a kept and a removed unit of the same ranking: among
    them the lowest indices were kept, the criterion did not decide (e.g. all-zero scores at init)."""
    tied = 0
    for scores, kept in pools:
        s = scores.double().cpu()
        mask = torch.zeros(s.numel(), dtype=torch.bool)
        mask[kept] = True
        both = set(s[mask].tolist()) & set(s[~mask].tolist())
        if both:
            tied += int(torch.isin(s, torch.tensor(sorted(both), dtype=s.dtype)).sum())
    return tied


def _ranking_pools(scores: list[torch.Tensor], kept: list[list[int]], layout: str) -> list[tuple[torch.Tensor, list[int]]]:
    """One ranking per layer (`uniform`) or one over all layers (`global`)."""
    if layout == "uniform":
        return list(zip(scores, kept))
    offsets = [0]
    for s in scores[:-1]:
        offsets.append(offsets[-1] + s.numel())
    return [(torch.cat([s.double().cpu() for s in scores]), [o + i for o, k in zip(offsets, kept) for i in k])]


def make_plan(model: nn.Module, scores: Scores, config: SelectionConfig, meta: dict | None = None) -> Plan:
    """Choose kept heads and neurons of every layer from `scores` (larger = keep).

    Ties are broken by index (the lowest is kept); `meta["ties"]` counts, per kind, the selectable units
    (query heads, or KV groups with `gqa: group`; neurons) whose score tied across the cut."""
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    _check_scores_match(layers, scores)
    narrowest = min(l.intermediate_size for l in layers)
    if config.mlp > 0 and config.round_to > narrowest:
        raise ValueError(
            f"round_to={config.round_to} is larger than a layer's {narrowest} MLP neurons; use round_to <= {narrowest}"
        )
    target = config.target_params
    if target is not None:
        ratio = _ratio_for_budget(model, scores, config)
        config = SelectionConfig(ratio, ratio, config.layout, config.round_to, config.gqa)
    head_units = [_head_units(l, s, config.gqa)[0] for l, s in zip(layers, scores.heads)]
    head_mult = [head_unit_multiple(l, config.gqa) for l in layers]
    if config.layout == "uniform":
        head_counts = [_uniform_keep(selectable_head_units(l, config.gqa), config.heads, m, "heads", i) for i, (l, m) in enumerate(zip(layers, head_mult))]
        neuron_counts = [_uniform_keep(l.intermediate_size, config.mlp, config.round_to, "mlp", i) for i, l in enumerate(layers)]
    else:
        head_counts = _global_counts(head_units, config.heads, head_mult)
        neuron_counts = _global_counts(scores.neurons, config.mlp, [config.round_to] * len(layers))
    _check_removes_something("heads", config.heads, head_counts, [selectable_head_units(l, config.gqa) for l in layers], head_mult)
    _check_removes_something("mlp", config.mlp, neuron_counts, [l.intermediate_size for l in layers], [config.round_to] * len(layers))
    heads, kv_heads, neurons, kept_units = [], [], [], []
    for layer, hs, ns, hc, nc in zip(layers, scores.heads, scores.neurons, head_counts, neuron_counts):
        q, kv = _kept_heads(layer, hs, hc, config.gqa)
        heads.append(q)
        kv_heads.append(kv)
        kept_units.append(q if selectable_head_units(layer, config.gqa) == layer.num_heads else kv)
        neurons.append(_top(ns, nc))
    ties = {
        "heads": _tied_units(_ranking_pools(head_units, kept_units, config.layout)),
        "neurons": _tied_units(_ranking_pools(scores.neurons, neurons, config.layout)),
    }
    return Plan(
        family=adapter.name,
        layout=config.layout,
        heads=heads,
        kv_heads=kv_heads,
        neurons=neurons,
        dense_heads=[l.num_heads for l in layers],
        dense_kv_heads=[l.num_kv_heads for l in layers],
        dense_neurons=[l.intermediate_size for l in layers],
        meta={"selection": {**asdict(config), "target_params": target}, "ties": ties, **(meta or {})},
    )


def _check_scores_match(layers: list[LayerUnits], scores: Scores) -> None:
    if len(scores.heads) != len(layers) or len(scores.neurons) != len(layers):
        raise ValueError(f"scores cover {len(scores.heads)} layers but the model has {len(layers)}")
    for i, (l, h, n) in enumerate(zip(layers, scores.heads, scores.neurons)):
        if h.numel() != l.num_heads or n.numel() != l.intermediate_size:
            raise ValueError(
                f"layer {i}: scores have {h.numel()} heads / {n.numel()} neurons, "
                f"the model {l.num_heads} / {l.intermediate_size}"
            )


def params_after(model: nn.Module, plan: Plan) -> int:
    """Exact parameter count of `model` once `plan` is applied, without touching the model."""
    adapter = get_adapter(model)
    removed = 0
    for layer, q, kv, n in zip(adapter.layers(model), plan.heads, plan.kv_heads, plan.neurons):
        removed += sum(s.removed_numel() for s in adapter.attention_slices(layer, q, kv))
        removed += sum(s.removed_numel() for s in adapter.mlp_slices(layer, n))
    return sum(p.numel() for p in model.parameters()) - removed


def _ratio_for_budget(model: nn.Module, scores: Scores, config: SelectionConfig) -> float:
    """Smallest ratio (same for heads and MLP) whose plan has at most `target_params` parameters."""
    target = config.target_params
    dense = sum(p.numel() for p in model.parameters())
    if dense <= target:
        return 0.0

    def size(ratio: float) -> int | None:
        try:
            plan = make_plan(model, scores, SelectionConfig(ratio, ratio, config.layout, config.round_to, config.gqa))
        except ValueError:
            return None
        return params_after(model, plan)

    lo, hi = 0.0, 0.999
    if config.layout == "uniform":
        # a uniform ratio near 1 empties every layer: the most pruned uniform plan keeps one
        # multiple (GQA group / round_to) per layer, which is the ratio 1 - multiple / total
        layers = get_adapter(model).layers(model)
        hi = min(
            min(1.0 - head_unit_multiple(l, config.gqa) / selectable_head_units(l, config.gqa), 1.0 - config.round_to / l.intermediate_size)
            for l in layers
        )
        hi = max(hi, 0.0)
    smallest = size(hi)
    if smallest is None or smallest > target:
        least = f"{smallest:,}" if smallest is not None else f"more than {target:,}"
        raise ValueError(
            f"target_params={target:,} cannot be met: the most pruned model still has {least} parameters "
            f"(dense {dense:,}; embeddings and norms are not pruned); raise target_params to at least that"
        )
    for _ in range(40):
        mid = (lo + hi) / 2
        s = size(mid)
        if s is not None and s <= target:
            hi = mid
        else:
            lo = mid
        if hi - lo < 1e-4:
            break
    return hi
