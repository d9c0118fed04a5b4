"""Tracking: MLflow round trips (sqlite and a real server), failure handling, plots."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from pipeline.plots import plot_kept_units, plot_loss_curves, plot_scores
from pipeline.tracking.uris import create_in_store
from launch.cli import main as cli_main
from pipeline.tracking import (
    BACKLOG_FILE_NAME,
    MLflowTracker,
    NullTracker,
    Tracker,
    TrackingUnavailableError,
    TrackingWarning,
    create_tracker,
    default_run_name,
    default_tracking_uri,
    flatten_config,
    metric_name,
    replay_backlog,
    resolve_tracking_uri,
    write_backlog,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _no_ambient_tracking_env(monkeypatch):
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID"):
        monkeypatch.delenv(name, raising=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _artifact_paths(client, run_id: str, path: str | None = None) -> set[str]:
    out: set[str] = set()
    for info in client.list_artifacts(run_id, path):
        if info.is_dir:
            out |= _artifact_paths(client, run_id, info.path)
        else:
            out.add(info.path)
    return out


def _figure():
    return plot_kept_units([2, 1], [2, 2], [6, 3], [8, 8])


# ------------------------------------------------------------------------------------------------
# A real `mlflow server`
# ------------------------------------------------------------------------------------------------


class MlflowServer:
    """`mlflow server` on a free port, in its own process group (the CLI spawns uvicorn)."""

    def __init__(self, root: Path):
        self.root = root
        self.db = root / "server.db"
        self.port = _free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log = root / "server.log"
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        env.pop("MLFLOW_TRACKING_URI", None)
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable, "-m", "mlflow", "server",
                    "--host", "127.0.0.1", "--port", str(self.port),
                    "--backend-store-uri", f"sqlite:///{self.db}",
                    "--artifacts-destination", str(root / "artifacts"),
                    "--workers", "1",
                ],
                cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip

    def wait_healthy(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited early:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.uri + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.25)
        raise RuntimeError(f"mlflow server not healthy after {timeout}s:\n{self.log.read_text()[-3000:]}")

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)  # the group we created with start_new_session
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        """Abrupt death (SIGKILL to the server and its uvicorn worker)."""
        self._signal_group(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
        self._signal_group(signal.SIGKILL)  # stragglers (uvicorn) in the group
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass


class ServerPool:
    """One server per module, shared by the server tests; a test that kills it leaves the next
    caller a fresh one (so the tests do not depend on their order)."""

    def __init__(self, root: Path):
        self.root = root
        self.servers: list[MlflowServer] = []

    def get(self) -> MlflowServer:
        if self.servers and self.servers[-1].proc.poll() is None:
            return self.servers[-1]
        root = self.root / f"server{len(self.servers)}"
        root.mkdir(parents=True)
        server = MlflowServer(root)
        self.servers.append(server)
        server.wait_healthy()
        return server

    def stop_all(self) -> None:
        for server in self.servers:
            server.stop()


@pytest.fixture(scope="module")
def mlflow_servers(tmp_path_factory, request) -> ServerPool:
    pool = ServerPool(tmp_path_factory.mktemp("mlflow_servers"))
    request.addfinalizer(pool.stop_all)
    return pool


# ------------------------------------------------------------------------------------------------
# Pure helpers
# ------------------------------------------------------------------------------------------------


def test_flatten_config():
    cfg = {
        "model": {"name": "gpt2", "layers": 2, "dropout": 0.1, "extra": {}},
        "prune": {"heads": {"ratio": 0.5, "round_to": 8}, "criteria": ["earlycrop", "snip"]},
        "seed": 0,
        "resume": None,
        "flag": True,
        "bad key!": 1,
        "long": "x" * 7000,
    }
    flat = flatten_config(cfg)
    assert flat["model.name"] == "gpt2"
    assert flat["model.layers"] == "2"
    assert flat["model.extra"] == "{}"
    assert flat["prune.heads.ratio"] == "0.5"
    assert flat["prune.heads.round_to"] == "8"
    assert json.loads(flat["prune.criteria"]) == ["earlycrop", "snip"]
    assert flat["seed"] == "0" and flat["resume"] == "None" and flat["flag"] == "True"
    assert flat["bad key_"] == "1"
    assert len(flat["long"]) == 6000 and flat["long"].endswith("...[truncated]")
    assert all(isinstance(v, str) for v in flat.values())
    assert flatten_config(flat) == flat  # idempotent on flat input
    with pytest.raises(TypeError):
        flatten_config(3)


def test_metric_names_get_sections_and_unknown_names_stay():
    named = {n: metric_name(n) for n in ("train_loss", "lr", "tokens_per_s", "val_loss", "val_accuracy", "params_pruned",
                                         "time_score_s", "peak_rss_bytes", "distill_hidden", "budget.dense.params",
                                         "params_final", "steps", "head_warmup_loss_first", "loss", "train/loss")}
    assert named == {
        "train_loss": "train/loss", "lr": "train/lr", "tokens_per_s": "train/tokens_per_s", "val_loss": "val/loss",
        "val_accuracy": "val/accuracy", "params_pruned": "params/pruned", "time_score_s": "system/time_score_s",
        "peak_rss_bytes": "system/peak_rss_bytes", "distill_hidden": "distill/hidden",
        "budget.dense.params": "budget/dense.params", "params_final": "params/final", "steps": "train/steps",
        "head_warmup_loss_first": "head_warmup/loss_first", "loss": "loss", "train/loss": "train/loss",
    }


def test_default_run_names_say_what_the_run_is():
    assert default_run_name("llama", 0, criterion="earlycrop", heads=0.5, mlp=0.5) == "llama-earlycrop-h50-m50-uniform-s0"
    assert default_run_name("llama", 3) == "llama-dense-s3"
    assert default_run_name("gpt2", 1, criterion="snip", heads=0.25, mlp=0.125, layout="global",
                            prune_at="auto") == "gpt2-snip-h25-m12.5-global-auto-s1"
    assert default_run_name("qwen2", 0, criterion="magnitude", budget="24GB x 1", prune_at=100) == "qwen2-magnitude-24GBx1-uniform-at100-s0"


def test_a_run_logs_curves_in_sections_and_one_off_figures_once(tmp_path):
    out = tmp_path / "run"
    assert cli_main(["run", "configs/ci_tiny.yaml", f"output_dir={out}", "train.max_steps=2", "train.log_every=1",
                     "train.checkpoint_every=0"]) == 0
    info = json.loads((out / "run_info.json").read_text())
    client = _client(info["tracking_uri"])
    run = client.get_run(info["run_id"])
    assert info["experiment_id"] == run.info.experiment_id, "the CLI prints the run's page from it"
    assert run.info.run_name == "llama-earlycrop-h50-m50-uniform-s0"
    assert all("/" in key for key in run.data.metrics), sorted(run.data.metrics)
    points = {key: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)] for key in run.data.metrics}
    assert [s for s, _ in points["train/loss"]] == [1, 2] and [s for s, _ in points["val/loss"]] == [0, 2]
    once = {"params/dense", "params/pruned", "params/final", "prune/step", "train/steps", "system/peak_rss_bytes",
            "system/time_score_s", "system/time_train_s"}
    assert once <= set(points) and all(len(points[key]) == 1 for key in once)
    # step 0: MLflow draws them as bars labelled with the value, not as a lone dot at the last step
    assert [key for key in once if points[key][0][0] != 0] == []
    assert not [key for key in run.data.metrics if key.split("/")[0] == "time"], "timings are on the System metrics tab"
    summary = json.loads((out / "summary.json").read_text())
    assert {"val_loss", "params_final", "time_train_s", "steps"} <= set(summary), "summary.json keeps its keys"
    assert points["params/final"] == [(0, summary["params_final"])] and points["val/loss"][-1] == (2, summary["val_loss"])


def test_uri_resolution_order(tmp_path, monkeypatch):
    default = default_tracking_uri(tmp_path)
    assert default == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert resolve_tracking_uri(None, tmp_path) == default
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env-host:5000")
    assert resolve_tracking_uri(None, tmp_path) == "http://env-host:5000"
    assert resolve_tracking_uri("http://explicit:5000", tmp_path) == "http://explicit:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")
    assert resolve_tracking_uri(None, tmp_path) == default


def test_factory_uses_env_uri(tmp_path, monkeypatch):
    env_db = tmp_path / "elsewhere" / "env.db"
    env_db.parent.mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{env_db}")
    out = tmp_path / "out"
    tracker = create_tracker(
        is_main_process=True, output_dir=out, tracking_uri=None, experiment="env-exp", run_name="r"
    )
    try:
        assert tracker.tracking_uri == f"sqlite:///{env_db}"
        assert env_db.exists() and not (out / "mlflow.db").exists()
        tracker.log_artifact(__file__)
    finally:
        tracker.close()
    # artifacts of a new experiment in an explicit sqlite store sit beside the db
    assert (env_db.parent / "mlartifacts").is_dir()


def test_importing_tracking_does_not_import_mlflow():
    code = "import sys, pipeline.tracking; assert 'mlflow' not in sys.modules, 'mlflow imported'"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


def test_null_tracker_writes_nothing(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    for kwargs in ({"is_main_process": False}, {"is_main_process": True, "enabled": False}):
        tracker = create_tracker(
            output_dir=tmp_path, tracking_uri=None, experiment="e", run_name="r", **kwargs
        )
        assert isinstance(tracker, NullTracker) and isinstance(tracker, Tracker)
        assert tracker.run_id is None and tracker.tracking_uri is None
        tracker.log_params({"a": {"b": 1}})
        tracker.log_metrics({"loss": 1.0}, step=1)
        tracker.set_tags({"t": "v"})
        tracker.log_artifact(tmp_path / "model" / "config.json")
        tracker.log_dict({"x": 1}, "d.json")
        fig = _figure()
        tracker.log_figure(fig, "f.png")
        tracker.log_model_dir(tmp_path / "model")
        tracker.close()
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


# ------------------------------------------------------------------------------------------------
# Embedded sqlite store
# ------------------------------------------------------------------------------------------------


def test_mlflow_roundtrip_sqlite(tmp_path):
    out = tmp_path / "run"
    model_dir = tmp_path / "saved"
    (model_dir / "sub").mkdir(parents=True)
    (model_dir / "config.json").write_text('{"n_layer": 2}')
    (model_dir / "sub" / "weights.bin").write_bytes(b"\0" * 16)

    tracker = create_tracker(
        is_main_process=True, output_dir=out, tracking_uri=None, experiment="exp-a", run_name="run-a"
    )
    assert isinstance(tracker, MLflowTracker) and isinstance(tracker, Tracker)
    assert tracker.tracking_uri == default_tracking_uri(out)
    tracker.log_params({"model": {"name": "gpt2", "n_layer": 2}, "prune": {"ratio": 0.5}})
    for step in range(3):
        tracker.log_metrics({"train/loss": 3.0 - step, "lr": 1e-3}, step=step)
    tracker.set_tags({"family": "gpt2", "criterion": "earlycrop"})
    tracker.log_dict({"kept_heads": [2, 1], "note": "plan"}, "plan/plan.json")
    figs = [
        plot_kept_units([2, 1], [2, 2], [6, 3], [8, 8]),
        plot_loss_curves({"train": [(0, 3.0), (1, 2.0), (2, 1.0)], "val": [(2, 1.5)]}),
        plot_scores([[0.1, 0.9], [0.5]], [[0.1, 0.2, 0.3], [1.0, 2.0]]),
    ]
    for name, fig in zip(("kept_units", "loss", "scores"), figs):
        tracker.log_figure(fig, f"plots/{name}.png")
    with pytest.warns(TrackingWarning, match="as plain run artifacts under model/"):  # no Hugging Face model
        tracker.log_model_dir(model_dir)
    tracker.log_artifact(model_dir / "config.json", "configs")
    assert tracker.pending == 0
    run_id = tracker.run_id
    tracker.close()
    tracker.close()  # idempotent

    client = _client(default_tracking_uri(out))
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "run-a"
    assert run.data.params == {"model.name": "gpt2", "model.n_layer": "2", "prune.ratio": "0.5"}
    assert run.data.tags["family"] == "gpt2" and run.data.tags["criterion"] == "earlycrop"
    history = client.get_metric_history(run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == [(0, 3.0), (1, 2.0), (2, 1.0)]
    assert len(client.get_metric_history(run_id, "train/lr")) == 3, "the pipeline's `lr` goes to the train section"
    assert set(run.data.metrics) == {"train/loss", "train/lr"}
    assert _artifact_paths(client, run_id) == {
        "plan/plan.json",
        "plots/kept_units.png",
        "plots/loss.png",
        "plots/scores.png",
        "model/config.json",
        "model/sub/weights.bin",
        "configs/config.json",
    }
    assert run.data.tags["mlflow.user"] and run.data.tags["mlflow.source.name"], "the UI's Created by and Source"
    exp = client.get_experiment_by_name("exp-a")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development", "a model-training experiment"
    assert Path(exp.artifact_location.removeprefix("file://")) == (out / "mlartifacts").resolve()
    local = Path(run.info.artifact_uri.removeprefix("file://"))
    assert json.loads((local / "plan" / "plan.json").read_text())["kept_heads"] == [2, 1]
    assert (local / "plots" / "scores.png").read_bytes()[:4] == b"\x89PNG"
    assert not (out / BACKLOG_FILE_NAME).exists()
    assert not (out / "tracking_pending").exists()


def test_an_existing_experiment_gets_a_kind_unless_it_has_one(tmp_path):
    uri = default_tracking_uri(tmp_path)
    client = _client(uri)
    bare = client.create_experiment("made-by-hand", artifact_location=(tmp_path / "a").as_uri())
    chosen = client.create_experiment("genai", artifact_location=(tmp_path / "b").as_uri(),
                                      tags={"mlflow.experimentKind": "genai_development"})
    for name in ("made-by-hand", "genai"):
        create_tracker(is_main_process=True, output_dir=tmp_path / name, tracking_uri=uri, experiment=name,
                       run_name="r").close()
    assert client.get_experiment(bare).tags["mlflow.experimentKind"] == "custom_model_development"
    assert client.get_experiment(chosen).tags["mlflow.experimentKind"] == "genai_development"


def test_transient_failures_are_buffered_and_retried(tmp_path):
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    out = tmp_path / "run"
    tracker = MLflowTracker(
        default_tracking_uri(out), "exp-b", "flaky", output_dir=out, retry_interval=0.0
    )
    real_log_batch = tracker._client.log_batch
    down = {"on": True}

    def flaky_log_batch(*args, **kwargs):
        if down["on"]:
            raise MlflowException("API request failed: connection refused")  # INTERNAL_ERROR
        if any(m.key == "bad" for m in kwargs.get("metrics", ())):
            raise MlflowException("rejected", error_code=INVALID_PARAMETER_VALUE)
        return real_log_batch(*args, **kwargs)

    tracker._client.log_batch = flaky_log_batch
    with pytest.warns(TrackingWarning, match="retrying"):
        tracker.log_metrics({"loss": 1.0}, step=0)
    tracker.log_metrics({"loss": 0.5}, step=1)  # no raise, queued
    tracker.log_params({"p": 1})
    assert tracker.pending == 3
    down["on"] = False
    with pytest.warns(TrackingWarning, match="reachable again"):
        tracker.log_metrics({"loss": 0.25}, step=2)
    assert tracker.pending == 0
    # a permanent rejection (changed param value) is dropped with a warning and blocks nothing
    with pytest.warns(TrackingWarning, match="rejected"):
        tracker.log_params({"p": 2})
    tracker.log_metrics({"loss": 0.1}, step=3)
    assert tracker.pending == 0
    # queued metrics are sent as one batch; if the server rejects the batch, only the op that
    # causes it is dropped
    down["on"] = True
    with pytest.warns(TrackingWarning, match="retrying"):
        tracker.log_metrics({"loss": 0.05}, step=4)
    tracker.log_metrics({"bad": 1.0}, step=5)
    down["on"] = False
    with pytest.warns(TrackingWarning) as record:
        tracker.log_metrics({"loss": 0.01}, step=6)
    messages = [str(w.message) for w in record]
    assert any("rejected" in m for m in messages) and any("reachable again" in m for m in messages)
    assert tracker.pending == 0
    tracker.close()
    client = _client(default_tracking_uri(out))
    steps = [m.step for m in client.get_metric_history(tracker.run_id, "loss")]
    assert sorted(steps) == [0, 1, 2, 3, 4, 6]
    assert client.get_run(tracker.run_id).data.params == {"p": "1"}
    assert not (out / BACKLOG_FILE_NAME).exists()


# Two jobs start at once on one fresh store; each waits for the go file with mlflow already imported,
# so that both reach mlflow's schema migration together (without the store lock, one of them dies).
_START_TOGETHER = """
import sys, time
from pathlib import Path
import mlflow.tracking
from pipeline.tracking import create_tracker
out, go = Path(sys.argv[1]), Path(sys.argv[2])
(out.parent / f"{out.name}.ready").touch()
while not go.exists():
    time.sleep(0.002)
