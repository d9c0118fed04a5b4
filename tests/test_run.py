"""The job (pipeline/run.py) never loses what a user had: a previous run in output_dir is refused unless
resumed (same identity, checked field by field) or replaced; checkpoints carry the run's identity and
rotation deletes only the run's own; a killed run's MLflow run does not stay RUNNING; SIGTERM during
the final save lets the save finish (issue 12 items 4, 5, 13)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from launch.cli import main
from pipeline.config import load_config
from pipeline.outputs import read_identity
from pipeline.run import Job
from pipeline.train import DeferredSigterm, latest_checkpoint

from . import launching

CONFIG = "configs/ci_tiny.yaml"
FAST = ["tracking=false", "train.max_steps=4", "train.checkpoint_every=2", "train.eval_every=100"]


def cli_run(out, *extra: str) -> int:
    return main(["run", CONFIG, f"output_dir={out}", *FAST, *extra])


def test_a_new_run_over_a_previous_one_is_refused_and_overwrite_replaces_it(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli_run(out) == 0
    before = (out / "summary.json").read_text()
    assert json.loads(before)["peak_memory_rank0_bytes"] > 0  # memory per rank is reported (issue 14 item 5)
    assert cli_run(out, "seed=3", "train.lr=1e-2") == 2
    err = capsys.readouterr().err
    assert "holds a previous run" in err and "use --resume to continue it or --overwrite to replace it" in err
    assert (out / "summary.json").read_text() == before, "a refused run must not touch the previous one"
    (out / "notes.txt").write_text("mine")
    assert cli_run(out, "seed=3", "--overwrite") == 0
    assert read_identity(out)["seed"] == "3" and (out / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("change, named", [("prune.mlp=0.25", "prune.mlp=0.5, not 0.25"), ("seed=1", "seed=0, not 1")])
def test_resume_refuses_another_configuration_naming_the_field(tmp_path, capsys, change, named):
    out = tmp_path / "run"
    assert cli_run(out) == 0
    assert cli_run(out, change, "--resume") == 2
    assert named in capsys.readouterr().err
    # a field listed as resumable may change
    assert cli_run(out, "train.max_steps=6", "--resume") == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 6


def test_rotation_and_resume_keep_to_the_runs_own_checkpoints(tmp_path):
    out = tmp_path / "run"
    assert cli_run(out) == 0
    foreign = out / "checkpoints" / "step_00000099"
    shutil.copytree(latest_checkpoint(out), foreign)
    (foreign / "identity.json").write_text(json.dumps({"fingerprint": "another-run"}))
    assert cli_run(out, "train.max_steps=8", "--resume") == 0
    own = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    assert own == ["step_00000006", "step_00000008", "step_00000099"], "rotation deleted only this run's own"
    job = Job(load_config(CONFIG, [f"output_dir={out}", *FAST, "train.max_steps=8"]), resume=True)
    job.identity = read_identity(out)
    assert latest_checkpoint(out, job.identity).name == "step_00000008", "another run's newer checkpoint is never resumed"


def test_the_next_run_marks_a_killed_runs_mlflow_run_killed(tmp_path):
    out = tmp_path / "run"
    assert main(["run", CONFIG, f"output_dir={out}", "train.max_steps=2", "train.checkpoint_every=0"]) == 0
    info = json.loads((out / "run_info.json").read_text())
    client = MlflowClient(tracking_uri=info["tracking_uri"])
    client.update_run(info["run_id"], status="RUNNING")  # as a kill -9 leaves it
    assert main(["run", CONFIG, f"output_dir={out}", "train.max_steps=2", "train.checkpoint_every=0", "--overwrite"]) == 0
    assert client.get_run(info["run_id"]).info.status == "KILLED"


def test_sigterm_during_the_final_save_lets_it_finish():
    said = []
    with DeferredSigterm(said.append, "the final save") as sigterm:
        os.kill(os.getpid(), signal.SIGTERM)
        finished = True  # the stage goes on after the signal
    assert finished and sigterm.requested and "finishing it first" in said[0]
    assert signal.getsignal(signal.SIGTERM) is not sigterm._handle


@pytest.mark.slow
def test_every_rank_refuses_a_previous_run_instead_of_waiting(tmp_path):
    out = tmp_path / "run"
    assert cli_run(out) == 0
    proc = launching.torchrun(2, "-m", "launch.cli", "run", CONFIG, f"output_dir={out}", *FAST, check=False, timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.count("holds a previous run") >= 2, "both ranks fail alike (neither waits at a barrier)"


@pytest.mark.slow
def test_a_stopped_peer_ends_the_run_with_a_message_naming_the_stage(tmp_path):
    """A frozen node (SIGSTOP on one rank): the healthy rank gives up after collective_timeout_s and says where."""
    log = tmp_path / "log.txt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(launching.free_port()), "-m", "launch.cli", "run", CONFIG, f"output_dir={tmp_path / 'run'}",
           "tracking=false", "train.max_steps=100000", "train.eval_every=100000", "train.checkpoint_every=0",
           "collective_timeout_s=15"]
    with log.open("w") as sink:
        proc = subprocess.Popen(cmd, cwd=launching.REPO, env=launching.env(), stdout=sink, stderr=subprocess.STDOUT)
    stopped = None
    try:
        deadline = time.time() + 180
        while "step " not in log.read_text() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.5)
        workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        rank1 = [w for w in workers if b"LOCAL_RANK=1\0" in Path(f"/proc/{w}/environ").read_bytes()]
        stopped = int(rank1[0])
        os.kill(stopped, signal.SIGSTOP)
        proc.wait(timeout=240)
    finally:
        if stopped:
            with contextlib.suppress(ProcessLookupError):  # torchrun may have ended it already
                os.kill(stopped, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert proc.returncode != 0, text[-2000:]
    assert "rank 0: no answer from another rank within collective_timeout_s=15 during 'train'" in text, text[-3000:]
