"""Determinism (issue 6, item 5): the same config and seed give bit-identical scores, plan and final weights on
CPU, launched twice with 1 rank and twice with 2 ranks (torchrun, gloo, DDP).

    python -m pytest -q -m slow tests/test_determinism.py     # 4 launches, about 2-3 minutes on 2 cores
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from . import launching

CONFIG = "configs/ci_tiny.yaml"
# enough to pass a checkpoint (every 4 steps) and an evaluation (every 6) with a pruned model
ARGS = ["train.max_steps=8", "tracking=false"]


def _launch(ranks: int, out: Path) -> None:
    args = ["-m", "launch.cli", "run", CONFIG, f"output_dir={out}", *ARGS]
    if ranks == 1:
        launching.run([sys.executable, *args])
    else:
        launching.torchrun(ranks, *args)


def _same_tensors(a: Path, b: Path) -> None:
    first, second = load_file(a), load_file(b)
    assert first.keys() == second.keys()
    for key in first:
        torch.testing.assert_close(second[key], first[key], rtol=0, atol=0, msg=f"{a.name}: {key} differs")


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [1, 2])
def test_same_seed_same_scores_plan_and_weights(tmp_path, ranks):
    runs = [tmp_path / "first", tmp_path / "second"]
    for out in runs:
        _launch(ranks, out)
    first, second = runs
    _same_tensors(first / "scores.safetensors", second / "scores.safetensors")
    assert (first / "plan.json").read_text() == (second / "plan.json").read_text()
    _same_tensors(first / "model" / "model.safetensors", second / "model" / "model.safetensors")
    # not a trivially equal pair: the run pruned something and trained
    scores = load_file(first / "scores.safetensors")
    assert all(t.abs().sum() > 0 for t in scores.values())
    assert (first / "summary.json").is_file() and (second / "summary.json").is_file()
