"""The end-to-end job through the real launchers: score → prune → train → eval → save, tracked in MLflow."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import earlycrop

from . import launching

CONFIG = "configs/ci_tiny.yaml"


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def mlflow_run(out: Path):
    info = json.loads((out / "run_info.json").read_text())
    client = MlflowClient(tracking_uri=info["tracking_uri"])
    return client, client.get_run(info["run_id"])


def artifact_paths(client: MlflowClient, run_id: str, path: str = "") -> set[str]:
    found = set()
    for item in client.list_artifacts(run_id, path):
        found.add(item.path)
        if item.is_dir:
            found |= artifact_paths(client, run_id, item.path)
    return found


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """One process, float64: the scores every multi-process launch must reproduce."""
    out = tmp_path_factory.mktemp("one_process")
    launching.cli("run", CONFIG, f"output_dir={out}", "model.dtype=float64", "train.max_steps=4", "tracking=false")
    return out


@pytest.mark.slow
def test_two_rank_accelerate_run_tracks_everything(tmp_path, reference):
    out = tmp_path / "run"
    launching.accelerate("launch/accelerate/cpu_2proc.yaml", "-m", "launch.cli", "run", CONFIG,
                         f"output_dir={out}", "model.dtype=float64")
    # scores over two ranks equal the one-process scores
    for key, value in load_file(reference / "scores.safetensors").items():
        torch.testing.assert_close(load_file(out / "scores.safetensors")[key], value, rtol=1e-6, atol=0)
    assert (out / "plan.json").read_text() == (reference / "plan.json").read_text()

    client, run = mlflow_run(out)
    assert run.info.status == "FINISHED"
    assert run.data.tags["world_size"] == "2" and run.data.tags["criterion"] == "earlycrop"
    assert run.data.params["prune.heads"] == "0.5" and run.data.params["train.max_steps"] == "12"
    metrics = run.data.metrics
    assert metrics["params/pruned"] < metrics["params/dense"]
    assert {"val/loss", "val/perplexity", "train/loss", "train/tokens_per_s", "train/step_time_s", "system/time_score_s",
            "system/time_train_s", "system/time_prune_s", "system/time_eval_s"} <= set(metrics)
    losses = [m.value for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert len(losses) == 6 and losses[-1] < losses[0]
    artifacts = artifact_paths(client, run.info.run_id)
    assert {"plan.json", "scores/scores.safetensors", "kept_units.png", "loss_curves.png"} <= artifacts
    assert len(run.outputs.model_outputs) == 1, "the final model is an MLflow Logged Model of the run"

    # Llama with a uniform layout: plain transformers loads the saved model, same logits as earlycrop's loader
    plain = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float64).eval()
    ours = earlycrop.from_pretrained(out / "model", dtype=torch.float64).eval()
    ids = torch.arange(16)[None] % plain.config.vocab_size
    torch.testing.assert_close(plain(ids).logits, ours(ids).logits)
    assert plain.config.num_attention_heads == 2 and plain.config.intermediate_size == 32


@pytest.fixture(scope="module")
def zero2_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("zero2")
    launching.accelerate("launch/accelerate/cpu_2proc_zero2.yaml", "-m", "launch.cli", "run", CONFIG,
                         f"output_dir={out}", "train.log_every=1", "tracking=false")
    return out


@pytest.mark.slow
def test_deepspeed_zero2_two_ranks_trains(zero2_run):
    states = sorted((zero2_run / "checkpoints").glob("step_*/trainer_state.json"))
    history = [h["train_loss"] for h in json.loads(states[-1].read_text())["history"] if "train_loss" in h]
    assert len(history) == 12 and history[-1] < history[0]
    result = summary(zero2_run)
    assert result["finished"] and result["params_final"] < result["params_dense"]
    assert earlycrop.from_pretrained(zero2_run / "model").config.num_attention_heads == 2


@pytest.mark.slow
def test_deepspeed_zero3_prunes_before_partitioning(tmp_path, zero2_run):
    """A model built from scratch has no folder to load partitions from: ZeRO-3 builds it whole, says so, scores
    and prunes it, then partitions it: same run as ZeRO-2."""
    out = tmp_path / "zero3"
    stdout = launching.accelerate("launch/accelerate/cpu_2proc_zero3.yaml", "-m", "launch.cli", "run", CONFIG,
                                  f"output_dir={out}", "train.log_every=1", "tracking=false").stdout
    assert "built whole on every rank to be scored: the model is built from scratch" in stdout
    assert summary(out)["val_loss"] == pytest.approx(summary(zero2_run)["val_loss"], rel=1e-4)
    saved = earlycrop.from_pretrained(out / "model")
    assert saved.config.num_attention_heads == 2
    # counted whole, not as this rank's partitions
    assert summary(out)["params_final"] == summary(zero2_run)["params_final"] == sum(p.numel() for p in saved.parameters())


@pytest.mark.slow
def test_two_nodes_on_loopback_score_like_one_process(tmp_path, reference):
    out = tmp_path / "nodes"
    port = str(launching.free_port())
    procs = [
        subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank),
                          "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", port,
                          "-m", "launch.cli", "run", CONFIG, f"output_dir={out}", "model.dtype=float64",
                          "train.max_steps=4", "tracking=false"],
                         cwd=launching.REPO, env=launching.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank in (0, 1)
    ]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs[0][-3000:] + logs[1][-3000:]
    for key, value in load_file(reference / "scores.safetensors").items():
        torch.testing.assert_close(load_file(out / "scores.safetensors")[key], value, rtol=1e-6, atol=0)
    assert summary(out)["finished"]


MID_TRAINING = ("prune.prune_at=6", "train.max_steps=16", "train.log_every=1", "train.scheduler=constant",
                "prune.schedule_after_prune=continue")


@pytest.fixture(scope="module")
def pruned_mid_ddp(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mid_ddp")
    launching.accelerate("launch/accelerate/cpu_2proc.yaml", "-m", "launch.cli", "run", CONFIG, f"output_dir={out}", *MID_TRAINING)
    return out


@pytest.mark.slow
def test_prune_mid_training_under_ddp_keeps_training(pruned_mid_ddp):
    result = summary(pruned_mid_ddp)
    assert result["pruned_at"] == 6 and result["params_final"] < result["params_dense"]
    client, run = mlflow_run(pruned_mid_ddp)
    losses = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/loss")}
    assert sorted(losses) == list(range(1, 17))
    # after the cut the loss keeps falling: the sliced Adam moments carry on instead of restarting
    assert sum(losses[s] for s in (14, 15, 16)) / 3 < losses[6]
    assert max(losses[s] for s in range(7, 17)) < losses[1]


@pytest.mark.slow
def test_prune_mid_training_under_zero2_matches_ddp(tmp_path, pruned_mid_ddp):
    """ZeRO-2 gathers its partitioned moments, slices them and hands them to the rebuilt engine:
    the run ends where the DDP run (plain torch Adam state, sliced in place) ends."""
    out = tmp_path / "mid_zero2"
    launching.accelerate("launch/accelerate/cpu_2proc_zero2.yaml", "-m", "launch.cli", "run", CONFIG,
                         f"output_dir={out}", "tracking=false", *MID_TRAINING)
    ds, ddp = summary(out), summary(pruned_mid_ddp)
    assert ds["pruned_at"] == 6 and ds["params_final"] == ddp["params_final"]
    assert ds["val_loss"] == pytest.approx(ddp["val_loss"], rel=1e-4)


@pytest.mark.slow
def test_prune_mid_training_under_zero3_matches_ddp(tmp_path, pruned_mid_ddp):
    """ZeRO-3 gathers the partitioned model whole one parameter at a time, with its fp32 weights and moments;
    the cut model is partitioned again with each rank's share of the sliced moments: the DDP run's losses."""
    out = tmp_path / "mid_zero3"
    launching.accelerate("launch/accelerate/cpu_2proc_zero3.yaml", "-m", "launch.cli", "run", CONFIG,
                         f"output_dir={out}", *MID_TRAINING)
    ds, ddp = summary(out), summary(pruned_mid_ddp)
    assert ds["pruned_at"] == 6 and ds["params_final"] == ddp["params_final"]
    assert ds["val_loss"] == pytest.approx(ddp["val_loss"], rel=1e-4)
    losses = [{m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/loss")}
              for client, run in (mlflow_run(out), mlflow_run(pruned_mid_ddp))]
    assert [losses[0][s] for s in range(7, 17)] == pytest.approx([losses[1][s] for s in range(7, 17)], rel=1e-4)
    assert earlycrop.from_pretrained(out / "model").config.num_attention_heads == 2


AUTO = ("prune.prune_at=auto", "prune.auto_interval=2", "prune.auto_cap=10", "train.max_steps=14", "train.eval_every=100",
        "train.checkpoint_every=4", "tracking=false")


@pytest.mark.slow
def test_auto_under_zero3_cuts_where_ddp_does_and_resumes(tmp_path):
    """The weight-distance rule over ZeRO-3 partitions (distances summed over the ranks) fires at DDP's step; a run
    resumed from a checkpoint taken before the cut (w_1 saved whole, each rank taking its partition back) too."""
    ddp, zero3 = tmp_path / "ddp", tmp_path / "zero3"
    launching.accelerate("launch/accelerate/cpu_2proc.yaml", "-m", "launch.cli", "run", CONFIG, f"output_dir={ddp}", *AUTO)
    launching.accelerate("launch/accelerate/cpu_2proc_zero3.yaml", "-m", "launch.cli", "run", CONFIG, f"output_dir={zero3}", *AUTO)
    first, second = summary(ddp), summary(zero3)
    assert 4 < second["pruned_at"] == first["pruned_at"] and second["val_loss"] == pytest.approx(first["val_loss"], rel=1e-4)
    for later in sorted((zero3 / "checkpoints").glob("step_*"))[1:]:  # as if killed after the step-4 checkpoint
        shutil.rmtree(later)
    (zero3 / "model").rename(zero3 / "model.first")
    launching.accelerate("launch/accelerate/cpu_2proc_zero3.yaml", "-m", "launch.cli", "run", CONFIG, f"output_dir={zero3}",
                         *AUTO, "--resume")
    assert summary(zero3)["pruned_at"] == first["pruned_at"]
    assert summary(zero3)["val_loss"] == pytest.approx(first["val_loss"], rel=1e-4)


def _run_cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "launch.cli", "run", CONFIG, f"output_dir={out}", "train.max_steps=40",
            "train.checkpoint_every=10", "train.eval_every=100", "tracking=false", *extra]


@pytest.mark.slow
@pytest.mark.parametrize("when", [(), ("prune.prune_at=auto", "prune.auto_interval=4", "prune.auto_cap=30")],
                         ids=["prune_at_0", "auto_pruning_after_the_kill"])
def test_resume_after_sigkill_gives_the_uninterrupted_weights(tmp_path, when):
    launching.run(_run_cmd(tmp_path / "full", *when))
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_run_cmd(killed, *when), cwd=launching.REPO, env=launching.env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "checkpoints/step_00000010/trainer_state.json").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "model").exists()
    launching.run(_run_cmd(killed, *when, "--resume"))
    assert summary(killed)["pruned_at"] == summary(tmp_path / "full")["pruned_at"]
    full = load_file(tmp_path / "full/model/model.safetensors")
    resumed = load_file(killed / "model/model.safetensors")
    assert full.keys() == resumed.keys()
    for key in full:
        torch.testing.assert_close(resumed[key], full[key], rtol=0, atol=0)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    out = tmp_path / "term"
    proc = subprocess.Popen(_run_cmd(out, "train.max_steps=100000", "train.checkpoint_every=0"), cwd=launching.REPO,
                            env=launching.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not (out / "plan.json").exists():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.1)
    time.sleep(2)
    proc.send_signal(signal.SIGTERM)
    log = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, log[-3000:]
    checkpoint = earlycrop_checkpoint(out)
    assert checkpoint is not None and "resume with --resume" in log


def earlycrop_checkpoint(out: Path):
    from pipeline.train import latest_checkpoint

    return latest_checkpoint(out)


@pytest.mark.slow
def test_auto_prunes_when_weights_settle_and_logs_the_trace(tmp_path):
    out = tmp_path / "auto"
    launching.cli("run", CONFIG, f"output_dir={out}", "prune.prune_at=auto", "prune.auto_interval=2",
                  "prune.auto_cap=10", "train.max_steps=14")
    result = summary(out)
    assert 6 <= result["pruned_at"] <= 10 and result["params_final"] < result["params_dense"]
    client, run = mlflow_run(out)
    trace = client.get_metric_history(run.info.run_id, "prune/auto_weight_distance")
    assert [m.step for m in trace][:2] == [2, 4] and trace[1].value > 0
    assert "auto_schedule.json" in artifact_paths(client, run.info.run_id)


@pytest.mark.slow
def test_target_budget_picks_the_plan_and_logs_the_report(tmp_path):
    out = tmp_path / "target"
    launching.cli("run", CONFIG, f"output_dir={out}", "target.budget=params<=20K", "train.max_steps=2")
    result = summary(out)
    assert result["params_final"] <= 20_000 < result["params_dense"]
    client, run = mlflow_run(out)
    assert run.data.metrics["budget/pruned.params"] == result["params_final"]
    assert run.data.metrics["budget/dense.tokens_per_s"] > 0 and run.data.metrics["budget/pruned.tokens_per_s"] > 0
    assert "budget_report.json" in artifact_paths(client, run.info.run_id)
    refused = launching.cli("run", CONFIG, f"output_dir={tmp_path / 'refused'}", "target.budget=params<=100", check=False)
    assert refused.returncode != 0 and "params<=100" in refused.stderr
    assert not (tmp_path / "refused/scores.safetensors").exists()
