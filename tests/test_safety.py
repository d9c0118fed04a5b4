"""Safety (issue 6, item 6): weights load only through safetensors (or `torch.load(weights_only=True)`), remote
code runs only when a config asks for it, and the MLflow server commands we show bind to loopback.

    python -m pytest -q tests/test_safety.py
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

import earlycrop

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = [ROOT / name for name in ("earlycrop", "pipeline", "launch", "benchmarks")]  # what users run
EVERY_INTERFACE = re.compile(r"""(--host[ =]|host\s*=\s*["']?)(0\.0\.0\.0(?!\d)|::(?![\w:]))""")
MLFLOW_COMMAND = re.compile(r"\bmlflow\s+(server|ui)\s+-")  # the command with its flags, not prose naming it


def _files(roots: list[Path], *suffixes: str) -> list[Path]:
    found = []
    for root in roots:
        if root.is_file():
            found.append(root)
        elif root.is_dir():
            found += [p for p in sorted(root.rglob("*")) if p.is_file() and p.suffix in suffixes and "__pycache__" not in p.parts]
    return found


def _calls(text: str, name: str) -> list[str]:
    """The full text of every call `name(...)` (brackets balanced, so multi-line calls are whole)."""
    calls = []
    for match in re.finditer(re.escape(name) + r"\(", text):
        depth, i = 0, match.end() - 1
        while i < len(text):
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            if depth == 0:
                break
            i += 1
        calls.append(text[match.start() : i + 1])
    return calls


def test_the_tree_is_scanned():
    sources = _files(SHIPPED, ".py")
    assert len(sources) > 15 and ROOT / "earlycrop" / "serialization.py" in sources


def test_no_unsafe_unpickling_in_shipped_code():
    offenders = []
    for path in _files(SHIPPED, ".py"):
        text = path.read_text()
        offenders += [f"{path.relative_to(ROOT)}: {c}" for c in _calls(text, "torch.load") if "weights_only=True" not in c]
        offenders += [f"{path.relative_to(ROOT)}: {c}" for name in ("pickle.load", "pickle.loads", "joblib.load") for c in _calls(text, name)]
        offenders += [f"{path.relative_to(ROOT)}: allow_pickle=True" for _ in re.finditer(r"allow_pickle\s*=\s*True", text)]
    assert not offenders, "unpickling outside weights_only / the restricted gensim unpickler:\n" + "\n".join(offenders)


def test_remote_code_never_runs():
    """Wherever `trust_remote_code` is passed it is False, and no config can switch it on."""
    for path in _files(SHIPPED, ".py"):
        for value in re.findall(r"trust_remote_code\s*=\s*([\w.]+)", path.read_text()):
            assert value == "False", f"{path.relative_to(ROOT)}: trust_remote_code={value}"
    from pipeline.config import ModelConfig

    with pytest.raises(ValueError, match="trust_remote_code"):
        ModelConfig(family="llama", trust_remote_code=True)


def test_mlflow_server_commands_bind_to_loopback():
    docs = [ROOT / "README.md", ROOT / "docs", ROOT / "launch", ROOT / "pipeline", ROOT / "configs", ROOT / "Dockerfile", ROOT / ".ci"]
    shown = 0
    for path in _files(docs, ".md", ".py", ".yaml", ".sh", ".txt", ""):
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if MLFLOW_COMMAND.search(line):
                shown += 1
                assert "--host 127.0.0.1" in line, f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
            assert not EVERY_INTERFACE.search(line), f"{path.relative_to(ROOT)}:{number} binds every interface: {line.strip()}"
    assert shown >= 1  # the CLI's `mlflow ui --host 127.0.0.1 ...` hint at least
    # servers the tests start (a list of arguments) bind to loopback too
    for path in _files([ROOT / "tests"], ".py"):
        for host in re.findall(r"[\"']--host[\"']\s*,\s*[\"']([^\"']+)[\"']", path.read_text()):
            assert host == "127.0.0.1", f"{path.relative_to(ROOT)}: --host {host}"


# ---------------------------------------------------------------- loading never unpickles


class _Bomb:
    """Unpickling this creates a file: proof that a pickle was executed."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


def _model_folder(path: Path) -> Path:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32))
    return earlycrop.save_pretrained(model, path)


def test_a_folder_with_only_pytorch_model_bin_is_refused_unopened(tmp_path):
    folder = _model_folder(tmp_path / "bin_only")
    sentinel = tmp_path / "PICKLE_RAN"
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Bomb(sentinel)))
    with pytest.raises(FileNotFoundError, match=r"bin_only holds no \*\.safetensors weights: earlycrop loads safetensors only"):
        earlycrop.from_pretrained(folder)
    from launch.cli import main

    assert main(["prune", "--model", str(folder), "--data", "gensim:lee", "--out", str(tmp_path / "out")]) == 2
    assert not sentinel.exists()


def test_safetensors_win_over_a_pickle_beside_them(tmp_path):
    folder = _model_folder(tmp_path / "both")
    sentinel = tmp_path / "PICKLE_RAN"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Bomb(sentinel)))
    model = earlycrop.from_pretrained(folder)
    for key, value in load_file(folder / "model.safetensors").items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0)
    assert not sentinel.exists()


def test_remote_code_in_a_model_folder_is_not_run(tmp_path):
    """A folder whose config.json / tokenizer_config.json point at its own Python files (auto_map) loads with
    the plain transformers classes; the folder's code never runs."""
    from pipeline.data import load_documents, train_tokenizer
    from pipeline.modeling import load_model_tokenizer

    folder = _model_folder(tmp_path / "remote")
    train_tokenizer(list(load_documents("gensim:lee")["text"])[:50], 300).save_pretrained(folder)
    sentinel = tmp_path / "REMOTE_CODE_RAN"
    for name, key, value in (("config.json", "AutoConfig", "configuration_evil.EvilConfig"),
                             ("config.json", "AutoModelForCausalLM", "modeling_evil.EvilModel"),
                             ("tokenizer_config.json", "AutoTokenizer", ["tokenization_evil.EvilTokenizer", None])):
        data = json.loads((folder / name).read_text())
        data.setdefault("auto_map", {})[key] = value
        (folder / name).write_text(json.dumps(data))
    for module, cls, base in (("configuration_evil", "EvilConfig", "LlamaConfig"), ("modeling_evil", "EvilModel", "LlamaForCausalLM"),
                              ("tokenization_evil", "EvilTokenizer", "PreTrainedTokenizerFast")):
        (folder / f"{module}.py").write_text(
            f"import pathlib\npathlib.Path({str(sentinel)!r}).touch()\nfrom transformers import {base}\nclass {cls}({base}): pass\n"
        )
    assert type(earlycrop.from_pretrained(folder)) is LlamaForCausalLM
    assert "Evil" not in type(load_model_tokenizer(str(folder))).__name__
    assert not sentinel.exists()
