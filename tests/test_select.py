"""Selection (Plan) and its error cases, and the plan checks surgery and loading make."""

from __future__ import annotations

import json

import pytest
import torch

import earlycrop
from earlycrop import Plan, Scores, SelectionConfig, make_plan, params_after, prune
from earlycrop.select import head_unit_multiple, selectable_head_units
from tests.tiny_models import FAMILIES, batches, build

torch.set_num_threads(1)

LLAMA_LIKE = ["llama", "qwen2", "mistral"]


def random_scores(model, seed: int = 0) -> Scores:
    gen = torch.Generator().manual_seed(seed)
    layers = earlycrop.get_adapter(model).layers(model)
    return Scores(
        heads=[torch.rand(l.num_heads, generator=gen) for l in layers],
        neurons=[torch.rand(l.intermediate_size, generator=gen) for l in layers],
    )


def removed(kept: list[int], total: int) -> list[int]:
    return sorted(set(range(total)) - set(kept))


# --------------------------------------------------------------------------------------------
# 6. Selection


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("gqa", ["per_group", "group"])
def test_uniform_keeps_equal_counts_and_the_best_units(family, gqa):
    model = build(family)
    scores = random_scores(model)
    heads = 0.5
    plan = make_plan(model, scores, SelectionConfig(heads=heads, mlp=0.375, layout="uniform", gqa=gqa))
    counts = plan.counts()
    for key in ("heads", "kv_heads", "neurons"):
        assert len(set(counts[key])) == 1, key
    assert counts["neurons"][0] == 30
    n_heads = model.config.num_attention_heads
    assert counts["heads"][0] == n_heads // 2
    for s, kept in zip(scores.neurons, plan.neurons):
        assert kept == sorted(s.argsort(descending=True)[:30].tolist())
    if family not in LLAMA_LIKE:  # one query head per KV head: the plain top-k per layer
        for s, kept in zip(scores.heads, plan.heads):
            assert kept == sorted(s.argsort(descending=True)[: n_heads // 2].tolist())
            assert plan.kv_heads == plan.heads
    prune(model, plan)  # surgery validates the plan


@pytest.mark.parametrize("family", ["gpt2", "bert", "llama"])
def test_global_is_one_ranking(family):
    model = build(family)
    scores = random_scores(model, seed=3)
    gqa = "group" if family in LLAMA_LIKE else "per_group"
    plan = make_plan(model, scores, SelectionConfig(heads=0.5, mlp=0.5, layout="global", gqa=gqa))
    # neurons (round_to=1): every kept neuron outranks every removed neuron of ANY layer
    kept = torch.cat([s[k] for s, k in zip(scores.neurons, plan.neurons)])
    dropped = torch.cat([s[removed(k, s.numel())] for s, k in zip(scores.neurons, plan.neurons)])
    assert kept.min() >= dropped.max()
    assert sum(len(k) for k in plan.neurons) == 48  # half of 2 × 48
    assert len(set(plan.counts()["neurons"])) > 1  # the layers really differ
    # heads (whole KV groups for Llama-style): the same for the selectable units
    g = model.config.num_attention_heads // getattr(model.config, "num_key_value_heads", model.config.num_attention_heads)
    unit_scores = [s.reshape(-1, g).sum(1) for s in scores.heads]
    kept_units = [sorted({h // g for h in k}) for k in plan.heads]
    kept = torch.cat([s[k] for s, k in zip(unit_scores, kept_units)])
    dropped = torch.cat([s[removed(k, s.numel())] for s, k in zip(unit_scores, kept_units)])
    if dropped.numel():
        assert kept.min() >= dropped.max()


def test_global_never_empties_a_layer():
    """Layer 1 scores below every unit of layer 0: a global cut keeps only its best unit."""
    model = build("gpt2")
    scores = Scores(
        heads=[torch.tensor([5.0, 6.0, 7.0, 8.0]), torch.tensor([0.1, 0.4, 0.3, 0.2])],
        neurons=[torch.arange(48.0) + 100, torch.arange(48.0).flip(0)],
    )
    plan = make_plan(model, scores, SelectionConfig(heads=0.5, mlp=0.5, layout="global"))
    assert plan.heads == [[0, 1, 2, 3], [1]]
    assert plan.neurons == [list(range(48)), [0]]
    prune(model, plan)
    assert [l.num_heads for l in earlycrop.get_adapter(model).layers(model)] == [4, 1]


@pytest.mark.parametrize("layout", ["uniform", "global"])
def test_round_to_gives_multiples(layout):
    model = build("llama")
    for ratio in (0.3, 0.5, 0.7, 0.9):
        plan = make_plan(model, random_scores(model), SelectionConfig(mlp=ratio, layout=layout, round_to=8))
        assert all(n % 8 == 0 and n >= 8 for n in plan.counts()["neurons"]), (ratio, plan.counts())


@pytest.mark.parametrize("layout", ["uniform", "global"])
def test_gqa_per_group_keeps_groups_consistent(layout):
    model = build("qwen2")  # 8 query heads, 2 KV groups of 4
    scores = random_scores(model, seed=5)
    for ratio in (0.25, 0.5, 0.75):
        plan = make_plan(model, scores, SelectionConfig(heads=ratio, layout=layout, gqa="per_group"))
        for q, kv, s in zip(plan.heads, plan.kv_heads, scores.heads):
            assert kv == [0, 1]
            per_group = [sum(1 for h in q if h // 4 == g) for g in kv]
            assert per_group[0] == per_group[1] >= 1
            for g in kv:  # within a group the best heads are kept
                mine = [h for h in q if h // 4 == g]
                others = [h for h in range(g * 4, g * 4 + 4) if h not in mine]
                if others:
                    assert min(s[mine]) >= max(s[others])
        if layout == "uniform":
            assert set(plan.counts()["heads"]) == {round(8 * (1 - ratio) / 2) * 2}
        prune(build("qwen2"), plan)


@pytest.mark.parametrize("layout", ["uniform", "global"])
def test_gqa_group_removes_whole_groups(layout):
    model = build("mistral")
    scores = random_scores(model, seed=6)
    plan = make_plan(model, scores, SelectionConfig(heads=0.5, layout=layout, gqa="group"))
    for q, kv, s in zip(plan.heads, plan.kv_heads, scores.heads):
        assert q == [g * 4 + i for g in kv for i in range(4)]
        if layout == "uniform":
            assert kv == [int(s.reshape(2, 4).sum(1).argmax())]
    prune(model, plan)
    assert model.config.num_key_value_heads == 1 if layout == "uniform" else True


@pytest.mark.parametrize("layout", ["uniform", "global"])
def test_ties_keep_the_lowest_indices(layout):
    model = build("llama")
    layers = earlycrop.get_adapter(model).layers(model)
    scores = Scores(heads=[torch.ones(l.num_heads) for l in layers], neurons=[torch.ones(l.intermediate_size) for l in layers])
    per_group = make_plan(model, scores, SelectionConfig(heads=0.5, mlp=0.5, layout=layout, gqa="per_group"))
    group = make_plan(model, scores, SelectionConfig(heads=0.5, mlp=0.5, layout=layout, gqa="group"))
    if layout == "uniform":
        assert per_group.neurons == [list(range(24))] * 2
        assert per_group.heads == [[0, 1, 4, 5]] * 2
        assert group.heads == [[0, 1, 2, 3]] * 2 and group.kv_heads == [[0]] * 2
    else:  # one ranking over all layers: the lowest flat indices, i.e. layer 0 first; layer 1 keeps its minimum
        assert per_group.neurons == [list(range(48)), [0]]
        assert group.kv_heads == [[0, 1], [0]]
    again = make_plan(model, scores, SelectionConfig(heads=0.5, mlp=0.5, layout=layout, gqa="per_group"))
    assert again == per_group


def test_plan_json_round_trip(tmp_path):
    model = build("qwen2")
    plan = make_plan(model, random_scores(model), SelectionConfig(heads=0.5, mlp=0.3, layout="global", round_to=4),
                     meta={"criterion": "random"})
    assert Plan.from_dict(json.loads(plan.to_json())) == plan
    plan.save(tmp_path / "plan.json")
    loaded = Plan.load(tmp_path / "plan.json")
    assert loaded == plan
    assert loaded.meta["criterion"] == "random" and loaded.meta["selection"]["round_to"] == 4
    x = batches("qwen2", n=1)[0]["input_ids"]
    a, b = build("qwen2"), build("qwen2")
    prune(a, plan)
    prune(b, loaded)
    with torch.no_grad():
        assert torch.equal(a(input_ids=x).logits, b(input_ids=x).logits)


def test_params_after_matches_surgery():
    for family in FAMILIES:
        model = build(family)
        plan = make_plan(model, random_scores(model), SelectionConfig(heads=0.5, mlp=0.4, layout="global"))
        predicted = params_after(model, plan)
        assert prune(model, plan).params_after == predicted == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("family,layout", [("llama", "uniform"), ("llama", "global"), ("gpt2", "uniform"), ("bert", "global")])
def test_target_params(family, layout):
    model = build(family)
    scores = random_scores(model)
    dense = sum(p.numel() for p in model.parameters())
    prunable = dense - params_after(model, make_plan(model, scores, SelectionConfig(heads=0.7, mlp=0.9, layout="global")))
    target = dense - prunable // 3
    plan = make_plan(model, scores, SelectionConfig(layout=layout, target_params=target))
    size = params_after(model, plan)
    assert size <= target
    assert size >= target - prunable // 6, (size, target)  # close: within a fraction of what is prunable
    ratio = plan.meta["selection"]["heads"]
    assert plan.meta["selection"]["mlp"] == ratio and plan.meta["selection"]["target_params"] == target
    # and the ratio is the smallest that meets the budget: a slightly smaller one does not
    try:
        smaller = make_plan(model, scores, SelectionConfig(heads=ratio - 2e-4, mlp=ratio - 2e-4, layout=layout))
        assert params_after(model, smaller) > target
    except ValueError as err:  # or there is no valid plan at all below it (GQA rounding)
        assert "removes nothing" in str(err)
    if layout == "uniform":
        assert all(len(set(c)) == 1 for c in plan.counts().values())
    # a budget at or above the dense size prunes nothing
    assert params_after(model, make_plan(model, scores, SelectionConfig(layout=layout, target_params=dense))) == dense


@pytest.mark.parametrize("layout", ["uniform", "global"])
def test_impossible_target_params_is_refused(layout):
    model = build("llama")
    with pytest.raises(ValueError, match=r"target_params=1,000 cannot be met: the most pruned model still has"):
        make_plan(model, random_scores(model), SelectionConfig(layout=layout, target_params=1000))


# --------------------------------------------------------------------------------------------
# 7. Error cases


@pytest.mark.parametrize("key", ["heads", "mlp"])
@pytest.mark.parametrize("value", [-0.1, 1.0, 1.5, float("nan")])
def test_ratio_outside_unit_interval(key, value):
    with pytest.raises(ValueError, match=rf"{key}=.*the fraction removed must be in \[0, 1\)"):
        SelectionConfig(**{key: value})


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(layout="diagonal"), "layout='diagonal': choose 'uniform' or 'global'"),
        (dict(gqa="pairs"), "gqa='pairs': choose 'per_group' or 'group'"),
        (dict(round_to=0), "round_to=0: must be a positive integer"),
        (dict(target_params=-5), "target_params=-5: must be a positive parameter count"),
    ],
)
def test_bad_selection_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SelectionConfig(**kwargs)


def test_uniform_ratio_that_empties_a_layer():
    model = build("bert")  # 4 heads, 48 neurons per layer
    scores = random_scores(model)
    with pytest.raises(ValueError, match=r"heads=0\.9 would empty layer 0 \(4 units"):
        make_plan(model, scores, SelectionConfig(heads=0.9))
    with pytest.raises(ValueError, match=r"mlp=0\.99 would empty layer 0 \(48 units"):
        make_plan(model, scores, SelectionConfig(mlp=0.99))
    with pytest.raises(ValueError, match=r"mlp=0\.95 would empty layer 0 .*multiples of 8"):
        make_plan(model, scores, SelectionConfig(mlp=0.95, round_to=8))
    # the same ratios are fine globally: one ranking, at least one unit per layer
    plan = make_plan(model, scores, SelectionConfig(heads=0.9, mlp=0.99, layout="global"))
    assert all(n >= 1 for n in plan.counts()["heads"] + plan.counts()["neurons"])


@pytest.mark.parametrize("layout", ["uniform", "global"])
def test_rounding_that_removes_nothing(layout):
    """GQA groups / round_to can round a small ratio back to the dense count: refused, and the
    suggested smallest ratio really removes something."""
    model = build("llama")  # 8 heads in 2 groups: per_group keeps multiples of 2 heads, group keeps whole groups
    scores = random_scores(model)
    cases = [
        (dict(heads=0.1, gqa="per_group"), r"heads=0\.1 removes nothing: .*multiples of 2 of 8 units per layer", 0.25),
        (dict(heads=0.125, gqa="per_group"), r"heads=0\.125 removes nothing: .*a ratio of at least 0\.25 removes some", 0.25),
        (dict(heads=0.1, gqa="group"), r"heads=0\.1 removes nothing: .*multiples of 1 of 2 units", 0.5),
        (dict(mlp=0.05, round_to=8), r"mlp=0\.05 removes nothing: .*multiples of 8 of 48 units", 8 / 48),
    ]
    if layout == "uniform":  # one ranking over 4 groups: 0.2 already removes one of them globally
        cases.append((dict(heads=0.2, gqa="group"), r"heads=0\.2 removes nothing", 0.5))
    for kwargs, match, suggested in cases:
        with pytest.raises(ValueError, match=match) as err:
            make_plan(model, scores, SelectionConfig(layout=layout, **kwargs))
        assert f"a ratio of at least {suggested:.4g} removes some" in str(err.value)
        key = "heads" if "heads" in kwargs else "mlp"
        plan = make_plan(model, scores, SelectionConfig(layout=layout, **{**kwargs, key: float(f"{suggested:.4g}")}))
        counts = plan.counts()["heads" if key == "heads" else "neurons"]
        assert sum(counts) < (16 if key == "heads" else 96)


def test_scores_for_another_model_are_refused():
    model = build("llama")
    gpt2_scores = random_scores(build("gpt2"))
    with pytest.raises(ValueError, match="layer 0: scores have 4 heads / 48 neurons, the model 8 / 48"):
        make_plan(model, gpt2_scores, SelectionConfig(heads=0.5))
    short = Scores(heads=gpt2_scores.heads[:1], neurons=gpt2_scores.neurons[:1])
    with pytest.raises(ValueError, match="scores cover 1 layers but the model has 2"):
        make_plan(model, short, SelectionConfig(heads=0.5))


def test_plan_for_another_family_or_layer_count_is_refused():
    llama = build("llama")
    plan = make_plan(llama, random_scores(llama), SelectionConfig(heads=0.5, mlp=0.5))
    with pytest.raises(ValueError, match="the plan was made for a 'llama' model, this is a 'qwen2' model"):
        prune(build("qwen2"), plan)
    with pytest.raises(ValueError, match="the plan was made for a 'llama' model, this is a 'gpt2' model"):
        prune(build("gpt2"), plan)
    one_layer = Plan(**{**plan.to_dict(), "heads": plan.heads[:1], "kv_heads": plan.kv_heads[:1], "neurons": plan.neurons[:1]})
    with pytest.raises(ValueError, match="the plan has 1 layers, the model 2"):
        prune(llama, one_layer)
    # nothing was touched by the refused calls
    assert [l.num_heads for l in earlycrop.get_adapter(llama).layers(llama)] == [8, 8]


@pytest.mark.parametrize(
    "edit,match",
    [
        (dict(heads=[[0, 1, 2, 4], [0, 1, 4, 5]]), "layer 0: kept query heads .* not spread evenly .*GQA would break"),
        (dict(heads=[[0, 1, 4, 5], [0, 1, 2, 3]], kv_heads=[[0, 1], [1]]), "layer 1: kept query heads .*GQA would break"),
        (dict(neurons=[[], list(range(24))]), "layer 0: the plan keeps no neurons"),
        (dict(neurons=[[3, 1], list(range(24))]), "layer 0: neurons indices must be sorted, unique and below 48"),
        (dict(neurons=[list(range(24)), [0, 48]]), "layer 1: neurons indices must be sorted, unique and below 48"),
    ],
)
def test_inconsistent_plan_is_refused(edit, match):
    model = build("llama")
    plan = make_plan(model, random_scores(model), SelectionConfig(heads=0.5, mlp=0.5))
    with pytest.raises(ValueError, match=match):
        prune(model, Plan(**{**plan.to_dict(), **edit}))


def test_from_pretrained_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        earlycrop.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        earlycrop.from_pretrained(tmp_path / "does-not-exist")


# --------------------------------------------------------------------------------------------
# 8. Selectable head units (public: the budget search uses them too)


@pytest.mark.parametrize("family, gqa, units, multiple", [
    ("llama", "per_group", 8, 2), ("llama", "group", 2, 1), ("gpt2", "per_group", 4, 1), ("gpt2", "group", 4, 1),
])
def test_selectable_head_units_are_what_make_plan_counts(family, gqa, units, multiple):
    model = build(family)
    layer = earlycrop.get_adapter(model).layers(model)[0]
    assert (selectable_head_units(layer, gqa), head_unit_multiple(layer, gqa)) == (units, multiple)
    plan = make_plan(model, random_scores(model), SelectionConfig(heads=0.5, gqa=gqa))
    kept = len(plan.heads[0]) if units == layer.num_heads else len(plan.kv_heads[0])
    assert kept == units // 2 and kept % multiple == 0


def test_scores_is_one_class_wherever_it_is_imported():
    from earlycrop import criteria, scores

    assert Scores is scores.Scores is criteria.Scores
