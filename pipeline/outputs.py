"""Outputs that never lose what a user had (issue 12).

- `earlycrop prune` refuses an `--out` that is, holds or sits inside `--model`, and a non-empty `--out`
  without `--overwrite`; it writes into a hidden staging folder beside `--out` and renames it into
  place only once everything is written, so a failed or killed save leaves the previous `--out`
  (or none), never a mix of old and new files.
- A run's `output_dir` that holds a previous run needs `--resume` or `--overwrite`; `--resume` checks
  that the configuration still describes the same run (`run_identity`), and checkpoint rotation
  deletes only checkpoints of that run (`own_checkpoints`).
- A full disk is one line naming the path and the space needed (`disk_errors`).
"""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

from .config import RunConfig

IDENTITY_FILE = "identity.json"
TEACHER_AT_CUT = "teacher_at_cut"  # the dense model saved at a cut after step 0, when distillation needs it on resume
# what a run writes into output_dir; any of them means the folder holds a previous run
RUN_OUTPUTS = ("run_info.json", "summary.json", "checkpoints", "model", "plan.json", "scores.safetensors", IDENTITY_FILE,
               TEACHER_AT_CUT)
# kept by --overwrite: the local MLflow store and the tracking backlog hold the history of earlier runs
# (the new run is added to it as a new MLflow run), and everything else in the folder is the user's.
TRAINED_TOKENIZER = "tokenizer"  # a from-scratch run trains its tokenizer here

# Config fields that may change between a run and its --resume: they do not change what was computed
# so far. train.max_steps extends (or shortens) a run, and the LR schedule then follows the new value;
# the evaluation, logging and checkpoint cadence and the tracking destination only change what is
# recorded and where; output_dir may move with the folder. Every other field is part of the identity.
RESUMABLE_FIELDS = (
    "train.max_steps", "train.eval_every", "train.eval_batches", "train.log_every", "train.checkpoint_every",
    "train.keep_checkpoints", "tracking", "tracking_uri", "tracking_fallback_local", "experiment", "run_name",
    "output_dir", "register_model", "collective_timeout_s",
)

_STAGING = ".earlycrop-staging-"  # a save in progress (complete or absent, never half)
_ASIDE = ".earlycrop-old-"  # the previous folder between the two renames of a commit
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_RUST_DISK_FULL = re.compile(rf"\(os error ({'|'.join(map(str, _DISK_FULL))})\)")  # safetensors writes in Rust
# torch.save's C++ writer reports a full disk without the errno ("unexpected pos 576 vs 534")
_TORCH_WRITER = re.compile(r"inline_container\.cc|PytorchStreamWriter")


# ---------------------------------------------------------------- earlycrop prune --out


def check_prune_out(out: Path, model: Path, overwrite: bool) -> None:
    """Refuse, before any work, an --out that would overwrite the input model or a folder the user did not offer."""
    target, source = out.resolve(), model.resolve()
    where = ("is the --model folder" if target == source else "is inside --model" if target.is_relative_to(source)
             else "contains --model" if source.is_relative_to(target) else None)
    if where:
        raise ValueError(f"--out {out} {where} {model}: saving there would overwrite the input model; choose another --out")
    if target.exists() and not target.is_dir():
        raise ValueError(f"--out {out} is an existing file; point --out at a folder")
    if not target.is_dir() or not any(target.iterdir()):
        return
    if not overwrite:
        raise ValueError(f"--out {out} is not empty: pass --overwrite to replace it, or choose another folder")
    if not any((target / name).is_file() for name in ("config.json", "plan.json")):
        raise ValueError(f"--out {out} holds no model (no config.json or plan.json): --overwrite replaces only "
                         "a model folder; choose an empty or new --out")


@contextmanager
def staged_folder(out: Path) -> Iterator[Path]:
    """An empty folder beside `out` to write into; it replaces `out` only when the block succeeds.

    The commit is two renames on one file system (the previous `out` moved aside, the staging folder
    moved in), then the old folder is deleted. A failure removes the staging folder; a kill leaves it,
    and the next save cleans it up or, killed between the renames, puts the previous folder back.
    """
    target = out.resolve()
    recover_folder(target)
    staging = target.parent / f".{target.name}{_STAGING}{os.getpid()}"
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _commit(staging, target)


def _commit(staging: Path, target: Path) -> None:
    """Two renames: the previous folder aside, the new one in; a failed second rename restores the first."""
    if not target.exists():
        os.rename(staging, target)
        return
    aside = target.parent / f".{target.name}{_ASIDE}{os.getpid()}"
    os.rename(target, aside)
    try:
        os.rename(staging, target)
    except OSError:
        os.rename(aside, target)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def recover_folder(target: Path) -> None:
    """Undo what a killed save left beside `target`: stale staging folders, and an old folder moved aside."""
    prefix = glob.escape(f".{target.name}")
    for stale in target.parent.glob(f"{prefix}{_STAGING}*"):
        shutil.rmtree(stale, ignore_errors=True)
    for aside in target.parent.glob(f"{prefix}{_ASIDE}*"):
        if target.exists():
            shutil.rmtree(aside, ignore_errors=True)  # the commit finished; only the clean-up was cut short
        else:
            os.rename(aside, target)  # killed between the two renames: the previous folder comes back


# ---------------------------------------------------------------- disk full


def _size(n: float) -> str:
    """Bytes as GB, MB below 0.1 GB and kB below 1 MB (a tiny model would read "0.0 GB")."""
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


def _free_bytes(path: Path) -> int:
    """Free space where `path` is (or would be) written: the nearest folder that exists."""
    existing = next(p for p in (path, *path.parents) if p.exists())
    return shutil.disk_usage(existing).free


