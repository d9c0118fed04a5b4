"""The final model as an MLflow Logged Model (issue 15 item 7): the transformers flavor where plain transformers
loads the folder, a python model through earlycrop.from_pretrained where it cannot, registration by name, and
a model MLflow cannot package or an outage never stopping a run."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import earlycrop
from launch.cli import main
from pipeline import data as data_lib
from pipeline.tracking import BACKLOG_FILE_NAME, MLflowTracker, TrackingWarning, default_tracking_uri, replay_backlog, write_backlog
from pipeline.tracking.models import log_logged_model, tracking_uri_for_mlflow

TEXT = "The minister said the talks would continue next week."


@pytest.fixture(autouse=True)
def _no_ambient_tracking_env(monkeypatch):
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def tokenizer():
    return data_lib.train_tokenizer(list(data_lib.load_documents("gensim:lee")["text"])[:100], 320)


def _pruned_folder(model, tokenizer, folder: Path, layout: str) -> Path:
    """`model` with half its heads and neurons cut, saved with earlycrop and the tokenizer; the first layer scores
    higher, so a global layout keeps more of it."""
    gen = torch.Generator().manual_seed(0)
    layers = earlycrop.get_adapter(model).layers(model)
    scores = earlycrop.Scores(heads=[torch.rand(l.num_heads, generator=gen) + 2 * (i == 0) for i, l in enumerate(layers)],
                              neurons=[torch.rand(l.intermediate_size, generator=gen) + 2 * (i == 0) for i, l in enumerate(layers)])
    result = earlycrop.prune(model, earlycrop.make_plan(model, scores, earlycrop.SelectionConfig(0.5, 0.5, layout)))
    assert not result.plain_loadable, "these folders need earlycrop's loader"
    earlycrop.save_pretrained(model, folder, tokenizer)
    return folder


def _logits(model, tokenizer, text: str = TEXT) -> torch.Tensor:
    with torch.no_grad():
        return model(**tokenizer(text, return_tensors="pt")).logits[0]


def _models_of(uri: str, run_id: str) -> list:
    with tracking_uri_for_mlflow(uri):
        run = MlflowClient(uri).get_run(run_id)
        return mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list",
                                           filter_string=f"source_run_id = '{run_id}'")


# ------------------------------------------------------------------ a run: plain-loadable Llama, registered


@pytest.fixture(scope="module")
def uniform_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uniform") / "run"
    assert main(["run", "configs/ci_tiny.yaml", f"output_dir={out}", "train.max_steps=2", "train.checkpoint_every=0",
                 "register_model=tiny-llama"]) == 0
    return out


def test_a_plain_loadable_run_logs_a_transformers_model_that_loads_back(uniform_run):
    info = json.loads((uniform_run / "run_info.json").read_text())
    uri, run_id = info["tracking_uri"], info["run_id"]
    (logged,) = _models_of(uri, run_id)
    assert logged.name == "model" and str(logged.status) == "READY" and logged.tags["earlycrop.loader"] == "transformers"
    client = MlflowClient(uri)
    (output,) = client.get_run(run_id).outputs.model_outputs
    assert output.model_id == logged.model_id and output.step == 2, "linked to the run at its final step"
    assert {m.key for m in logged.metrics} >= {"val/loss", "train/loss"}, "the final metrics are the model's"
    with tracking_uri_for_mlflow(uri):
        loaded = mlflow.transformers.load_model(f"models:/{logged.model_id}", return_type="components")
    ours = earlycrop.from_pretrained(uniform_run / "model").eval()
    saved_tokenizer = AutoTokenizer.from_pretrained(uniform_run / "model")
    assert loaded["tokenizer"](TEXT)["input_ids"] == saved_tokenizer(TEXT)["input_ids"]
    torch.testing.assert_close(_logits(loaded["model"].eval(), loaded["tokenizer"]), _logits(ours, saved_tokenizer))
    (version,) = client.search_model_versions("name='tiny-llama'")
    assert int(version.version) == 1 and version.source == f"models:/{logged.model_id}"
    assert not [a for a in client.list_artifacts(run_id) if a.path == "model"], "no second copy as plain artifacts"


# ------------------------------------------------------------------ folders plain transformers cannot load: pyfunc


def test_a_global_layout_is_a_python_model_that_loads_through_earlycrop(tmp_path, tokenizer):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    folder = _pruned_folder(model, tokenizer, tmp_path / "global", "global")
    out = tmp_path / "run"
    tracker = MLflowTracker(default_tracking_uri(out), "models", "global", output_dir=out)
    tracker.log_model_dir(folder, "model", step=7)
    tracker.close()
    (logged,) = _models_of(tracker.tracking_uri, tracker.run_id)
    assert logged.tags["earlycrop.loader"] == "earlycrop"
    with tracking_uri_for_mlflow(tracker.tracking_uri):
        pyfunc = mlflow.pyfunc.load_model(f"models:/{logged.model_id}")
    ours = earlycrop.from_pretrained(folder).eval()
    torch.testing.assert_close(_logits(pyfunc.unwrap_python_model().model, tokenizer), _logits(ours, tokenizer))
    (row,) = pyfunc.predict([TEXT])
    torch.testing.assert_close(torch.tensor(row), _logits(ours, tokenizer)[-1])


def test_a_head_cut_gpt2_in_a_backlog_replays_as_a_python_model(tmp_path, tokenizer):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_inner=48, n_positions=64))
    folder = _pruned_folder(model, tokenizer, tmp_path / "gpt2", "uniform")
    backlog = tmp_path / BACKLOG_FILE_NAME
    header = {"run_id": "0" * 32, "tracking_uri": "http://127.0.0.1:9", "experiment": "lost", "run_name": "gpt2"}
    write_backlog(backlog, header, [("model", {"local_path": str(folder), "artifact_path": "model",
                                               "registered_model_name": "gpt2-cut", "step": 3})])
    uri = f"sqlite:///{tmp_path / 'replay' / 'mlflow.db'}"
    (run_id,) = replay_backlog(backlog, uri)
    (logged,) = _models_of(uri, run_id)
    with tracking_uri_for_mlflow(uri):
        pyfunc = mlflow.pyfunc.load_model("models:/gpt2-cut/1")
    assert pyfunc.metadata.model_id == logged.model_id
    torch.testing.assert_close(_logits(pyfunc.unwrap_python_model().model, tokenizer),
                               _logits(earlycrop.from_pretrained(folder).eval(), tokenizer))


# ------------------------------------------------------------------ failures: warn and keep the files, or retry


def test_a_folder_mlflow_cannot_package_goes_in_as_plain_artifacts(tmp_path):
    folder = tmp_path / "saved"
    folder.mkdir()
    (folder / "config.json").write_text('{"n_layer": 2}')  # no model_type: not a Hugging Face model
    out = tmp_path / "run"
    tracker = MLflowTracker(default_tracking_uri(out), "models", "odd", output_dir=out)
    with pytest.warns(TrackingWarning, match="as plain run artifacts under model/"):
        tracker.log_model_dir(folder)
    assert tracker.pending == 0
    tracker.close()
    client = MlflowClient(tracker.tracking_uri)
    assert [a.path for a in client.list_artifacts(tracker.run_id, "model")] == ["model/config.json"]
    assert client.get_run(tracker.run_id).info.status == "FINISHED" and not _models_of(tracker.tracking_uri, tracker.run_id)


class _DownClient:
    """A client whose server stopped answering: every call fails as mlflow's REST client fails."""

    def __init__(self, uri: str) -> None:
        self.tracking_uri, self.artifacts = uri, []

    def get_run(self, run_id):
        raise MlflowException("API request to endpoint /api/2.0/mlflow/runs/get failed: connection refused")

    def log_artifacts(self, *args) -> None:
        self.artifacts.append(args)


def test_an_outage_raises_for_a_retry_instead_of_falling_back(tmp_path):
    folder = tmp_path / "saved"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama", "architectures": ["LlamaForCausalLM"]}')
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nobody listens there once closed
    down = _DownClient(f"http://127.0.0.1:{port}")
    payload = {"local_path": str(folder), "artifact_path": "model", "registered_model_name": None, "step": 0}
    with pytest.raises(MlflowException, match="connection refused"):
        log_logged_model(down, "r", payload)
    assert down.artifacts == [], "an outage is retried whole later, not replaced by plain files"
    local = _DownClient(default_tracking_uri(tmp_path))  # a local store answers: the failure is the model's
    with pytest.warns(TrackingWarning, match="plain run artifacts"):
        log_logged_model(local, "r", payload)
    assert local.artifacts == [("r", str(folder), "model")]
