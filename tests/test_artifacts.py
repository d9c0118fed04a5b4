"""What a pruning run leaves for people to read: plan.json one line per layer, score plots that show the cut
and per-layer axes numbered by whole layers (issue 15 item 10)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import earlycrop
from earlycrop import Plan, SelectionConfig, make_plan
from earlycrop.scores import Scores
from pipeline.plots import plot_kept_units, plot_loss_curves, plot_run_losses, plot_scores

from .tiny_models import build


def _plan(layout: str = "global") -> Plan:
    model = build("qwen2")
    gen = torch.Generator().manual_seed(0)
    layers = earlycrop.get_adapter(model).layers(model)
    scores = Scores(heads=[torch.rand(l.num_heads, generator=gen) for l in layers],
                    neurons=[torch.rand(l.intermediate_size, generator=gen) for l in layers])
    return make_plan(model, scores, SelectionConfig(heads=0.5, mlp=0.5, layout=layout), meta={"criterion": "random"})


def test_plan_json_has_one_line_per_layer_and_reads_back(tmp_path):
    plan = _plan()
    text = plan.to_json()
    assert text == _plan().to_json(), "the text is compared across ranks: it must not vary"
    lines = text.splitlines()
    for key in ("heads", "kv_heads", "neurons"):
        start = lines.index(f' "{key}": [')
        rows = lines[start + 1 : start + 1 + plan.num_layers]
        assert [json.loads(row.rstrip(",")) for row in rows] == getattr(plan, key)
    assert f' "dense_neurons": {json.dumps(plan.dense_neurons)},' in lines
    assert len(lines) < 40, "no line per index any more"
    plan.save(tmp_path / "plan.json")
    assert Plan.load(tmp_path / "plan.json") == plan
    (tmp_path / "old.json").write_text(json.dumps(plan.to_dict(), indent=1))  # as earlier versions wrote it
    assert Plan.load(tmp_path / "old.json") == plan


def _integer_ticks(axis) -> list[float]:
    return [float(t) for t in axis.get_ticklocs()]


def test_scores_plot_marks_the_kept_units_and_counts_layers_in_whole_numbers():
    heads = [[0.1, 0.9, 0.5, 0.3], [0.8, 0.2, 0.6, 0.4]]
    neurons = [[0.5, 2.0, 1.0], [3.0, 0.1, 0.2, 0.7]]
    kept_heads, kept_neurons = [[1, 2], [0, 2]], [[1], [0, 3]]
    fig = plot_scores(heads, neurons, kept_heads, kept_neurons)
    fig.canvas.draw()
    heat, strips = fig.axes[0], fig.axes[1]
    kept_cells, removed_cells = heat.images[0].get_array(), heat.images[1].get_array()
    expected = np.array([[False, True, True, False], [True, False, True, False]])
    assert (~np.ma.getmaskarray(kept_cells) == expected).all(), "kept heads in colour"
    assert (~np.ma.getmaskarray(removed_cells) == ~expected).all(), "removed heads in grey"
    by_label = {c.get_label(): c.get_offsets() for c in strips.collections}
    assert sorted(by_label["kept"][:, 1].tolist()) == [0.7, 2.0, 3.0]
    assert sorted(by_label["removed"][:, 1].tolist()) == [0.1, 0.2, 0.5, 1.0]
    assert sorted(np.round(by_label["kept"][:, 0]).tolist()) == [0, 1, 1], "each point stays in its layer's column"
    for axis in (heat.xaxis, heat.yaxis, strips.xaxis):
        assert all(t.is_integer() for t in _integer_ticks(axis))
    unmarked = plot_scores(heads, neurons)
    assert {c.get_label() for c in unmarked.axes[1].collections} == {"neurons"}


@pytest.mark.parametrize("layers", [3, 60])
def test_every_per_layer_axis_has_integer_ticks(layers):
    rng = np.random.default_rng(0)
    scores = plot_scores([rng.random(4).tolist() for _ in range(layers)], [rng.random(2000).tolist() for _ in range(layers)],
                         [[0, 1]] * layers, [list(range(1000))] * layers)
    kept = plot_kept_units([2] * layers, [4] * layers, [10] * layers, [16] * layers)
    loss = plot_loss_curves({"train": [(0, 3.0), (1, 2.0), (2, 1.5)]})
    for fig in (scores, kept, loss):
        fig.canvas.draw()
    axes = [scores.axes[0].yaxis, scores.axes[1].xaxis, kept.axes[0].xaxis, kept.axes[1].xaxis, loss.axes[0].xaxis]
    for axis in axes:
        ticks = _integer_ticks(axis)
        assert ticks and all(t.is_integer() for t in ticks)
    # a 2,000-neuron layer is drawn from at most 300 points (rank-spaced), kept and removed together
    drawn = sum(len(c.get_offsets()) for c in scores.axes[1].collections)
    assert drawn == 300 * layers


def test_the_loss_plot_ends_at_the_final_evaluation():
    # the loop evaluates at 2 and leaves step 4 to the evaluation after training, which the history does not hold
    history = [{"step": 0, "val_loss": 5.0}, {"step": 2, "train_loss": 4.0}, {"step": 2, "val_loss": 4.5},
               {"step": 4, "train_loss": 3.0}]
    lines = {line.get_label(): line for line in plot_run_losses(history, (4, 3.5)).axes[0].get_lines()}
    assert list(zip(lines["validation"].get_xdata(), lines["validation"].get_ydata())) == [(0, 5.0), (2, 4.5), (4, 3.5)]
    assert list(lines["train"].get_xdata()) == [2, 4]
