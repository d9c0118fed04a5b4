"""Preemption pieces that need no launcher: atomic checkpoints, and scores kept across a restart."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from accelerate import Accelerator

from pipeline.train import TrainerState, latest_checkpoint, save_checkpoint

from . import launching


def test_a_kill_while_writing_never_leaves_a_checkpoint_that_looks_complete(tmp_path, monkeypatch):
    accelerator = Accelerator(cpu=True)
    model, optimizer = accelerator.prepare(torch.nn.Linear(2, 2), torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1))
    save_checkpoint(accelerator, tmp_path, TrainerState(step=4), keep=2)

    def dies_half_way(folder, *args, **kwargs):
        (tmp_path / "checkpoints" / folder.split("/")[-1] / "model.safetensors").parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "checkpoints" / folder.split("/")[-1] / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt  # what a SIGKILL looks like from the outside: the write never finishes

    monkeypatch.setattr(accelerator, "save_state", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(accelerator, tmp_path, TrainerState(step=8), keep=2)
    assert latest_checkpoint(tmp_path).name == "step_00000004"
    assert json.loads((latest_checkpoint(tmp_path) / "trainer_state.json").read_text())["step"] == 4


@pytest.mark.slow
def test_a_restart_after_scoring_reuses_the_saved_scores_only_if_they_match(tmp_path):
    out = tmp_path / "run"
    args = ("run", "configs/ci_tiny.yaml", f"output_dir={out}", "train.max_steps=2", "tracking=false")
    launching.cli(*args)
    scored = (out / "scores.safetensors").read_bytes()
    # killed after scoring, before the first checkpoint: only the scores survive
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    shutil.rmtree(out / "model")
    (out / "summary.json").unlink()
    again = launching.cli(*args, "--resume")
    assert "reusing scores" in again.stdout + again.stderr
    assert (out / "scores.safetensors").read_bytes() == scored
    # another criterion is another run: --resume refuses it (issue 12) and so never reuses these scores
    changed = launching.cli(*args, "prune.criterion=snip", "--resume", check=False)
    assert "reusing scores" not in changed.stdout + changed.stderr
    assert changed.returncode == 2 and "prune.criterion=earlycrop, not snip" in changed.stderr
