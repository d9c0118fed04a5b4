"""Run the real launchers (torchrun, accelerate launch) from tests, on free loopback ports."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict[str, str]:
    """Child environment: repo importable, one thread per rank (2 cores), offline hub."""
    out = dict(os.environ)
    out["PYTHONPATH"] = f"{REPO}{os.pathsep}{out.get('PYTHONPATH', '')}"
    out.setdefault("OMP_NUM_THREADS", "1")
    out["HF_HUB_OFFLINE"] = "1"
    out["TOKENIZERS_PARALLELISM"] = "false"
    out.pop("MLFLOW_TRACKING_URI", None)
    return out


def run(cmd: list[str], timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def torchrun(nproc: int, *args: str, **kw) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *args], **kw)


def accelerate(config: str, *args: str, **kw) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", config,
                "--main_process_port", str(free_port()), *args], **kw)


def cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "launch.cli", *args], **kw)
