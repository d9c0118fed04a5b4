"""Never lose what a user had (issue 12): `earlycrop prune --out` and a run's output_dir.

The prune cases run the real command line in this process (`launch.cli.main`) on a tiny Llama; the
building blocks the training job uses (output_dir checks, run identity, own checkpoints) are unit-tested.

    python -m pytest -q tests/test_outputs.py
"""

from __future__ import annotations

import errno
import hashlib
import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import SafetensorError
from transformers import LlamaConfig, LlamaForCausalLM

import earlycrop
from launch.cli import main, print_run_summary
from pipeline import data as data_lib
from pipeline.config import load_config
from pipeline.outputs import (
    IDENTITY_FILE,
    RESUMABLE_FIELDS,
    check_prune_out,
    check_resume_identity,
    check_run_output_dir,
    disk_errors,
    own_checkpoints,
    read_identity,
    recover_folder,
    run_identity,
    staged_folder,
    write_identity,
)

CONFIG = "configs/ci_tiny.yaml"


def _tree(folder: Path) -> dict[str, str]:
    """Every file under `folder` with the hash of its bytes: equal trees mean nothing was touched."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def _hidden_siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


# ---------------------------------------------------------------- `earlycrop prune` end to end


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("outputs")
    texts = list(data_lib.load_documents("gensim:lee")["text"])[:60]
    tok = data_lib.train_tokenizer(texts, 300)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    earlycrop.save_pretrained(model, root / "model", tok)
    (root / "calib.txt").write_text("\n\n".join(texts))
    return root


def _prune(model_dir: Path, out: Path, *extra: str) -> int:
    return main(["prune", "--model", str(model_dir / "model"), "--data", str(model_dir / "calib.txt"), "--criterion",
                 "magnitude", "--mlp", "0.5", "--batches", "1", "--batch-size", "2", "--seq-len", "16", "--out", str(out), *extra])


def test_prune_writes_into_place_and_refuses_to_replace_without_overwrite(model_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "pruned"
    assert _prune(model_dir, out) == 0
    assert {"config.json", "model.safetensors", "plan.json", "scores.safetensors", "tokenizer.json"} <= set(_tree(out))
    assert _hidden_siblings(out) == []  # the staging folder became `out`
    before = _tree(out)
    capsys.readouterr()
    assert _prune(model_dir, out, "--heads", "0.5") == 2
    assert "is not empty: pass --overwrite to replace it" in capsys.readouterr().err
    assert _tree(out) == before


def test_overwrite_replaces_every_old_file_and_leaves_no_stale_index(model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "pruned"
    assert _prune(model_dir, out) == 0
    stale = ["model.safetensors.index.json", "model-00001-of-00002.safetensors", "vocab.txt"]  # a sharded save before
    for name in stale:
        (out / name).write_text("{}")
    assert _prune(model_dir, out, "--mlp", "0.25", "--overwrite") == 0
    assert not any((out / name).exists() for name in stale)
    assert earlycrop.Plan.load(out / "plan.json").counts()["neurons"] == [48, 48]  # the new plan, 25% removed
    earlycrop.from_pretrained(out)  # loads: no index.json points at shards that are gone
    assert _hidden_siblings(out) == []


@pytest.mark.parametrize("previous", [False, True], ids=["no_previous_out", "previous_out_kept"])
def test_a_failed_save_leaves_no_out_or_the_previous_one(model_dir: Path, tmp_path: Path, monkeypatch, capsys,
                                                          previous: bool) -> None:
    out = tmp_path / "pruned"
    if previous:
        assert _prune(model_dir, out) == 0
    before = _tree(out) if previous else None

    def fail(self, path) -> None:
        raise OSError(f"simulated failure writing {path}")

    monkeypatch.setattr(earlycrop.Plan, "save", fail)
    capsys.readouterr()
    assert _prune(model_dir, out, "--overwrite") == 2
    assert "simulated failure writing" in capsys.readouterr().err
    assert (_tree(out) if out.exists() else None) == before
    assert _hidden_siblings(out) == []  # the staging folder is gone as well


def test_disk_full_while_saving_is_one_line_with_the_sizes(model_dir: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    def full(self, path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(earlycrop.Plan, "save", full)
    out = tmp_path / "pruned"
    assert _prune(model_dir, out) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("earlycrop")]  # not the progress bars
    assert len(lines) == 1 and "Traceback" not in err
    assert lines[0].startswith(f"earlycrop: error: no space left on device writing {out}: needs about ")
    assert lines[0].endswith(" free") and not out.exists()


def test_a_killed_save_is_cleaned_up_by_the_next_one(model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "pruned"
    stale = tmp_path / ".pruned.earlycrop-staging-999999"  # what `kill -9` during a save leaves behind
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    assert _prune(model_dir, out) == 0
    assert _hidden_siblings(out) == [] and (out / "plan.json").is_file()


def test_out_equal_to_the_model_leaves_the_model_untouched(model_dir: Path, capsys) -> None:
    before = _tree(model_dir / "model")
    assert _prune(model_dir, model_dir / "model", "--overwrite") == 2
    assert "would overwrite the input model" in capsys.readouterr().err
    assert _tree(model_dir / "model") == before


# ---------------------------------------------------------------- the building blocks


@pytest.mark.parametrize(("out", "overwrite", "message"), [
    ("model", False, r"is the --model folder"),
    ("link", True, r"is the --model folder"),
    ("model/sub", False, r"is inside --model"),
    (".", False, r"contains --model"),
    ("file.txt", False, r"is an existing file"),
    ("old_model", False, r"is not empty: pass --overwrite"),
    ("notes", True, r"holds no model"),
    ("new", False, None),
    ("empty", False, None),
    ("old_model", True, None),
])
def test_check_prune_out(tmp_path: Path, monkeypatch, out: str, overwrite: bool, message: str | None) -> None:
    monkeypatch.chdir(tmp_path)
    for folder, files in {"model": ["config.json"], "old_model": ["config.json"], "notes": ["todo.txt"], "empty": []}.items():
        Path(folder).mkdir()
        for name in files:
            (Path(folder) / name).write_text("{}")
    Path("file.txt").write_text("x")
    Path("link").symlink_to("model")
    if message is None:
        check_prune_out(Path(out), Path("model"), overwrite)
    else:
        with pytest.raises(ValueError, match=message):
            check_prune_out(Path(out), Path("model"), overwrite)


def test_staged_folder_commits_only_on_success(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(RuntimeError), staged_folder(out) as staging:
        (staging / "a").write_text("new")
        raise RuntimeError("failed half-way")
    assert not out.exists() and _hidden_siblings(out) == []
    with staged_folder(out) as staging:
        (staging / "a").write_text("first")
    with staged_folder(out) as staging:
        (staging / "b").write_text("second")
    assert _tree(out).keys() == {"b"} and _hidden_siblings(out) == []


@pytest.mark.parametrize("out_exists", [False, True], ids=["killed_between_renames", "killed_while_deleting"])
def test_recover_folder_puts_the_previous_folder_back_or_finishes(tmp_path: Path, out_exists: bool) -> None:
    out = tmp_path / "out"
    aside = tmp_path / ".out.earlycrop-old-4242"
    aside.mkdir()
    (aside / "old").write_text("previous")
    if out_exists:
        out.mkdir()
        (out / "new").write_text("committed")
    recover_folder(out)
    assert _tree(out).keys() == ({"new"} if out_exists else {"old"})
    assert _hidden_siblings(out) == []


@pytest.mark.parametrize(("error", "reason"), [
    (OSError(errno.ENOSPC, "No space left on device"), "no space left on device"),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), "disk quota exceeded"),
    (SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"), "no space left on device"),
])
def test_disk_errors_name_the_path_and_the_sizes(tmp_path: Path, error: Exception, reason: str) -> None:
    with pytest.raises(OSError, match=rf"^{reason} writing {re.escape(str(tmp_path))}/x: needs about 2\.0 GB, [\d.]+ [GM]B free$"):
        with disk_errors(tmp_path / "x", 2_000_000_000):
            raise error


TORCH_WRITER_FULL = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")  # torch.save, disk full


@pytest.mark.parametrize(("free", "translated"), [(10, True), (10**12, False)])
def test_disk_errors_read_torch_writer_failures_by_the_free_space(tmp_path: Path, monkeypatch, free: int,
                                                                   translated: bool) -> None:
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(total=free, used=0, free=free))
    with pytest.raises(OSError if translated else RuntimeError) as raised, disk_errors(tmp_path, 5_000):
        raise TORCH_WRITER_FULL
    assert (str(raised.value) == f"no space left on device writing {tmp_path}: needs about 5 kB, 0 kB free") is translated


@pytest.mark.parametrize("error", [PermissionError(errno.EACCES, "Permission denied"), SafetensorError("invalid dtype")])
def test_disk_errors_leave_other_errors_alone(tmp_path: Path, error: Exception) -> None:
    with pytest.raises(type(error)) as raised, disk_errors(tmp_path, 1):
        raise error
    assert raised.value is error


RUN_FILES = ["run_info.json", "summary.json", "plan.json", "scores.safetensors", "checkpoints/step_00000004/x",
             "model/model.safetensors"]
USER_FILES = ["mlflow.db", "tracking_backlog.jsonl", "notes.md", "data/train.txt"]


def _fill(out: Path, names: list[str]) -> None:
    for name in names:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(name)


@pytest.mark.parametrize(("files", "resume", "overwrite", "message"), [
    ([], False, False, None),
    (USER_FILES, False, False, None),
    (RUN_FILES, False, False, r"holds a previous run \(run_info\.json, summary\.json, checkpoints, model, plan\.json, "
                              r"scores\.safetensors\): use --resume to continue it or --overwrite to replace it"),
    (["plan.json"], False, False, r"holds a previous run \(plan\.json\)"),
    (RUN_FILES, True, False, None),
    (RUN_FILES, True, True, r"--resume continues the run .* --overwrite replaces it: pass one of them"),
])
def test_check_run_output_dir(tmp_path: Path, files: list[str], resume: bool, overwrite: bool, message: str | None) -> None:
    _fill(tmp_path, files)
    before = _tree(tmp_path)
    if message is None:
        check_run_output_dir(tmp_path, resume, overwrite)
    else:
        with pytest.raises(ValueError, match=message):
            check_run_output_dir(tmp_path, resume, overwrite)
    assert _tree(tmp_path) == before


@pytest.mark.parametrize("from_scratch", [True, False])
def test_overwrite_removes_only_what_earlycrop_wrote(tmp_path: Path, from_scratch: bool) -> None:
    _fill(tmp_path, RUN_FILES + USER_FILES + ["tokenizer/tokenizer.json"])
    cfg = load_config(CONFIG) if from_scratch else load_config(CONFIG, ["model.family=null", "model.name_or_path=m"])
    write_identity(tmp_path, run_identity(cfg))
    check_run_output_dir(tmp_path, resume=False, overwrite=True)
    kept = set(USER_FILES) | (set() if from_scratch else {"tokenizer/tokenizer.json"})  # only a from-scratch run trains one
    assert set(_tree(tmp_path)) == kept
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_overwrite_goes_ahead_over_an_unreadable_identity(tmp_path: Path) -> None:
    _fill(tmp_path, RUN_FILES + ["tokenizer/tokenizer.json"])
    (tmp_path / IDENTITY_FILE).write_text("{cut")
    check_run_output_dir(tmp_path, resume=False, overwrite=True)
    assert set(_tree(tmp_path)) == {"tokenizer/tokenizer.json"}  # not known to be the run's own: kept


def test_run_identity_ignores_only_the_resumable_fields() -> None:
    base = run_identity(load_config(CONFIG))
    assert set(RESUMABLE_FIELDS) <= set(_all_keys(load_config(CONFIG)))  # the list names real fields
    assert not set(RESUMABLE_FIELDS) & set(base)
    resumable = ["train.max_steps=40", "train.eval_every=3", "tracking=false", "tracking_uri=http://127.0.0.1:5000",
                 "output_dir=/elsewhere", "run_name=again", "train.keep_checkpoints=5"]
    assert run_identity(load_config(CONFIG, resumable)) == base
    for change in ("prune.mlp=0.25", "seed=1", "train.lr=1e-3", "model.init.hidden_size=64", "data.source=gensim:wiki"):
        assert run_identity(load_config(CONFIG, [change]))["fingerprint"] != base["fingerprint"], change


def _all_keys(cfg) -> list[str]:
    def walk(value, prefix: str):
        if isinstance(value, dict) and value:
            for key, sub in value.items():
                yield from walk(sub, f"{prefix}{key}.")
        else:
            yield prefix.removesuffix(".")

    return list(walk(cfg.model_dump(mode="json"), ""))


@pytest.mark.parametrize(("changes", "message"), [
    (["prune.mlp=0.3"], r"^--resume: this run was started with prune\.mlp=0\.5, not 0\.3; start a new output_dir or --overwrite$"),
    (["prune.mlp=0.3", "seed=4"], r"started with prune\.mlp=0\.5, not 0\.3; seed=0, not 4; start a new"),
    (["seed=1", "train.lr=1", "prune.heads=0", "prune.mlp=0"], r"prune\.heads=0\.5, not 0\.0; prune\.mlp=0\.5, not 0\.0; seed=0, not 1 \(and 1 more\); start a new"),
])
def test_check_resume_identity_names_what_changed(changes: list[str], message: str) -> None:
    saved = run_identity(load_config(CONFIG))
    check_resume_identity(saved, run_identity(load_config(CONFIG, ["train.max_steps=50"])))  # may change on resume
    with pytest.raises(ValueError, match=message):
        check_resume_identity(saved, run_identity(load_config(CONFIG, changes)))


def test_identity_round_trips_and_refuses_a_corrupt_file(tmp_path: Path) -> None:
    assert read_identity(tmp_path) is None  # a run from before identities were saved
    identity = run_identity(load_config(CONFIG))
    write_identity(tmp_path / "run", identity)
    assert read_identity(tmp_path / "run") == identity
    (tmp_path / "run" / IDENTITY_FILE).write_text("{cut")
    with pytest.raises(ValueError, match=rf"{IDENTITY_FILE} is not valid JSON"):
        read_identity(tmp_path / "run")


def test_own_checkpoints_lists_this_runs_checkpoints_by_step(tmp_path: Path) -> None:
    mine = run_identity(load_config(CONFIG))
    other = run_identity(load_config(CONFIG, ["seed=7"]))
    for name, identity in [("step_00000010", mine), ("step_00000002", mine), ("step_00000005", other),
                           ("step_00000007", None), (".tmp-step_00000012", mine), ("step_x", mine)]:
        (tmp_path / name).mkdir()
        if identity is not None:
            write_identity(tmp_path / name, identity)
    (tmp_path / "step_00000009").mkdir()
    (tmp_path / "step_00000009" / IDENTITY_FILE).write_text("not json")
    assert [p.name for p in own_checkpoints(tmp_path, mine, "step_")] == ["step_00000002", "step_00000010"]
    assert [p.name for p in own_checkpoints(tmp_path, other, "step_")] == ["step_00000005"]
    assert own_checkpoints(tmp_path / "missing", mine, "step_") == []


RUN_PAGE = "/#/experiments/7/runs/abc?workflowType=machine_learning"  # the run, in the model-training view


@pytest.mark.parametrize(("uri", "experiment_id", "expected"), [
    ("http://127.0.0.1:5000/", "7", [f"view it: open http://127.0.0.1:5000{RUN_PAGE} in a browser"]),
    ("sqlite:////runs/x/mlflow.db", "7", ["view it: mlflow ui --host 127.0.0.1 --workers 1 --backend-store-uri "
                                          "sqlite:////runs/x/mlflow.db", f"then open http://127.0.0.1:5000{RUN_PAGE}"]),
    ("http://127.0.0.1:5000", None, ["view it: open http://127.0.0.1:5000 in a browser"]),  # a run_info.json from before
])
def test_run_summary_shows_a_command_that_works(tmp_path: Path, capsys, uri: str, experiment_id, expected) -> None:
    info = {"run_id": "abc", "tracking_uri": uri, **({"experiment_id": experiment_id} if experiment_id else {})}
    (tmp_path / "run_info.json").write_text(json.dumps(info))
    summary = {"params_dense": 10, "params_final": 5, "val_loss": 1.0, "val_perplexity": 2.7, "steps": 3}
    print_run_summary(SimpleNamespace(output_dir=str(tmp_path)), summary)
    assert capsys.readouterr().out.splitlines()[-len(expected):] == expected