@contextmanager
def disk_errors(path: Path, needed_bytes: int) -> Iterator[None]:
    """Turn "no space left" / "quota exceeded" while writing under `path` into one line with the sizes."""
    try:
        yield
    except (OSError, SafetensorError, RuntimeError) as exc:
        rust = _RUST_DISK_FULL.search(str(exc)) if isinstance(exc, SafetensorError) else None
        code = int(rust.group(1)) if rust else getattr(exc, "errno", None)
        if isinstance(exc, RuntimeError) and _TORCH_WRITER.search(str(exc)) and _free_bytes(Path(path)) < needed_bytes:
            code = errno.ENOSPC
        if code not in _DISK_FULL:
            raise
        reason = "disk quota exceeded" if code == errno.EDQUOT else "no space left on device"
        raise OSError(f"{reason} writing {path}: needs about {_size(needed_bytes)}, "
                      f"{_size(_free_bytes(Path(path)))} free") from exc


# ---------------------------------------------------------------- earlycrop run output_dir


def check_run_output_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to start a run over a previous one unless asked to continue it or to replace it.

    With `overwrite` the previous run's outputs (`RUN_OUTPUTS`, and the tokenizer a from-scratch run
    trained) are moved into a hidden folder and deleted; nothing else in `out` is touched.
    """
    if resume and overwrite:
        raise ValueError("--resume continues the run in output_dir and --overwrite replaces it: pass one of them")
    trash = out / f"{_ASIDE}run"
    shutil.rmtree(trash, ignore_errors=True)  # left by an --overwrite that was killed while deleting
    found = [name for name in RUN_OUTPUTS if (out / name).exists()]
    if not found or resume:
        return
    if not overwrite:
        raise ValueError(f"output_dir {out} holds a previous run ({', '.join(found)}): use --resume to continue it "
                         "or --overwrite to replace it")
    try:
        previous = read_identity(out)
    except ValueError:  # unreadable: keep the tokenizer folder (the new run rewrites its files)
        previous = None
    if previous and previous.get("model.name_or_path") == "null" and previous.get("data.tokenizer") == "null":
        found.append(TRAINED_TOKENIZER)
    trash.mkdir()
    for name in found:
        if (out / name).exists():
            os.rename(out / name, trash / name)
    shutil.rmtree(trash)


def _flatten(value: Any, prefix: str = "") -> dict[str, str]:
    """`{"prune": {"mlp": 0.5}}` → `{"prune.mlp": "0.5"}`: flat keys a message can name, values comparable as text."""
    if isinstance(value, dict) and (value or not prefix):
        return {k: v for key, sub in value.items() for k, v in _flatten(sub, f"{prefix}{key}.").items()}
    return {prefix.removesuffix("."): value if isinstance(value, str) else json.dumps(value, sort_keys=True)}


def run_identity(cfg: RunConfig) -> dict[str, str]:
    """The config fields that change a run's results, flattened (`prune.mlp`: `0.5`), plus their `fingerprint`."""
    fields = {k: v for k, v in _flatten(cfg.model_dump(mode="json")).items() if k not in RESUMABLE_FIELDS}
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]
    return {"fingerprint": digest, **fields}


def check_resume_identity(saved: dict[str, str], current: dict[str, str]) -> None:
    """Refuse a --resume whose config would continue another run, naming the fields that differ."""
    if saved.get("fingerprint") == current.get("fingerprint"):
        return
    keys = sorted((set(saved) | set(current)) - {"fingerprint", *RESUMABLE_FIELDS})
    diff = [f"{k}={saved.get(k, '(unset)')}, not {current.get(k, '(unset)')}" for k in keys if saved.get(k) != current.get(k)]
    if not diff:
        diff = [f"another configuration (fingerprint {saved.get('fingerprint')}, not {current.get('fingerprint')})"]
    more = f" (and {len(diff) - 3} more)" if len(diff) > 3 else ""
    raise ValueError(f"--resume: this run was started with {'; '.join(diff[:3])}{more}; "
                     "start a new output_dir or --overwrite")


def write_identity(folder: Path, identity: dict[str, str]) -> None:
    """Write `identity.json` whole or not at all (a temporary file, then a rename)."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{IDENTITY_FILE}.tmp"
    tmp.write_text(json.dumps(identity, indent=1, sort_keys=True))
    os.replace(tmp, folder / IDENTITY_FILE)


def read_identity(folder: Path) -> dict[str, str] | None:
    """The identity saved in `folder`, or None when it has none (a run from before identities were saved)."""
    path = folder / IDENTITY_FILE
    if not path.is_file():
        return None
    try:
        identity = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); delete the folder's run or pass --overwrite") from None
    if not isinstance(identity, dict) or "fingerprint" not in identity:
        raise ValueError(f"{path} is not a run identity (no fingerprint); delete the folder's run or pass --overwrite")
    return identity


def own_checkpoints(root: Path, identity: dict[str, str], prefix: str) -> list[Path]:
    """The checkpoints `<root>/<prefix><step>` that belong to this run, oldest first; rotation deletes
    only these, and a checkpoint of another run (or one without an identity) is never touched."""
    def step(path: Path) -> int:
        tail = path.name.removeprefix(prefix)
        return int(tail) if tail.isdigit() else -1

    own = []
    for path in root.glob(f"{glob.escape(prefix)}*") if root.is_dir() else ():
        try:
            saved = read_identity(path) if path.is_dir() and step(path) >= 0 else None
        except ValueError:
            saved = None
        if saved is not None and saved.get("fingerprint") == identity.get("fingerprint"):
            own.append(path)
    return sorted(own, key=step)


def git_revision() -> str:
    """The commit this code runs from (tracked with every run), or "unknown" outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