tracker = create_tracker(
    is_main_process=True, output_dir=out, tracking_uri=sys.argv[3], experiment="shared", run_name=out.name
)
tracker.log_metrics({"loss": 1.0}, step=0)
tracker.close()
print(tracker.run_id)
"""


def test_a_lost_migration_race_is_retried_once(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    race = RuntimeError("could not start")
    race.__cause__ = RuntimeError("CommandError: Online migration expected to match one row when updating 'a' to 'b'")
    outcomes: list = []

    def create() -> str:
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    outcomes[:] = [race, "run"]
    assert create_in_store(uri, create, retry_delay=0.0) == "run"
    outcomes[:] = [race, race, "run"]
    with pytest.raises(RuntimeError, match="could not start"):  # once only
        create_in_store(uri, create, retry_delay=0.0)
    assert outcomes == ["run"]
    outcomes[:] = [ValueError("bad experiment"), "run"]
    with pytest.raises(ValueError, match="bad experiment"):  # other errors are not retried
        create_in_store(uri, create, retry_delay=0.0)
    assert outcomes == ["run"]
    assert (tmp_path / "mlflow.db.lock").exists() and not (tmp_path / "mlflow.db").exists()


def test_concurrent_jobs_share_a_fresh_sqlite_store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    go = tmp_path / "go"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    jobs = [
        subprocess.Popen(
            [sys.executable, "-c", _START_TOGETHER, str(tmp_path / name), str(go), uri],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        for name in ("job-a", "job-b")
    ]
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"{name}.ready").exists() for name in ("job-a", "job-b")):
        assert time.monotonic() < deadline and all(job.poll() is None for job in jobs), "jobs did not start"
        time.sleep(0.01)
    go.touch()
    results = [job.communicate(timeout=120) for job in jobs]
    for job, (_, err) in zip(jobs, results):
        assert job.returncode == 0, err[-3000:]
    run_ids = {out.strip().splitlines()[-1] for out, _ in results}
    assert len(run_ids) == 2
    client = _client(uri)
    (exp,) = [e for e in client.search_experiments() if e.name == "shared"]
    assert {r.info.run_id for r in client.search_runs([exp.experiment_id])} == run_ids
    assert (tmp_path / "store" / "mlflow.db.lock").exists()


# ------------------------------------------------------------------------------------------------
# Backlog replay from the command line
# ------------------------------------------------------------------------------------------------


def test_cli_replays_a_backlog_into_a_new_run(tmp_path, capsys):
    kept = tmp_path / "kept.json"
    kept.write_text("{}")
    backlog = tmp_path / BACKLOG_FILE_NAME
    header = {"run_id": "0" * 32, "tracking_uri": "http://127.0.0.1:9", "experiment": "lost", "run_name": "r"}
    metrics = [{"key": "loss", "value": 2.0 - s, "timestamp": 1, "step": s} for s in range(2)]
    artifact = {"artifact_path": "out", "is_dir": False, "staged": False}
    write_backlog(backlog, header, [
        ("params", {"params": {"lr": "0.1"}}),
        ("metrics", {"metrics": metrics}),
        ("tags", {"tags": {"phase": "late"}}),
        ("artifact", {"local_path": str(kept), **artifact}),
        ("artifact", {"local_path": str(tmp_path / "gone.json"), **artifact}),
        ("terminate", {"status": "FAILED", "end_time": 2}),
    ])  # fmt: skip
    uri = f"sqlite:///{tmp_path / 'replay' / 'mlflow.db'}"
    with pytest.warns(TrackingWarning, match="gone.json no longer exists"):
        assert cli_main(["tracking", "replay", str(backlog), "--tracking-uri", uri]) == 0
    (run_id,) = capsys.readouterr().out.strip().split(": ")[-1].split(", ")
    client = _client(uri)
    run = client.get_run(run_id)
    assert run.data.params == {"lr": "0.1"} and run.data.tags["phase"] == "late"
    assert run.data.tags["earlycrop.replayed_from"] == "0" * 32 and run.info.status == "FAILED"
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [(0, 2.0), (1, 1.0)]
    assert _artifact_paths(client, run_id) == {"out/kept.json"}


def test_cli_replay_of_a_malformed_backlog_is_a_one_line_error(tmp_path, capsys):
    backlog = tmp_path / BACKLOG_FILE_NAME
    backlog.write_text(json.dumps({"kind": "params", "params": {"a": "1"}}) + "\n")
    assert cli_main(["tracking", "replay", str(backlog), "--tracking-uri", f"sqlite:///{tmp_path}/x.db"]) == 2
    assert "record before any run header" in capsys.readouterr().err
    assert not (tmp_path / "x.db").exists()


# ------------------------------------------------------------------------------------------------
# Unreachable server at start
# ------------------------------------------------------------------------------------------------


def test_unreachable_server_fails_fast_with_clear_error(tmp_path):
    uri = f"http://127.0.0.1:{_free_port()}"  # nobody listens there
    t0 = time.monotonic()
    with pytest.raises(TrackingUnavailableError) as err:
        create_tracker(
            is_main_process=True, output_dir=tmp_path, tracking_uri=uri, experiment="e", run_name="r"
        )
    assert time.monotonic() - t0 < 15
    assert uri in str(err.value) and "unreachable" in str(err.value)
    assert not (tmp_path / "mlflow.db").exists()


def test_unreachable_server_error_names_the_config_key(tmp_path):
    uri = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(TrackingUnavailableError) as err:
        MLflowTracker(uri, "e", "r", output_dir=tmp_path, health_timeout=1.0)
    assert "tracking_fallback_local: true" in str(err.value) and "fallback_to_local" not in str(err.value)


def test_hanging_server_times_out(tmp_path):
    # accepts TCP connections (kernel backlog) but never answers
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        uri = f"http://127.0.0.1:{listener.getsockname()[1]}"
        t0 = time.monotonic()
        with pytest.raises(TrackingUnavailableError, match="unreachable"):
            MLflowTracker(uri, "e", "r", output_dir=tmp_path, health_timeout=1.0)
        assert time.monotonic() - t0 < 10


def test_unreachable_server_falls_back_to_local(tmp_path):
    uri = f"http://127.0.0.1:{_free_port()}"
    with pytest.warns(TrackingWarning, match="Falling back"):
        tracker = create_tracker(
            is_main_process=True,
            output_dir=tmp_path,
            tracking_uri=uri,
            experiment="e",
            run_name="r",
            fallback_to_local=True,
        )
    assert tracker.tracking_uri == default_tracking_uri(tmp_path)
    tracker.log_metrics({"loss": 1.0}, step=5)
    tracker.close()
    client = _client(default_tracking_uri(tmp_path))
    run = client.get_run(tracker.run_id)
    assert run.data.tags["earlycrop.tracking_fallback_from"] == uri
    assert [(m.step, m.value) for m in client.get_metric_history(tracker.run_id, "loss")] == [(5, 1.0)]


# ------------------------------------------------------------------------------------------------
# Real server
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow  # starting `mlflow server` takes ~20 s on a busy 2-core machine
def test_real_server_receives_run(mlflow_servers, tmp_path):
    mlflow_server = mlflow_servers.get()
    out = tmp_path / "run"
    tracker = create_tracker(
        is_main_process=True,
        output_dir=out,
        tracking_uri=mlflow_server.uri,
        experiment="server-exp",
        run_name="server-run",
        tags={"launcher": "pytest"},
    )
    tracker.log_params({"train": {"lr": 1e-3, "batch_size": 8}})
    for step in (0, 10, 20):
        tracker.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
    tracker.set_tags({"family": "llama"})
    tracker.log_dict({"a": 1}, "summary.json")
    tracker.log_figure(_figure(), "plots/kept.png")
    tracker.close()
    assert not (out / BACKLOG_FILE_NAME).exists()

    client = _client(mlflow_server.uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"train.lr": "0.001", "train.batch_size": "8"}
    assert run.data.tags["launcher"] == "pytest" and run.data.tags["family"] == "llama"
    assert [m.step for m in client.get_metric_history(tracker.run_id, "loss")] == [0, 10, 20]
    assert _artifact_paths(client, tracker.run_id) == {"summary.json", "plots/kept.png"}
    # proxied artifacts land in the server's --artifacts-destination, not in the run's output dir
    assert list((mlflow_server.root / "artifacts").rglob("summary.json"))


@pytest.mark.slow  # reuses the module's server when it runs after test_real_server_receives_run
def test_server_killed_mid_run_keeps_a_backlog(mlflow_servers, tmp_path):
    server = mlflow_servers.get()
    out = tmp_path / "run"
    tracker = create_tracker(
        is_main_process=True, output_dir=out, tracking_uri=server.uri, experiment="e", run_name="doomed"
    )
    run_id = tracker.run_id
    tracker.log_params({"early": 1})
    tracker.log_metrics({"loss": 2.0}, step=0)
    assert tracker.pending == 0

    server.kill()
    t0 = time.monotonic()
    with pytest.warns(TrackingWarning, match="retrying"):
        for step in (1, 2, 3):
            tracker.log_metrics({"loss": 2.0 - step / 2}, step=step)
        tracker.log_params({"late": 2})
        tracker.set_tags({"phase": "after-crash"})
        tracker.log_dict({"lost": True}, "late/summary.json")
    assert time.monotonic() - t0 < 15, "logging while the server is down must not stall training"
    assert tracker.pending >= 6
    with pytest.warns(TrackingWarning, match="replay"):
        tracker.close()

    backlog = out / BACKLOG_FILE_NAME
    records = [json.loads(line) for line in backlog.read_text().splitlines()]
    assert records[0]["kind"] == "run" and records[0]["run_id"] == run_id
    assert records[0]["tracking_uri"] == server.uri
    steps = [m["step"] for r in records if r["kind"] == "metrics" for m in r["metrics"]]
    assert steps == [1, 2, 3]
    assert {"kind": "params", "params": {"late": "2"}} in records
    assert {"kind": "tags", "tags": {"phase": "after-crash"}} in records
    (artifact,) = [r for r in records if r["kind"] == "artifact"]
    assert artifact["artifact_path"] == "late" and Path(artifact["local_path"]).is_file()
    assert records[-1]["kind"] == "terminate" and records[-1]["status"] == "FINISHED"

    # what was logged before the crash is in the server's database
    dead_store = _client(f"sqlite:///{server.db}")
    run = dead_store.get_run(run_id)
    assert run.data.params == {"early": "1"}
    assert [m.step for m in dead_store.get_metric_history(run_id, "loss")] == [0]

    # the backlog replays (here into a fresh local store: a new run of the same experiment)
    replay_uri = f"sqlite:///{tmp_path / 'replay.db'}"
    (new_run_id,) = replay_backlog(backlog, replay_uri)
    replayed = _client(replay_uri).get_run(new_run_id)
    assert replayed.data.params == {"late": "2"}
    assert replayed.data.tags["earlycrop.replayed_from"] == run_id
    assert replayed.info.status == "FINISHED"
    assert [m.step for m in _client(replay_uri).get_metric_history(new_run_id, "loss")] == [1, 2, 3]
    assert _artifact_paths(_client(replay_uri), new_run_id) == {"late/summary.json"}
