"""The final model as an MLflow Logged Model (its own page, `models:/<id>` URI, optional registry version).

Where plain transformers loads the saved folder (`earlycrop_layout.plain_loadable` in its config.json, or no
earlycrop layout at all), the model goes in with the transformers flavor, so `mlflow.transformers.load_model`
gives the model and tokenizer back. Where it cannot (a global layout, a GPT-2 or BERT head cut), it goes in as a
python model (earlycrop_pyfunc.py) that loads through `earlycrop.from_pretrained`.

Logging a model must never stop a run: when the flavor cannot package the folder, the folder is logged as plain
run artifacts with a warning. Only an outage (an HTTP server that does not answer) raises, so that the tracker
keeps the operation and retries it like any other.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

from .interface import TrackingUnavailableError, TrackingWarning, is_permanent
from .uris import check_server_reachable
from .values import short_error

PYFUNC_CODE = Path(__file__).with_name("earlycrop_pyfunc.py")
# the pipeline task (and Auto class) of a model class, by the end of its name
TASKS = {
    "ForCausalLM": ("text-generation", "AutoModelForCausalLM"),
    "LMHeadModel": ("text-generation", "AutoModelForCausalLM"),
    "ForSequenceClassification": ("text-classification", "AutoModelForSequenceClassification"),
    "ForMaskedLM": ("fill-mask", "AutoModelForMaskedLM"),
    "ForTokenClassification": ("token-classification", "AutoModelForTokenClassification"),
}


def transformers_task(folder: Path) -> tuple[str, str] | None:
    """(pipeline task, Auto class) when plain transformers loads `folder` as a pipeline model, else None
    (earlycrop's loader is needed). A folder that is no Hugging Face model raises ValueError."""
    config = json.loads((folder / "config.json").read_text())
    if not isinstance(config, dict) or "model_type" not in config:
        raise ValueError(f"{folder}/config.json has no model_type: not a Hugging Face model folder")
    if not (config.get("earlycrop_layout") or {}).get("plain_loadable", True):
        return None
    architecture = (config.get("architectures") or [""])[0]
    return next((task for end, task in TASKS.items() if architecture.endswith(end)), None)


@contextmanager
def tracking_uri_for_mlflow(uri: str) -> Iterator[None]:
    """mlflow's model logging reads the process-wide tracking URI (the tracker itself never sets it): point it
    at this run's store for the call, then put back what was there."""
    import mlflow

    before = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)


def requirements(earlycrop_loader: bool) -> list[str]:
    """Pinned from this environment: giving them skips mlflow's inference, which loads the model in a subprocess."""
    names = ["torch", "transformers", *(["earlycrop"] if earlycrop_loader else [])]
    return [f"{name}=={metadata.version(name).split('+')[0]}" for name in names]


def log_transformers(folder: Path, task: tuple[str, str], **common: Any) -> Any:
    """The transformers flavor, from the model and tokenizer loaded back from `folder` (mlflow's own path for a
    checkpoint folder fails under transformers 5; the copy in memory lasts for this call)."""
    import huggingface_hub
    import mlflow
    import transformers

    auto = getattr(transformers, task[1])
    model = auto.from_pretrained(folder, dtype="auto")
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    card = huggingface_hub.ModelCard(f"---\ntags: [earlycrop]\n---\nPruned and trained with earlycrop ({type(model).__name__}).")
    # the card is given: mlflow would otherwise look the folder's path up on the Hugging Face hub
    return mlflow.transformers.log_model({"model": model, "tokenizer": tokenizer}, task=task[0], model_card=card,
                                         pip_requirements=requirements(False), **common)


def log_earlycrop(folder: Path, **common: Any) -> Any:
    """The python model that loads `folder` through earlycrop.from_pretrained (models from code)."""
    import mlflow
    from mlflow.models import Model

    return Model.log(None, flavor=mlflow.pyfunc, python_model=str(PYFUNC_CODE), artifacts={"model": str(folder)},
                     pip_requirements=requirements(True), flavor_name="pyfunc.ModelFromCode", **common)


def log_logged_model(client: Any, run_id: str, payload: Mapping[str, Any]) -> None:
    """The `model` operation: the folder as a Logged Model of run `run_id` (linked to the metrics of `step`),
    registered under `registered_model_name` when one is given; see the module docstring for the fallback."""
    folder, name = Path(payload["local_path"]), payload["artifact_path"]
    try:
        info = log_model_folder(client, run_id, folder, name, int(payload.get("step") or 0))
    except Exception as exc:  # noqa: BLE001 — decide below: retry an outage, keep the files otherwise
        if not is_permanent(exc) and not answers(client.tracking_uri):
            raise
        warnings.warn(f"tracking: could not log {folder} as an MLflow model ({short_error(exc)}); logging the "
                      f"folder as plain run artifacts under {name}/ instead", TrackingWarning, stacklevel=2)
        client.log_artifacts(run_id, str(folder), name)
        return
    if payload.get("registered_model_name"):
        register(client.tracking_uri, info.model_uri, payload["registered_model_name"])


def log_model_folder(client: Any, run_id: str, folder: Path, name: str, step: int) -> Any:
    """Create the Logged Model in the run's experiment (mlflow would use the process's active experiment) and
    log the folder into it; a failed attempt deletes what it created, so a retry leaves one model."""
    task = transformers_task(folder)
    run = client.get_run(run_id)
    flavor = "transformers" if task else "earlycrop"
    logged = client.create_logged_model(run.info.experiment_id, name=name, source_run_id=run_id,
                                        params=dict(run.data.params), tags={"earlycrop.loader": flavor})
    common = {"name": name, "run_id": run_id, "model_id": logged.model_id, "step": step}
    try:
        with tracking_uri_for_mlflow(client.tracking_uri):
            return log_transformers(folder, task, **common) if task else log_earlycrop(folder, **common)
    except BaseException:
        try:
            client.delete_logged_model(logged.model_id)
        except Exception:  # noqa: BLE001 — the store is the problem; the original error says more
            pass
        raise


def register(uri: str, model_uri: str, name: str) -> None:
    """A new version of registered model `name`; a failure warns (the logged model is there either way)."""
    import mlflow

    try:
        with tracking_uri_for_mlflow(uri):
            mlflow.register_model(model_uri, name)
    except Exception as exc:  # noqa: BLE001 — never raise into the run
        warnings.warn(f"tracking: could not register {model_uri} as {name!r}: {short_error(exc)}", TrackingWarning,
                      stacklevel=3)


def answers(uri: str) -> bool:
    """Whether the store is there (always, for a local one): if not, a failure was an outage, worth a retry."""
    try:
        check_server_reachable(uri)
    except TrackingUnavailableError:
        return False
    return True
